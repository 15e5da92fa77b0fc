package volume

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/encryption"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/units"
)

// Volume is an open volume: its metadata, engine and request pipeline. It
// is the Export the NBD server serves and the Handler a ublk device runs.
type Volume struct {
	name   string
	engine ioengine.Engine
	pipe   pipeline.Handler
	prof   *profile.Stage          // the io_profile stage in pipe (nil on a replica)
	qos    *qos.VolumeQoS          // nil when QoS is disabled, and on a replica
	repl   *replication.Replicator // nil unless the volume is replicated and owned here
	crypt  *encryption.Stage       // nil unless the volume is encrypted (and not a replica here)
	reg    *Registry

	// gate keeps the engine open while requests are in it: Handle holds
	// it shared, close holds it exclusively. Closing the engine under a
	// running pread could hand its fd number to another file.
	gate   sync.RWMutex
	closed bool

	// inMemory: the engine is RAM and the profile stage neither
	// prefetches nor buffers writes (profile.Options.InMemory), so every
	// stage passes reads through unchanged (a read may be answered by
	// reference to engine memory, pipeline.FlagRef) and reads and plain
	// writes never wait for I/O (see Inline).
	inMemory bool

	readOnly atomic.Bool // mirrors spec.ReadOnly for the data path

	// failed, if set, is why the volume could not be opened: it has no
	// engine and no pipeline, serves no I/O and can only be deleted.
	failed string

	metaMu sync.Mutex // held across a metadata change: read, change, persist
	mu     sync.Mutex // guards spec and reason
	spec   api.Spec
	reason string // what the daemon did to the volume at start (SetReason)
}

// newFailed is the registry entry of a volume that could not be opened.
func newFailed(s api.Spec, why string) *Volume {
	return &Volume{name: s.Name, spec: s, failed: why, closed: true}
}

// Failed returns why the volume could not be opened, and whether it
// failed.
func (v *Volume) Failed() (string, bool) { return v.failed, v.failed != "" }

