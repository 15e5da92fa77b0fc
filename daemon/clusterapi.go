package daemon

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cluster"
	"github.com/blockd/blockd/units"
	"github.com/blockd/blockd/volume"
)

// The control API of a cluster node: volumes live in the cluster store,
// so any node creates, lists, changes and deletes any of them.

// createVolume places a new volume on repl nodes, records it, and waits
// until every chosen node made its copy.
func (a *agent) createVolume(ctx context.Context, s api.Spec) (api.Volume, error) {
	s.Attachment, s.Replication = nil, nil
	if err := volume.Validate(&s); err != nil {
		return api.Volume{}, err
	}
	repl := max(s.Repl, 1)
	if repl > volume.MaxRepl {
		return api.Volume{}, api.Errorf(api.CodeInvalid, "repl %d: want 1 to %d copies", repl, volume.MaxRepl)
	}
	_, alive, err := a.st.Nodes(ctx)
	if err != nil {
		return api.Volume{}, api.Errorf(api.CodeUnavailable, "create %s: %v", s.Name, err)
	}
	var cands []cluster.Candidate
	for _, ni := range alive {
		cands = append(cands, cluster.Candidate{Name: ni.Name, Zone: ni.Labels[cluster.ZoneLabel], Free: ni.Free})
	}
	nodes, err := cluster.Place(repl, cands, s.Nodes, s.Zones)
	if err != nil {
		return api.Volume{}, err
	}
	s.Repl, s.Nodes, s.Zones, s.Cluster = repl, nil, nil, a.st.ID()
	s.CreatedAt = time.Now().UTC().Truncate(time.Second)
	if err := a.st.CreateVolume(ctx, cluster.Volume{Spec: s, Nodes: nodes}); err != nil {
		return api.Volume{}, err
	}
	a.poke()
	deadline := time.Now().Add(createWait)
	for {
		vi, err := a.st.Get(ctx, s.Name)
		if err != nil {
			return api.Volume{}, err
		}
		var missing, failed []string
		for _, n := range nodes {
			switch st := vi.Copies[n]; {
			case st == "ok":
			case strings.HasPrefix(st, "error: "):
				failed = append(failed, n+": "+strings.TrimPrefix(st, "error: "))
			default:
				missing = append(missing, n)
			}
		}
		switch {
		case len(failed) > 0 || (len(missing) > 0 && time.Now().After(deadline)):
			why := strings.Join(failed, "; ")
			if len(missing) > 0 {
				why = strings.TrimPrefix(why+"; no copy after "+createWait.String()+" on "+strings.Join(missing, ", "), "; ")
			}
			if derr := a.st.DeleteVolume(context.Background(), s.Name, func(cluster.VolumeInfo) error { return nil }); derr != nil {
				a.log.Warn("removing a volume whose create failed", "volume", s.Name, "err", derr)
			}
			return api.Volume{}, api.Errorf(api.CodeUnavailable, "create %s failed (%s); nothing was kept", s.Name, why)
		case len(missing) == 0:
			a.log.Info("volume created", "volume", s.Name, "size", units.FormatSize(int64(s.Size)), "nodes", strings.Join(nodes, ","))
			return a.view(vi), nil
		}
		select {
		case <-ctx.Done():
			return api.Volume{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// view is the API's view of a cluster volume: this node's copy if it has
// one, and where the volume lives.
func (a *agent) view(vi cluster.VolumeInfo) api.Volume {
	var out api.Volume
	if v, err := a.d.volumes.Volume(vi.Spec.Name); err == nil && v.Spec().Cluster == a.st.ID() {
		out = a.d.info(v)
	} else {
		out = api.Volume{Spec: vi.Spec, SizeHuman: units.FormatSize(int64(vi.Spec.Size)), State: api.StateOK}
	}
	out.Placement = vi.Placement()
	return out
}

// listVolumes is every cluster volume, and this node's own.
func (a *agent) listVolumes(ctx context.Context) ([]api.Volume, error) {
	infos, _, err := a.st.List(ctx)
	if err != nil {
		return nil, api.Errorf(api.CodeUnavailable, "listing the cluster's volumes: %v", err)
	}
	out := []api.Volume{}
	seen := map[string]bool{}
	for _, vi := range infos {
		out = append(out, a.view(vi))
		seen[vi.Spec.Name] = true
	}
	for _, v := range a.d.volumes.Volumes() {
		if !seen[v.Name()] && v.Spec().Cluster == "" {
			out = append(out, a.d.info(v))
		}
	}
	slices.SortFunc(out, func(x, y api.Volume) int { return strings.Compare(x.Name, y.Name) })
	return out, nil
}

// getVolume is one volume: a cluster volume, or this node's own.
func (a *agent) getVolume(ctx context.Context, name string) (api.Volume, error) {
	if v, err := a.d.volumes.Volume(name); err == nil && v.Spec().Cluster == "" {
		return a.d.info(v), nil
	}
	vi, err := a.st.Get(ctx, name)
	if err != nil {
		if cluster.IsUnreachable(err) {
			// Offline: what this node knows.
			if v, lerr := a.d.volumes.Volume(name); lerr == nil {
				return a.d.info(v), nil
			}
			return api.Volume{}, api.Errorf(api.CodeUnavailable, "volume %s: %v", name, err)
		}
		return api.Volume{}, err
	}
	return a.view(vi), nil
}

// deleteVolume removes a cluster volume everywhere (each node removes its
// copy, now or when it comes back), or this node's own.
func (a *agent) deleteVolume(ctx context.Context, name string) error {
	if v, err := a.d.volumes.Volume(name); err == nil && v.Spec().Cluster == "" {
		return a.d.volumes.Delete(name)
	}
	err := a.st.DeleteVolume(ctx, name, func(vi cluster.VolumeInfo) error {
		if vi.State.Attached != "" {
			return api.Errorf(api.CodeConflict, "volume %s is attached (%s); detach it first", name, vi.State.Attached)
		}
		return nil
	})
	if err != nil {
		return err
	}
	a.poke()
	// Wait (a while) for the live nodes to remove their copies; the
	// others do when they come back.
	deadline := time.Now().Add(createWait)
	for {
		copies, err := a.st.Copies(ctx, name)
		_, alive, nerr := a.st.Nodes(ctx)
		if err != nil || nerr != nil {
			break
		}
		var left []string
		for n := range copies {
			if _, ok := alive[n]; ok {
				left = append(left, n)
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			a.log.Warn("deleted volume: some nodes have not removed their copies yet", "volume", name, "nodes", strings.Join(left, ","))
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	a.log.Info("volume deleted from the cluster", "volume", name)
	return nil
}

// updateVolume changes a cluster volume's settings; every copy follows.
func (a *agent) updateVolume(ctx context.Context, name string, fn func(*api.Spec) error) (api.Volume, error) {
	if v, err := a.d.volumes.Volume(name); err == nil && v.Spec().Cluster == "" {
		s, err := a.d.volumes.Update(name, fn)
		if err != nil {
			return api.Volume{}, err
		}
		return a.d.infoOf(s.Name)
	}
	_, err := a.st.UpdateSpec(ctx, name, func(s *api.Spec) error {
		old := *s
		if err := fn(s); err != nil {
			return err
		}
		if err := volume.Validate(s); err != nil {
			return err
		}
		if s.Size != old.Size || s.Name != old.Name || s.Engine != old.Engine {
			return api.Errorf(api.CodeInvalid, "name, size and engine cannot be changed by update")
		}
		return nil
	})
	if err != nil {
		return api.Volume{}, err
	}
	a.poke()
	return a.getVolume(ctx, name)
}

// moveVolume hands a volume over to node to: its owner (if any) drains,
// flushes and releases it, then to takes it.
func (a *agent) moveVolume(ctx context.Context, name, to string) (api.Volume, error) {
	vi, err := a.st.Get(ctx, name)
	if err != nil {
		return api.Volume{}, err
	}
	switch {
	case !vi.Has(to):
		return api.Volume{}, api.Errorf(api.CodeInvalid, "volume %s has no copy on node %s (its copies: %s)", name, to, strings.Join(vi.Nodes, ", "))
	case !vi.InSync(to):
		return api.Volume{}, api.Errorf(api.CodeConflict, "node %s's copy of %s is not in sync (in sync: %s)", to, name, strings.Join(vi.State.InSync, ", "))
	case vi.Owner == to:
		return a.view(vi), nil
	case vi.State.Attached != "":
		return api.Volume{}, api.Errorf(api.CodeConflict, "volume %s is attached (%s); detach it first", name, vi.State.Attached)
	}
	_, alive, err := a.st.Nodes(ctx)
	if err != nil {
		return api.Volume{}, api.Errorf(api.CodeUnavailable, "move %s: %v", name, err)
	}
	if _, ok := alive[to]; !ok {
		return api.Volume{}, api.Errorf(api.CodeConflict, "node %s is not ready", to)
	}
	at := time.Now().UTC()
	if err := a.st.SetMove(ctx, name, &cluster.Move{To: to, At: at}); err != nil {
		return api.Volume{}, err
	}
	a.poke()
	deadline := time.Now().Add(time.Minute)
	for {
		vi, err := a.st.Get(ctx, name)
		if err != nil {
			return api.Volume{}, err
		}
		switch {
		case vi.Owner == to && vi.State.Epoch == vi.Epoch: // its state written too
			a.st.SetMove(context.Background(), name, nil)
			return a.view(vi), nil
		case vi.Move == nil:
			return api.Volume{}, api.Errorf(api.CodeConflict, "move of %s to %s was cancelled (owner now: %q)", name, to, vi.Owner)
		case vi.Move.Error != "":
			a.st.SetMove(context.Background(), name, nil)
			return api.Volume{}, api.Errorf(api.CodeConflict, "move of %s to %s refused: %s", name, to, vi.Move.Error)
		case time.Now().After(deadline):
			a.st.SetMove(context.Background(), name, nil)
			return api.Volume{}, api.Errorf(api.CodeUnavailable, "move of %s to %s did not finish within a minute (owner: %q)", name, to, vi.Owner)
		}
		select {
		case <-ctx.Done():
			return api.Volume{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// nodes lists the cluster's members.
func (a *agent) nodes(ctx context.Context) ([]api.Node, error) {
	members, alive, err := a.st.Nodes(ctx)
	if err != nil {
		return nil, api.Errorf(api.CodeUnavailable, "listing the cluster's nodes: %v", err)
	}
	infos, _, err := a.st.List(ctx)
	if err != nil {
		return nil, api.Errorf(api.CodeUnavailable, "listing the cluster's volumes: %v", err)
	}
	out := []api.Node{}
	for _, m := range members {
		n := api.Node{Name: m.Name, State: api.NodeUnreachable, Addr: m.Addr, Labels: m.Labels, Capacity: m.Capacity, Free: m.Free,
			Version: m.Version, Since: m.Updated}
		if ni, ok := alive[m.Name]; ok {
			n.State, n.Addr, n.Labels, n.Capacity, n.Free, n.Version, n.Since = api.NodeReady, ni.Addr, ni.Labels, ni.Capacity, ni.Free, ni.Version, ni.Started
		}
		for _, vi := range infos {
			if vi.Has(m.Name) {
				n.Volumes++
			}
			if vi.Owner == m.Name {
				n.Owned++
			}
		}
		out = append(out, n)
	}
	slices.SortFunc(out, func(x, y api.Node) int { return strings.Compare(x.Name, y.Name) })
	return out, nil
}

// attached records (dev != "") or clears a volume's kernel device in the
// cluster store: a volume attached somewhere is neither moved nor
// deleted.
func (a *agent) attached(name, dev string) error {
	v, err := a.d.volumes.Volume(name)
	if err != nil || v.Spec().Cluster == "" {
		return nil
	}
	r := v.Replication()
	where := ""
	if dev != "" {
		where = a.node + ":" + dev
	}
	return a.saveState(name, r.Epoch, func(st *cluster.State) { st.Attached = where })
}

// The API handlers of a cluster node.

func (d *Daemon) moveHandler(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		writeError(w, api.Errorf(api.CodeInvalid, "this daemon is not in a cluster (serve --cluster)"))
		return
	}
	var req api.MoveRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	if req.To == "" {
		writeError(w, api.Errorf(api.CodeInvalid, "move: name the node to move the volume to"))
		return
	}
	v, err := d.cluster.moveVolume(r.Context(), r.PathValue("name"), req.To)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (d *Daemon) nodesHandler(w http.ResponseWriter, r *http.Request) {
	if d.cluster == nil {
		writeError(w, api.Errorf(api.CodeInvalid, "this daemon is not in a cluster (serve --cluster)"))
		return
	}
	ns, err := d.cluster.nodes(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, ns)
}

var errNoClusterResize = fmt.Errorf("resizing a cluster volume is not supported yet: create a larger volume and copy the data")
