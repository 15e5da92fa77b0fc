package replication

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"syscall"

	"github.com/cespare/xxhash/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// Copies is this node's store of volumes as the replica service sees it
// (the volume registry implements it).
type Copies interface {
	// Copy returns the node's copy of the volume called name (owned or a
	// replica), or an error carrying api.CodeNotFound.
	Copy(name string) (Copy, error)
	// CreateCopy creates a replica of the volume spec describes
	// (name, size, engine, block size) with replication state r.
	CreateCopy(spec api.Spec, r api.Replication) (Copy, error)
	// DeleteCopy removes a replica and its data.
	DeleteCopy(name string) error
	// FreeBytes is the space left for new copies.
	FreeBytes() int64
}

// Copy is one volume's local copy.
type Copy interface {
	// Engine is where a replica's data goes; nil for a volume this node
	// owns (its data comes only through its own pipeline).
	Engine() ioengine.Engine
	// Replication is the copy's persisted replication state.
	Replication() api.Replication
	// SetReplication persists new replication state; it is durable when
	// SetReplication returns.
	SetReplication(api.Replication) error
	// StepDown makes an owned copy a replica of another owner at a
	// higher epoch: it fences the owner's pipeline (no write is
	// acknowledged from now on) and persists the new state.
	StepDown(owner string, epoch uint64) error
}

// Service answers the messages owners and peers send this node: it keeps
// the replicas' data as their owners ask, and refuses any owner whose
// epoch is older than the newest one it has persisted.
type Service struct {
	node   string
	copies Copies
	log    *slog.Logger

	mu    sync.Mutex
	state map[string]*copyState
}

// copyState orders a replica's messages: data messages share gate, a
// new session (MsgOpen) takes it alone, so it waits for every request of
// the session before it (which may carry a buffer the old owner has
// reused) to land before the new owner's resync can copy over them.
type copyState struct {
	gate sync.RWMutex
}

// NewService returns the replica service of node.
func NewService(node string, copies Copies, log *slog.Logger) *Service {
	if log == nil {
		log = slog.Default()
	}
	return &Service{node: node, copies: copies, log: log, state: map[string]*copyState{}}
}

func (s *Service) stateOf(name string) *copyState {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.state[name]
	if st == nil {
		st = &copyState{}
		s.state[name] = st
	}
	return st
}

// ServeMessage implements Handler.
func (s *Service) ServeMessage(ctx context.Context, peer string, req *Msg, payload []byte, resp *Msg) ([]byte, error) {
	*resp = Msg{Type: req.Type, Volume: req.Volume, Seq: req.Seq}
	switch req.Type {
	case MsgOpen:
		return nil, s.open(peer, req, payload, resp)
	case MsgState:
		s.describe(req, resp)
		return nil, nil
	case MsgWrite, MsgTrim, MsgWriteZeroes, MsgFlush, MsgSetGen, MsgChecksums, MsgDelete:
	default:
		resp.Status = StatusInvalid
		return nil, nil
	}
	st := s.stateOf(req.Volume)
	st.gate.RLock()
	defer st.gate.RUnlock()
	c, r, ok := s.checkEpoch(peer, req, resp)
	if !ok {
		return nil, nil
	}
	e := c.Engine()
	if e == nil { // we own it at this epoch: only our own pipeline writes it
		resp.Status = StatusConflict
		return nil, nil
	}
	switch req.Type {
	case MsgSetGen:
		if req.Gen != r.Generation {
			r.Generation = req.Gen
			if err := c.SetReplication(r); err != nil {
				s.log.Error("replica: persisting a generation", "volume", req.Volume, "err", err)
				resp.Status = StatusIO
			}
		}
		resp.Gen = r.Generation
		return nil, nil
	case MsgChecksums:
		return s.checksums(e, req, resp), nil
	case MsgDelete:
		if err := s.copies.DeleteCopy(req.Volume); err != nil {
			s.log.Error("replica: delete", "volume", req.Volume, "err", err)
			resp.Status = StatusIO
		}
		return nil, nil
	}
	resp.Status = statusOf(apply(e, req, payload))
	return nil, nil
}