// State returns api.StateOK or api.StateFailed, and the reason the API
// shows with it.
func (v *Volume) State() (state, reason string) {
	if v.failed != "" {
		return api.StateFailed, v.failed
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return api.StateOK, v.reason
}

// Name returns the volume's name.
func (v *Volume) Name() string { return v.name }

// Spec returns a copy of the volume's metadata.
func (v *Volume) Spec() api.Spec {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.spec
}

func (v *Volume) setSpec(s api.Spec) {
	v.mu.Lock()
	v.spec = s
	v.mu.Unlock()
	v.readOnly.Store(s.ReadOnly)
}

// Handle runs a request through the volume's pipeline.
func (v *Volume) Handle(ctx context.Context, r *pipeline.Request) error {
	v.gate.RLock()
	defer v.gate.RUnlock()
	if v.closed {
		return pipeline.ErrShutdown
	}
	if !v.inMemory {
		r.Flags &^= pipeline.FlagRef
	}
	return v.pipe.Handle(ctx, r)
}

// Inline implements nbd.Inliner: the requests that wait for nothing, so
// the NBD reader may run them itself (on a replicated volume, writes wait
// for the replicas: only reads and what the profile stage keeps in its own
// memory qualify).
//
// In detail: the requests that wait for nothing, so
// the NBD reader may run them itself. On a memory volume those are reads
// and plain writes (the profile stage neither buffers nor group-commits
// them, the engine is RAM); on a file volume, what the profile stage says
// it answers without engine I/O (profile.Stage.Inline: reads from its
// prefetch cache, writes into its write-back buffer or, under db, into the
// page cache). Either way QoS must let the request through at once (no
// caps and unlimited capacity, or admitted now by TryAdmit). A request QoS
// would hold back, FUA writes (group commit may wait), flushes and the
// rest go to workers.
func (v *Volume) Inline(r *pipeline.Request) bool {
	if v.crypt != nil && (!v.inMemory || !v.crypt.Inline(r)) {
		// Encryption is CPU work: on the workers it spreads over the
		// cores, on the reader it would hold up the connection. Only a
		// few blocks of a memory volume (the rest below the stage never
		// waits) are cheaper to encrypt here than to hand over.
		return false
	}
	if v.repl != nil && v.inMemory && r.Op != pipeline.OpRead {
		// A replicated write waits for the replicas' answers: on the
		// reader it would hold up every request behind it.
		return false
	}
	if !v.inMemory {
		// A file volume: only what the profile stage answers from its
		// own memory or the page cache.
		if v.prof == nil || !v.prof.Inline(r) {
			return false
		}
	} else {
		switch r.Op {
		case pipeline.OpRead:
		case pipeline.OpWrite:
			if r.Flags&pipeline.FlagFUA != 0 {
				return false
			}
		default:
			return false
		}
	}
	if v.qos == nil || v.qos.Bypassed() {
		return true
	}
	// QoS would let it go now (within caps and capacity, or reserved):
	// admit it here, so that the stage does not wait for it.
	if v.qos.TryAdmit(r.Op == pipeline.OpWrite, int64(r.Length)) {
		r.Flags |= pipeline.FlagAdmitted
		return true
	}
	return false
}

// LendWrite implements nbd.WriteLender: for a write Inline vouched for on
// a memory volume, the engine's own memory for the range (when it lies in
// one chunk), so the payload is received straight into it.
func (v *Volume) LendWrite(r *pipeline.Request) []byte {
	if !v.inMemory || r.Op != pipeline.OpWrite || v.crypt != nil {
		// An encrypted volume's engine memory must only ever hold
		// ciphertext.
		return nil
	}
	l, ok := v.engine.(ioengine.WriteLender)
	if !ok {
		return nil
	}
	return l.LendWrite(r.Offset, int(r.Length))
}

// Map implements pipeline.Mapper, which the NBD server uses to answer
// NBD_CMD_BLOCK_STATUS: the engine's holes and data, with the writes still
// held in the profile stage's write-back buffer laid over them as data.
// The buffer is asked first: a completed write that is no longer there
// when it answers is already in the engine. Engines that cannot tell
// report everything as data.
func (v *Volume) Map(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
	v.gate.RLock()
	defer v.gate.RUnlock()
	if v.closed {
		return dst, pipeline.ErrShutdown
	}
	if off < 0 || n < 0 || off+n > v.engine.Size() {
		return dst, pipeline.ErrOutOfRange
	}
	m, ok := v.engine.(pipeline.Mapper)
	if !ok {
		dst, _ = pipeline.AppendExtent(dst, n, false)
		return dst, nil
	}
	var room [16]profile.Range
	var buffered []profile.Range
	if v.prof != nil {
		buffered = v.prof.Buffered(room[:0], off, off+n)
	}
	if len(buffered) == 0 {
		return m.Map(dst, off, n)
	}
	base := len(dst)
	engine, err := m.Map(dst, off, n)
	if err != nil {
		return dst, err
	}
	return overlayData(dst[:base], slices.Clone(engine[base:]), off, buffered), nil
}

// overlayData appends to dst the extents ext (which start at off) with the
// ranges in data (sorted, disjoint, within the extents) turned to data,
// stopping early, at an extent boundary, when dst is full.
func overlayData(dst, ext []pipeline.Extent, off int64, data []profile.Range) []pipeline.Extent {
	for _, x := range ext {
		end := off + x.Length
		for off < end {
			for len(data) > 0 && data[0].End <= off {
				data = data[1:]
			}
			next, hole := end, x.Hole
			if hole && len(data) > 0 && data[0].Off < end {
				if data[0].Off <= off {
					next, hole = min(data[0].End, end), false
				} else {
					next = data[0].Off
				}
			}
			var ok bool
			if dst, ok = pipeline.AppendExtent(dst, next-off, hole); !ok {
				return dst
			}
			off = next
		}
	}
	return dst
}

// Size returns the volume's current size in bytes.
func (v *Volume) Size() int64 {
	if v.engine == nil {
		return int64(v.Spec().Size)
	}
	return v.engine.Size()
}

// ReadOnly reports whether writes are refused.
func (v *Volume) ReadOnly() bool { return v.readOnly.Load() }

// InMemory reports whether the volume's data lives only in this process:
// it does not survive a restart of the daemon.
func (v *Volume) InMemory() bool { return v.inMemory }

// Description is shown to NBD clients that ask for it.
func (v *Volume) Description() string {
	s := v.Spec()
	return fmt.Sprintf("blockd volume %s (%s, engine %s, profile %s)", s.Name, units.FormatSize(v.Size()), s.Engine, s.Profile)
}

// MinBlockSize is 1: every engine takes byte-granular requests.
func (v *Volume) MinBlockSize() uint32 { return 1 }

// PreferredBlockSize is the volume's block size.
func (v *Volume) PreferredBlockSize() uint32 { return v.Spec().BlockSize }

// EffectiveProfile returns the io_profile in force for the volume.
func (v *Volume) EffectiveProfile() profile.Profile {
	if v.prof == nil {
		return profile.Auto
	}
	return v.prof.Effective()
}

// ProfileStats returns the io_profile stage's counters (nil for a failed
// volume).
func (v *Volume) ProfileStats() *profile.Stats {
	if v.prof == nil {
		return nil
	}
	st := v.prof.Stats()
	return &st
}

// Allocated returns how many bytes of the backing store hold data, and
// whether the engine can tell.
func (v *Volume) Allocated() (int64, bool, error) {
	if v.engine == nil {
		return 0, false, nil
	}
	f, ok := v.engine.(interface{ Allocated() (int64, error) })
	if !ok {
		return 0, false, nil
	}
	n, err := f.Allocated()
	return n, true, err
}

// setProfile applies a changed io_profile to the live volume.
func (v *Volume) setProfile(name string) {
	if p, err := profile.Parse(name); err == nil {
		v.prof.SetProfile(p)
	}
}

// flush makes the volume's completed writes durable, including those in
// the profile stage's write-back buffer.
func (v *Volume) flush() error {
	r := pipeline.Request{Op: pipeline.OpFlush}
	return v.Handle(context.Background(), &r)
}

// Role is the node's role for the volume: "" for a volume that is not
// replicated, api.RoleOwner or api.RoleReplica.
func (v *Volume) Role() string {
	if r := v.Spec().Replication; r != nil {
		return r.Role
	}
	return ""
}

// ReplicaStatus returns the live state of a replicated volume's copies
// (owner only).
func (v *Volume) ReplicaStatus() []api.ReplicaStatus {
	if v.repl == nil {
		return nil
	}
	return v.repl.Status()
}

// close waits for in-flight requests, makes the data durable and closes the
// engine. Later requests fail with ErrShutdown.
func (v *Volume) close() error { return v.shut(true) }

// shut is close; with closeEngine false it leaves the engine open, for a
// volume reopened in another role around the same data.
func (v *Volume) shut(closeEngine bool) error {
	if v.failed != "" {
		return nil // nothing was opened
	}
	// Requests waiting in QoS hold the gate: fail them first, or Lock
	// would wait for their throttle to run out.
	if v.qos != nil {
		v.qos.Close()
	}
	v.gate.Lock()
	defer v.gate.Unlock()
	if v.closed {
		return nil
	}
	v.closed = true
	var perr error
	if v.prof != nil {
		perr = v.prof.Close() // drains its write-back buffer into the engine
	}
	var ferr, rerr error
	if v.repl != nil {
		// The final flush reaches the replicas too.
		r := pipeline.Request{Op: pipeline.OpFlush}
		ferr = errors.Join(perr, v.repl.Handle(context.Background(), &r))
		rerr = v.repl.Close()
	} else {
		ferr = errors.Join(perr, v.engine.Flush())
	}
	var cerr error
	if closeEngine {
		cerr = v.engine.Close()
	}
	return errors.Join(ferr, rerr, cerr)
}
