package daemon

import (
	"encoding/json"
	"io"
	"net/http"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/units"
	"github.com/blockd/blockd/volume"
)

// The control API's server side; the routes and types are documented in
// package api.

func (d *Daemon) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /v1/volumes", d.list)
	mux.HandleFunc("POST /v1/volumes", d.create)
	mux.HandleFunc("GET /v1/volumes/{name}", d.get)
	mux.HandleFunc("DELETE /v1/volumes/{name}", d.delete)
	mux.HandleFunc("POST /v1/volumes/{name}/resize", d.resize)
	mux.HandleFunc("PATCH /v1/volumes/{name}", d.update)
	mux.HandleFunc("POST /v1/volumes/{name}/attach", d.attach)
	mux.HandleFunc("POST /v1/volumes/{name}/detach", d.detach)
	mux.HandleFunc("POST /v1/volumes/{name}/promote", d.promote)
	mux.HandleFunc("POST /v1/volumes/{name}/resync", d.resync)
	mux.HandleFunc("POST /v1/volumes/{name}/verify", d.verify)
	mux.HandleFunc("POST /v1/volumes/{name}/move", d.moveHandler)
	mux.HandleFunc("GET /v1/nodes", d.nodesHandler)
	mux.HandleFunc("GET /v1/io/pods", d.pods)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Errorf(api.CodeNotFound, "no such API call: %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// info is the API's view of a volume.
func (d *Daemon) info(v *volume.Volume) api.Volume {
	s := v.Spec()
	vi := api.Volume{Spec: s, SizeHuman: units.FormatSize(int64(s.Size))}
	vi.State, vi.Reason = v.State()
	if n, ok, err := v.Allocated(); ok {
		vi.Path = d.volumes.DataPath(s.Name)
		vi.Allocated = n
		if err != nil {
			d.log.Warn("cannot tell the allocated size of a backing file", "volume", s.Name, "err", err)
		}
	}
	if st := v.ProfileStats(); st != nil {
		vi.EffectiveProfile = st.Effective
		vi.ProfileStats = st
	}
	vi.Replicas = v.ReplicaStatus()
	return vi
}

// infoOf is info of the volume called name, as it is after a change.
func (d *Daemon) infoOf(name string) (api.Volume, error) {
	v, err := d.volumes.Volume(name)
	if err != nil {
		return api.Volume{}, err
	}
	return d.info(v), nil
}

func (d *Daemon) list(w http.ResponseWriter, r *http.Request) {
	if d.cluster != nil {
		out, err := d.cluster.listVolumes(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, out)
		return
	}
	out := []api.Volume{}
	for _, v := range d.volumes.Volumes() {
		out = append(out, d.info(v))
	}
	writeJSON(w, http.StatusOK, out)
}

func (d *Daemon) create(w http.ResponseWriter, r *http.Request) {
	var s api.Spec
	if err := readJSON(r, &s); err != nil {
		writeError(w, err)
		return
	}
	if d.cluster != nil {
		v, err := d.cluster.createVolume(r.Context(), s)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusCreated, v)
		return
	}
	s, err := d.volumes.Create(s)
	if err != nil {
		writeError(w, err)
		return
	}
	d.reply(w, http.StatusCreated, s.Name)
}

func (d *Daemon) get(w http.ResponseWriter, r *http.Request) {
	if d.cluster != nil {
		v, err := d.cluster.getVolume(r.Context(), r.PathValue("name"))
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
		return
	}
	d.reply(w, http.StatusOK, r.PathValue("name"))
}

// isClusterVolume reports whether name is a cluster volume this node
// holds a copy of (a cluster node's API then goes through the cluster).
func (d *Daemon) isClusterVolume(name string) bool {
	if d.cluster == nil {
		return false
	}
	v, err := d.volumes.Volume(name)
	return err != nil || v.Spec().Cluster != ""
}

