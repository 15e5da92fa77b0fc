// Package pipeline defines the one request type that every frontend (nbd,
// ublk) produces and the Handler and Stage interfaces through which requests
// flow to the backing store:
//
//	frontend -> qos -> profile -> encryption -> replication -> ioengine
//
// Frontends know nothing about the stages; a stage is a Handler that wraps
// the next Handler, the way bufio wraps an io.Reader. Handlers are called
// concurrently from many goroutines and must not retain the Request or its
// buffer after Handle returns.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"syscall"
)

// Op is the kind of a request.
type Op uint8

// Request kinds. The zero Op is invalid so that a forgotten assignment fails.
const (
	OpRead Op = iota + 1
	OpWrite
	OpFlush
	OpTrim
	OpWriteZeroes
	OpCache // advisory: bring a range into cache; a no-op is a valid implementation
)

var opNames = [...]string{"invalid", "read", "write", "flush", "trim", "write_zeroes", "cache"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Flags modify a request.
type Flags uint8

const (
	// FlagFUA asks that a write be on stable storage before it completes.
	FlagFUA Flags = 1 << iota
	// FlagNoHole asks WriteZeroes to allocate rather than punch a hole.
	FlagNoHole
	// FlagRef, on an OpRead, lets the handler answer by reference (see
	// Request.Ref) instead of copying into Buf. A frontend sets it when it
	// can send Ref; a stage that needs the data in Buf (to read or change
	// it after the next handler returns) must clear it before passing the
	// request on. The daemon keeps it only on pipelines that pass reads
	// through unchanged.
	FlagRef
	// FlagAdmitted says QoS already let the request through (a frontend
	// asked before running it on its own thread, see qos.VolumeQoS.TryAdmit):
	// the QoS stage clears it and passes the request on without waiting.
	FlagAdmitted
)

// Request is one block I/O. Frontends own Requests and their buffers (they
// come from pools); a Handler may read and write Buf only until it returns.
type Request struct {
	Op     Op
	Flags  Flags
	Offset int64
	Length uint32
	// Buf is the data for OpWrite and the destination for OpRead, with
	// len(Buf) == Length. It is nil for every other op.
	Buf []byte
	// Ref is where a handler answers an OpRead that carries FlagRef
	// without copying: it appends, in order, slices of the engine's own
	// memory that hold the Length bytes, and leaves Buf alone. It never
	// appends past cap(Ref) (the frontend provides the room; a handler
	// without enough fills Buf instead), so an empty Ref after success
	// means the data is in Buf. The slices stay valid while referenced,
	// but they are live: a write that completes later changes them. The
	// frontend therefore copies them out (sends them) before it replies,
	// and a read overlapping a write that is in flight at the same time
	// may see any mix of old and new data, which NBD and the block layer
	// leave undefined anyway. A read still sees every write that
	// completed before it was received.
	Ref [][]byte
}

// Extent is a run of a volume's bytes as a block-status query sees it
// (NBD_CMD_BLOCK_STATUS with the base:allocation context).
type Extent struct {
	Length int64
	// Hole: the run has no storage allocated and reads as zeroes. A run
	// that is allocated may hold zeroes too; Hole is never set for data.
	Hole bool
}

// Mapper is implemented by engines and volumes that can tell which of
// their ranges are allocated. Map appends to dst, in order, extents that
// cover [off, off+n) from off onwards: at least one when n > 0, none
// longer than the rest of the range, and at most cap(dst)-len(dst), so it
// may stop short of off+n (the caller asks again for the rest). The answer
// may be out of date by the time it returns for ranges written or
// trimmed concurrently, but a write that completed before Map was called
// is never reported as a hole.
type Mapper interface {
	Map(dst []Extent, off, n int64) ([]Extent, error)
}

// AppendExtent appends to dst a run of length bytes, merging it into the
// last extent when that is of the same kind. It reports false, leaving dst
// alone, when a new extent would not fit in cap(dst).
func AppendExtent(dst []Extent, length int64, hole bool) ([]Extent, bool) {
	if length <= 0 {
		return dst, true
	}
	if k := len(dst); k > 0 && dst[k-1].Hole == hole {
		dst[k-1].Length += length
		return dst, true
	}
	if len(dst) == cap(dst) {
		return dst, false
	}
	return append(dst, Extent{Length: length, Hole: hole}), true
}

// End returns the first byte past the request.
func (r *Request) End() int64 { return r.Offset + int64(r.Length) }

// Handler performs requests. Handle returns only when the request is done:
// for a write, when the data is in the engine (and on stable storage if
// FlagFUA is set); for a flush, when every write that completed before the
// flush was issued is on stable storage. Handle is safe for concurrent use.
type Handler interface {
	Handle(ctx context.Context, r *Request) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, r *Request) error

// Handle calls f(ctx, r).
func (f HandlerFunc) Handle(ctx context.Context, r *Request) error { return f(ctx, r) }

// Stage wraps the next Handler in the pipeline with behaviour of its own.
type Stage func(next Handler) Handler

// Chain builds a pipeline ending in last: Chain(e, a, b) handles a request
// with a, which passes it to b, which passes it to e.
func Chain(last Handler, stages ...Stage) Handler {
	h := last
	for i := len(stages) - 1; i >= 0; i-- {
		h = stages[i](h)
	}
	return h
}

// Typed errors that stages and engines return. Frontends map them to the
// numeric code of their wire with Errno; nothing parses error strings.
var (
	// ErrOutOfRange: the request reaches past the end of the volume.
	ErrOutOfRange = errors.New("request out of range")
	// ErrTooLarge: the request is longer than the maximum the volume takes.
	ErrTooLarge = errors.New("request too large")
	// ErrMisaligned: offset or length is not a multiple of the block size.
	ErrMisaligned = errors.New("request misaligned")
	// ErrReadOnly: a write-type request on a read-only volume.
	ErrReadOnly = errors.New("volume is read-only")
	// ErrNotSupported: the op is not implemented by this volume.
	ErrNotSupported = errors.New("operation not supported")
	// ErrNoSpace: the backing store is full.
	ErrNoSpace = errors.New("no space left on backing store")
	// ErrShutdown: the volume or daemon is closing.
	ErrShutdown = errors.New("shutting down")
)

// Errno maps an error from a Handler to the errno that goes on the wire.
// Unknown errors are EIO: the request failed, the connection lives on.
func Errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	switch {
	case errors.Is(err, ErrOutOfRange), errors.Is(err, ErrMisaligned):
		return syscall.EINVAL
	case errors.Is(err, ErrTooLarge):
		return syscall.EOVERFLOW
	case errors.Is(err, ErrReadOnly):
		return syscall.EPERM
	case errors.Is(err, ErrNotSupported):
		return syscall.EOPNOTSUPP
	case errors.Is(err, ErrNoSpace):
		return syscall.ENOSPC
	case errors.Is(err, ErrShutdown), errors.Is(err, context.Canceled):
		return syscall.ESHUTDOWN
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.EPERM, syscall.EIO, syscall.ENOMEM, syscall.EINVAL,
			syscall.ENOSPC, syscall.EOVERFLOW, syscall.EOPNOTSUPP, syscall.ESHUTDOWN:
			return errno
		case syscall.EDQUOT, syscall.EFBIG:
			return syscall.ENOSPC
		}
	}
	return syscall.EIO
}

// ReadOnly is the stage that refuses write-type requests (write, trim,
// write-zeroes) with ErrReadOnly while readOnly reports true, whatever the
// frontend checked: a volume switched to read-only takes effect at once on
// connections that negotiated read-write.
func ReadOnly(readOnly func() bool) Stage {
	return func(next Handler) Handler {
		return HandlerFunc(func(ctx context.Context, r *Request) error {
			switch r.Op {
			case OpWrite, OpTrim, OpWriteZeroes:
				if readOnly() {
					return ErrReadOnly
				}
			}
			return next.Handle(ctx, r)
		})
	}
}
