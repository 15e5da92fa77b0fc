package blockd

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/blockd/blockd/qos"
	"io"
	"net/http"
	"time"
)

// The control API: HTTP+JSON on a unix socket (STATE/blockd.sock, mode
// 0600). Every error is {"error": "...", "code": "..."} with an HTTP status
// that matches the code; clients switch on the code, never on the text.
//
//	GET    /v1/volumes                 list
//	POST   /v1/volumes                 create   {name, size, engine?, profile?, read_only?}
//	GET    /v1/volumes/{name}          get
//	DELETE /v1/volumes/{name}          delete
//	POST   /v1/volumes/{name}/resize   resize   {size}
//	PATCH  /v1/volumes/{name}          update   {profile?, read_only?}
//	GET    /v1/health                  liveness
//
// Sizes are byte counts or strings with units ("1GiB").

// VolumeInfo is a volume as the API shows it.
type VolumeInfo struct {
	Spec
	SizeHuman string `json:"size_human"`
	// Path is the backing file (file engine only).
	Path string `json:"path,omitempty"`
	// Allocated is how much of the backing file is on disk (file engine).
	Allocated int64 `json:"allocated_bytes,omitempty"`
}

// APIError is the body of every failed API call.
type APIError struct {
	Message string `json:"error"`
	Code    string `json:"code"`
}

func (e *APIError) Error() string { return e.Message }

// Error codes on the API and their HTTP statuses.
const (
	CodeInvalid  = "invalid_argument"
	CodeNotFound = "not_found"
	CodeExists   = "already_exists"
	CodeConflict = "conflict"
	CodeInternal = "internal"
)

// Size is a byte count that unmarshals from a number or a string with
// units.
type Size int64

// UnmarshalJSON implements json.Unmarshaler.
func (s *Size) UnmarshalJSON(b []byte) error {
	var n int64
	if err := json.Unmarshal(b, &n); err == nil {
		if n < 0 {
			return fmt.Errorf("size %d: negative", n)
		}
		*s = Size(n)
		return nil
	}
	var str string
	if err := json.Unmarshal(b, &str); err != nil {
		return fmt.Errorf("size: want a byte count or a string such as \"1GiB\"")
	}
	n, err := ParseSize(str)
	if err != nil {
		return err
	}
	*s = Size(n)
	return nil
}