func (d *Daemon) delete(w http.ResponseWriter, r *http.Request) {
	if d.cluster != nil {
		if err := d.cluster.deleteVolume(r.Context(), r.PathValue("name")); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if err := d.volumes.Delete(r.PathValue("name")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (d *Daemon) resize(w http.ResponseWriter, r *http.Request) {
	var req api.ResizeRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	if d.isClusterVolume(r.PathValue("name")) {
		writeError(w, api.Errorf(api.CodeInvalid, "%w", errNoClusterResize))
		return
	}
	s, err := d.volumes.Resize(r.PathValue("name"), int64(req.Size))
	if err != nil {
		writeError(w, err)
		return
	}
	d.reply(w, http.StatusOK, s.Name)
}

func (d *Daemon) update(w http.ResponseWriter, r *http.Request) {
	var req api.UpdateRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	change := func(s *api.Spec) error {
		if req.Profile != nil {
			s.Profile = *req.Profile
		}
		if req.ReadOnly != nil {
			s.ReadOnly = *req.ReadOnly
		}
		if len(req.QoS) > 0 {
			if err := json.Unmarshal(req.QoS, &s.QoS); err != nil {
				return api.Errorf(api.CodeInvalid, "%w", err)
			}
		}
		return nil
	}
	if d.cluster != nil {
		v, err := d.cluster.updateVolume(r.Context(), r.PathValue("name"), change)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
		return
	}
	s, err := d.volumes.Update(r.PathValue("name"), change)
	if err != nil {
		writeError(w, err)
		return
	}
	d.reply(w, http.StatusOK, s.Name)
}

func (d *Daemon) attach(w http.ResponseWriter, r *http.Request) {
	var req api.AttachRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	name := r.PathValue("name")
	if d.isClusterVolume(name) {
		// The kernel device is a frontend: this node must own the
		// volume.
		if _, err := d.cluster.acquire(name, "attach"); err != nil {
			writeError(w, err)
			return
		}
	}
	s, err := d.devices.Attach(name, req)
	if err != nil {
		writeError(w, err)
		return
	}
	if d.isClusterVolume(name) {
		if err := d.cluster.attached(name, s.Attachment.Device); err != nil {
			d.log.Warn("recording the attachment in the cluster", "volume", name, "err", err)
		}
	}
	d.updateProbeDevices()
	d.reply(w, http.StatusOK, s.Name)
}

func (d *Daemon) detach(w http.ResponseWriter, r *http.Request) {
	s, err := d.devices.Detach(r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	if d.isClusterVolume(s.Name) {
		if err := d.cluster.attached(s.Name, ""); err != nil {
			d.log.Warn("clearing the attachment in the cluster", "volume", s.Name, "err", err)
		}
	}
	d.updateProbeDevices()
	d.reply(w, http.StatusOK, s.Name)
}

// reply writes the volume called name.
func (d *Daemon) reply(w http.ResponseWriter, status int, name string) {
	vi, err := d.infoOf(name)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, status, vi)
}

func (d *Daemon) promote(w http.ResponseWriter, r *http.Request) {
	var req api.PromoteRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	if d.isClusterVolume(r.PathValue("name")) {
		writeError(w, api.Errorf(api.CodeConflict, "in a cluster the owner is not promoted by hand: a frontend on a node with an in-sync copy takes the volume once its owner's lease expires, or `blockd volume move %s --to NODE` hands it over", r.PathValue("name")))
		return
	}
	s, err := d.volumes.Promote(r.PathValue("name"), req.Force)
	if err != nil {
		writeError(w, err)
		return
	}
	d.reply(w, http.StatusOK, s.Name)
}

func (d *Daemon) resync(w http.ResponseWriter, r *http.Request) {
	v, err := d.volumes.Get(r.PathValue("name"))
	if err == nil {
		err = v.Resync()
	}
	if err != nil {
		writeError(w, err)
		return
	}
	d.reply(w, http.StatusOK, v.Name())
}

func (d *Daemon) verify(w http.ResponseWriter, r *http.Request) {
	v, err := d.volumes.Get(r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	reps, err := v.Verify(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	res := api.VerifyResult{Volume: v.Name(), OK: true, Replicas: reps}
	for _, rv := range reps {
		if rv.Error != "" || len(rv.Differ) > 0 {
			res.OK = false
		}
	}
	writeJSON(w, http.StatusOK, res)
}

func readJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return api.Errorf(api.CodeInvalid, "request body: %v", err)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	code := api.CodeOf(err)
	writeJSON(w, code.Status(), &api.Error{Message: err.Error(), Code: code})
}