// checkEpoch finds the copy and refuses a request from an older epoch or
// from another owner than the one of its epoch.
func (s *Service) checkEpoch(peer string, req *Msg, resp *Msg) (Copy, api.Replication, bool) {
	c, err := s.copies.Copy(req.Volume)
	if err != nil {
		resp.Status = StatusNoVolume
		return nil, api.Replication{}, false
	}
	r := c.Replication()
	resp.Epoch, resp.Gen = r.Epoch, r.Generation
	switch {
	case req.Epoch < r.Epoch:
		resp.Status = StatusStaleEpoch
		return nil, r, false
	case req.Epoch == r.Epoch && r.Owner != peer:
		resp.Status = StatusConflict // two owners at one epoch: refuse both
		return nil, r, false
	case req.Epoch > r.Epoch:
		// Data messages only come after an MsgOpen of the epoch.
		resp.Status = StatusNoSession
		return nil, r, false
	}
	return c, r, true
}

// open starts a session of owner peer at req.Epoch.
func (s *Service) open(peer string, req *Msg, payload []byte, resp *Msg) error {
	st := s.stateOf(req.Volume)
	st.gate.Lock() // every request of an earlier session has landed
	defer st.gate.Unlock()
	var spec api.Spec
	if err := json.Unmarshal(payload, &spec); err != nil || spec.Name != req.Volume || spec.Replication == nil {
		resp.Status = StatusInvalid
		return nil
	}
	c, err := s.copies.Copy(req.Volume)
	if api.IsCode(err, api.CodeNotFound) {
		// A new volume's copy is as empty as the owner's: in step at
		// its generation. A copy made to replace a lost one is not.
		r := api.Replication{Role: api.RoleReplica, Owner: peer, Epoch: req.Epoch, Replicas: spec.Replication.Replicas}
		if req.Flags&FlagCreate != 0 {
			r.Generation = req.Gen
		}
		if _, err := s.copies.CreateCopy(spec, r); err != nil {
			s.log.Error("replica: creating a copy", "volume", req.Volume, "owner", peer, "err", err)
			resp.Status = StatusIO
			return nil
		}
		s.log.Info("replica created", "volume", req.Volume, "owner", peer, "epoch", req.Epoch)
		resp.Epoch, resp.Gen = req.Epoch, r.Generation
		if req.Flags&FlagCreate == 0 {
			resp.Flags = FlagNoHistory
		}
		return nil
	}
	if err != nil {
		resp.Status = StatusIO
		return nil
	}
	r := c.Replication()
	resp.Epoch, resp.Gen = r.Epoch, r.Generation
	switch {
	case req.Epoch < r.Epoch:
		resp.Status = StatusStaleEpoch
		return nil
	case req.Epoch == r.Epoch && r.Owner != peer:
		resp.Status = StatusConflict
		return nil
	}
	if c.Engine() == nil {
		// We own it, and a newer owner exists: step down.
		if req.Epoch == r.Epoch {
			resp.Status = StatusConflict
			return nil
		}
		s.log.Warn("a newer owner took over this volume; stepping down to replica", "volume", req.Volume, "owner", peer, "epoch", req.Epoch, "our_epoch", r.Epoch)
		if err := c.StepDown(peer, req.Epoch); err != nil {
			s.log.Error("stepping down", "volume", req.Volume, "err", err)
			resp.Status = StatusIO
			return nil
		}
		resp.Epoch, resp.Flags = req.Epoch, FlagNoHistory // we may be a write ahead
		return nil
	}
	if req.Epoch != r.Epoch || r.Owner != peer || !sameReplicas(r.Replicas, spec.Replication.Replicas) {
		if req.Epoch != r.Epoch {
			s.log.Info("replica: new owner epoch", "volume", req.Volume, "owner", peer, "epoch", req.Epoch, "was", r.Epoch)
		}
		r.Owner, r.Epoch, r.Replicas = peer, req.Epoch, spec.Replication.Replicas
		if err := c.SetReplication(r); err != nil {
			s.log.Error("replica: persisting an epoch", "volume", req.Volume, "err", err)
			resp.Status = StatusIO
			return nil
		}
	}
	resp.Epoch = r.Epoch
	return nil
}