// CreateRequest is the body of POST /v1/volumes.
type CreateRequest struct {
	Name     string `json:"name"`
	Size     Size   `json:"size"`
	Engine   string `json:"engine,omitempty"`
	Profile  string `json:"profile,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// QoS maps setting names (qos.FlagNames) to CLI-style values.
	QoS map[string]string `json:"qos,omitempty"`
}

// ResizeRequest is the body of POST /v1/volumes/{name}/resize.
type ResizeRequest struct {
	Size Size `json:"size"`
}

// UpdateRequest is the body of PATCH /v1/volumes/{name}; absent fields stay.
type UpdateRequest struct {
	Profile  *string `json:"profile,omitempty"`
	ReadOnly *bool   `json:"read_only,omitempty"`
	// QoS changes the named settings (qos.FlagNames; "none" or "0" clears).
	QoS map[string]string `json:"qos,omitempty"`
}

func applyQoS(l *qos.Limits, set map[string]string) error {
	for k, v := range set {
		if err := l.SetFlag(k, v, ParseSize); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	return nil
}

type api struct {
	m *Manager
	k *kernelNBD  // nil: attach is not offered
	u *kernelUblk // nil: ublk is not offered
	// attached runs after a successful attach or detach.
	attached func()
}

// AttachRequest is the body of POST /v1/volumes/{name}/attach.
type AttachRequest struct {
	Frontend    string `json:"frontend,omitempty"`    // "nbd" (default) or "ublk"
	Connections int    `json:"connections,omitempty"` // nbd: 0 = one per CPU, at most 8
	Queues      int    `json:"queues,omitempty"`      // ublk: 0 = one per CPU, at most 4
	Depth       int    `json:"depth,omitempty"`       // ublk: 0 = 64
}

func newAPIHandler(m *Manager, k *kernelNBD, u *kernelUblk, attached func()) http.Handler {
	if attached == nil {
		attached = func() {}
	}
	a := &api{m: m, k: k, u: u, attached: attached}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /v1/volumes", a.list)
	mux.HandleFunc("POST /v1/volumes", a.create)
	mux.HandleFunc("GET /v1/volumes/{name}", a.get)
	mux.HandleFunc("DELETE /v1/volumes/{name}", a.delete)
	mux.HandleFunc("POST /v1/volumes/{name}/resize", a.resize)
	mux.HandleFunc("PATCH /v1/volumes/{name}", a.update)
	mux.HandleFunc("POST /v1/volumes/{name}/attach", a.attach)
	mux.HandleFunc("POST /v1/volumes/{name}/detach", a.detach)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, fmt.Errorf("%w: no such API call: %s %s", ErrNotFound, r.Method, r.URL.Path))
	})
	return mux
}

func (a *api) info(s Spec) VolumeInfo {
	vi := VolumeInfo{Spec: s, SizeHuman: FormatSize(s.Size)}
	if v, err := a.m.Get(s.Name); err == nil {
		if f, ok := v.engine.(interface{ Allocated() (int64, error) }); ok {
			vi.Path = a.m.DataPath(s.Name)
			vi.Allocated, _ = f.Allocated()
		}
	}
	return vi
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	out := []VolumeInfo{}
	for _, s := range a.m.List() {
		out = append(out, a.info(s))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *api) create(w http.ResponseWriter, r *http.Request) {
	var req CreateRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	var l qos.Limits
	if err := applyQoS(&l, req.QoS); err != nil {
		writeError(w, err)
		return
	}
	s, err := a.m.Create(Spec{Name: req.Name, Size: int64(req.Size), Engine: req.Engine, Profile: req.Profile, ReadOnly: req.ReadOnly, QoS: l})
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, a.info(s))
}

func (a *api) get(w http.ResponseWriter, r *http.Request) {
	v, err := a.m.Get(r.PathValue("name"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, a.info(v.Spec()))
}

func (a *api) delete(w http.ResponseWriter, r *http.Request) {
	if err := a.m.Delete(r.PathValue("name")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *api) resize(w http.ResponseWriter, r *http.Request) {
	var req ResizeRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	s, err := a.m.Resize(r.PathValue("name"), int64(req.Size))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, a.info(s))
}

func (a *api) update(w http.ResponseWriter, r *http.Request) {
	var req UpdateRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	s, err := a.m.Update(r.PathValue("name"), func(s *Spec) error {
		if req.Profile != nil {
			s.Profile = *req.Profile
		}
		if req.ReadOnly != nil {
			s.ReadOnly = *req.ReadOnly
		}
		return applyQoS(&s.QoS, req.QoS)
	})
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, a.info(s))
}

func (a *api) attach(w http.ResponseWriter, r *http.Request) {
	var req AttachRequest
	if err := readJSON(r, &req); err != nil {
		writeError(w, err)
		return
	}
	var s Spec
	var err error
	switch {
	case req.Frontend != "" && req.Frontend != FrontendNBD && req.Frontend != FrontendUblk:
		err = fmt.Errorf("%w: frontend %q: want nbd or ublk", ErrInvalid, req.Frontend)
	case req.Frontend == FrontendUblk && a.u == nil, req.Frontend != FrontendUblk && a.k == nil:
		err = fmt.Errorf("%w: this daemon does not attach kernel devices", ErrConflict)
	case req.Frontend == FrontendUblk:
		s, err = a.u.Attach(r.PathValue("name"), req.Queues, req.Depth)
	default:
		s, err = a.k.Attach(r.PathValue("name"), req.Connections)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	a.attached()
	writeJSON(w, http.StatusOK, a.info(s))
}

func (a *api) detach(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	v, err := a.m.Get(name)
	if err != nil {
		writeError(w, err)
		return
	}
	var s Spec
	switch att := v.Spec().Attachment; {
	case att != nil && att.Frontend == FrontendUblk && a.u != nil:
		s, err = a.u.Detach(name)
	case a.k != nil:
		s, err = a.k.Detach(name)
	default:
		err = fmt.Errorf("%w: this daemon does not attach kernel devices", ErrConflict)
	}
	if err != nil {
		writeError(w, err)
		return
	}
	a.attached()
	writeJSON(w, http.StatusOK, a.info(s))
}

func readJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: request body: %v", ErrInvalid, err)
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
	code, status := CodeInternal, http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrInvalid):
		code, status = CodeInvalid, http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		code, status = CodeNotFound, http.StatusNotFound
	case errors.Is(err, ErrExists):
		code, status = CodeExists, http.StatusConflict
	case errors.Is(err, ErrConflict):
		code, status = CodeConflict, http.StatusConflict
	}
	msg := err.Error()
	writeJSON(w, status, &APIError{Message: msg, Code: code})
}

var apiTimeout = 30 * time.Second
