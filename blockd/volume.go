package blockd

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
)

// Profiles are the io_profile values a volume may carry.
var Profiles = []string{"auto", "db", "db_remote", "sequential", "random", "journal", "none"}

// DefaultBlockSize is the block size volumes advertise to clients and the
// kernel.
const DefaultBlockSize = 4096

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// Errors the control API maps to status codes.
var (
	ErrInvalid  = errors.New("invalid argument")
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrConflict = errors.New("conflict")
)

// Spec is a volume's persistent metadata: the JSON stored in
// STATE/volumes/NAME.json.
type Spec struct {
	Name      string     `json:"name"`
	Size      int64      `json:"size"`
	BlockSize uint32     `json:"block_size"`
	Engine    string     `json:"engine"`
	Profile   string     `json:"profile"`
	ReadOnly  bool       `json:"read_only,omitempty"`
	QoS       qos.Limits `json:"qos"`
	CreatedAt time.Time  `json:"created_at"`
	// Attachment is set while the volume is a kernel block device.
	Attachment *Attachment `json:"attachment,omitempty"`
}

// validate checks a spec and fills in defaults.
func (s *Spec) validate() error {
	if !nameRE.MatchString(s.Name) {
		return fmt.Errorf("%w: volume name %q: want 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit", ErrInvalid, s.Name)
	}
	if s.BlockSize == 0 {
		s.BlockSize = DefaultBlockSize
	}
	if s.BlockSize != DefaultBlockSize {
		return fmt.Errorf("%w: block size %d: only %d is supported", ErrInvalid, s.BlockSize, DefaultBlockSize)
	}
	if s.Size <= 0 {
		return fmt.Errorf("%w: size %d: must be positive", ErrInvalid, s.Size)
	}
	if s.Size%int64(s.BlockSize) != 0 {
		return fmt.Errorf("%w: size %s is not a multiple of the block size %d", ErrInvalid, FormatSize(s.Size), s.BlockSize)
	}
	if s.Engine == "" {
		s.Engine = ioengine.KindFile
	}
	if !slices.Contains(ioengine.Kinds, s.Engine) {
		return fmt.Errorf("%w: unknown engine %q (want one of %v)", ErrInvalid, s.Engine, ioengine.Kinds)
	}
	if err := s.QoS.Validate(); err != nil {
		return fmt.Errorf("%w: qos: %w", ErrInvalid, err)
	}
	if s.Profile == "" {
		s.Profile = "auto"
	}
	if !slices.Contains(Profiles, s.Profile) {
		return fmt.Errorf("%w: unknown io_profile %q (want one of %v)", ErrInvalid, s.Profile, Profiles)
	}
	return nil
}

// Volume is an open volume: its metadata, engine and request pipeline. It
// is the Export the frontends serve.
type Volume struct {
	name   string
	engine ioengine.Engine
	pipe   pipeline.Handler
	prof   *profile.Stage // the io_profile stage in pipe (see profile.go)
	qos    *qos.VolumeQoS // nil when QoS is disabled

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
	// kernelLive is set while a kernel device of this daemon serves the
	// volume (attached, or reconnected after a restart).
	kernelLive atomic.Bool

	mu   sync.Mutex // guards spec
	spec Spec
}

// Name returns the volume's name.
func (v *Volume) Name() string { return v.name }

// Spec returns a copy of the volume's metadata.
func (v *Volume) Spec() Spec {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.spec
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
	if !v.inMemory || r.Op != pipeline.OpWrite {
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
func (v *Volume) Size() int64 { return v.engine.Size() }

// ReadOnly reports whether writes are refused.
func (v *Volume) ReadOnly() bool { return v.readOnly.Load() }

// Description is shown to NBD clients that ask for it.
func (v *Volume) Description() string {
	s := v.Spec()
	return fmt.Sprintf("blockd volume %s (%s, engine %s, profile %s)", s.Name, FormatSize(s.Size), s.Engine, s.Profile)
}

// MinBlockSize is 1: every engine takes byte-granular requests.
func (v *Volume) MinBlockSize() uint32 { return 1 }

// PreferredBlockSize is the volume's block size.
func (v *Volume) PreferredBlockSize() uint32 { return v.Spec().BlockSize }

// close waits for in-flight requests, makes the data durable and closes the
// engine. Later requests fail with ErrShutdown.
func (v *Volume) close() error {
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
	ferr := errors.Join(perr, v.engine.Flush())
	cerr := v.engine.Close()
	return errors.Join(ferr, cerr)
}

// readOnlyStage refuses write-type requests on read-only volumes, whatever
// the frontend checked.
func readOnlyStage(v *Volume) pipeline.Stage {
	return func(next pipeline.Handler) pipeline.Handler {
		return pipeline.HandlerFunc(func(ctx context.Context, r *pipeline.Request) error {
			switch r.Op {
			case pipeline.OpWrite, pipeline.OpTrim, pipeline.OpWriteZeroes:
				if v.ReadOnly() {
					return pipeline.ErrReadOnly
				}
			}
			return next.Handle(ctx, r)
		})
	}
}