func sameReplicas(a, b []api.Replica) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// describe answers MsgState: of a volume, or with no volume named, of the
// node (its free space in Offset).
func (s *Service) describe(req, resp *Msg) {
	if req.Volume == "" {
		resp.Offset = s.copies.FreeBytes()
		return
	}
	c, err := s.copies.Copy(req.Volume)
	if err != nil {
		resp.Status = StatusNoVolume
		return
	}
	r := c.Replication()
	resp.Epoch, resp.Gen = r.Epoch, r.Generation
	if r.Role == api.RoleOwner {
		resp.Flags = FlagOwner
	} else {
		resp.Flags = FlagReplica
	}
}

// apply performs a data message on a replica's engine.
func apply(e ioengine.Engine, req *Msg, payload []byte) error {
	if req.Offset < 0 || req.Offset+int64(req.Length) > e.Size() {
		return pipeline.ErrOutOfRange
	}
	var err error
	switch req.Type {
	case MsgWrite:
		if len(payload) != int(req.Length) {
			return pipeline.ErrMisaligned
		}
		if fw, ok := e.(ioengine.FUAWriter); ok && req.Flags&FlagFUA != 0 {
			_, err = fw.WriteAtFUA(payload, req.Offset)
			return err
		}
		_, err = e.WriteAt(payload, req.Offset)
	case MsgTrim:
		err = e.Trim(req.Offset, int64(req.Length))
	case MsgWriteZeroes:
		err = e.WriteZeroes(req.Offset, int64(req.Length), req.Flags&FlagNoHole != 0)
	case MsgFlush:
		return e.Flush()
	}
	if err == nil && req.Flags&FlagFUA != 0 {
		err = e.Flush()
	}
	return err
}

func statusOf(err error) uint16 {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, pipeline.ErrOutOfRange), errors.Is(err, pipeline.ErrMisaligned):
		return StatusInvalid
	case errors.Is(err, pipeline.ErrNoSpace), errors.Is(err, syscall.ENOSPC):
		return StatusNoSpace
	}
	return StatusIO
}

// maxChecksumRegions bounds one MsgChecksums.
const maxChecksumRegions = 4096

// checksums answers MsgChecksums: Length regions of Flags bytes from
// Offset, each the xxhash64 of its bytes (holes read as zeroes, without
// reading them).
func (s *Service) checksums(e ioengine.Engine, req, resp *Msg) []byte {
	region := int64(req.Flags)
	n := int64(req.Length)
	if region < MinRegion || region > 4<<20 || region&(region-1) != 0 || n <= 0 || n > maxChecksumRegions ||
		req.Offset < 0 || req.Offset%region != 0 || req.Offset >= e.Size() {
		resp.Status = StatusInvalid
		return nil
	}
	out, err := Checksums(e, req.Offset, n, region, nil)
	if err != nil {
		resp.Status = statusOf(err)
		return nil
	}
	return out
}

// Checksums appends to dst the 8-byte checksums of n regions of region
// bytes of e from off (the last may be short at the end of the volume).
// Regions the engine maps as holes are not read.
func Checksums(e ioengine.Engine, off, n, region int64, dst []byte) ([]byte, error) {
	buf := make([]byte, region)
	m, _ := e.(pipeline.Mapper)
	var ext [4]pipeline.Extent
	size := e.Size()
	for i := int64(0); i < n && off < size; i++ {
		l := min(region, size-off)
		hole := false
		if m != nil {
			if xs, err := m.Map(ext[:0], off, l); err == nil && len(xs) == 1 && xs[0].Hole && xs[0].Length == l {
				hole = true
			}
		}
		var sum uint64
		if hole {
			clear(buf[:l])
			sum = xxhash.Sum64(buf[:l])
		} else {
			if _, err := e.ReadAt(buf[:l], off); err != nil {
				return dst, err
			}
			sum = xxhash.Sum64(buf[:l])
		}
		var b [8]byte
		for j := 0; j < 8; j++ {
			b[j] = byte(sum >> (8 * j))
		}
		dst = append(dst, b[:]...)
		off += l
	}
	return dst, nil
}
