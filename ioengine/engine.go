// Package ioengine holds the backing stores at the end of the volume
// pipeline: a sparse file (the default) and memory. Every engine passes the
// shared suite in package ioengine/enginetest.
package ioengine

import (
	"context"
	"fmt"

	"github.com/blockd/blockd/pipeline"
)

// Engine is a volume's backing store. Its methods are safe for concurrent
// use; ranges are checked by the caller (see Handler) but engines refuse
// out-of-range I/O too, so nothing is ever written outside the volume.
type Engine interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable.
	Flush() error
	// Trim discards a range; it reads back as zeroes afterwards.
	Trim(off, length int64) error
	// WriteZeroes zeroes a range; with noHole the range stays allocated.
	WriteZeroes(off, length int64, noHole bool) error
	Size() int64
	// Resize grows the store; shrinking is refused by the volume layer.
	Resize(size int64) error
	Close() error
}

// CachedWriter is implemented by engines that can take a write into a
// volatile cache below blockd (the host page cache) instead of the device:
// the write is as visible as any other when it returns and durable after
// the next Flush, which writes the cache back in bulk. The db profile uses
// it so that a group commit's one flush does the device writes of every
// write it covers.
type CachedWriter interface {
	WriteAtCached(p []byte, off int64) (int, error)
}

// CacheDropper is implemented by CachedWriters whose cache can be emptied
// on request: once a volume stops writing through the cache (it left the
// db profile), the pages its writes left behind are a second copy of the
// data that only costs host memory and slows the engine's own writes
// (a direct write first invalidates the cached pages of its range).
// Dropping never loses a write: dirty pages stay until written back.
type CacheDropper interface {
	DropCache() error
}

// FUAWriter is implemented by engines that can make one write durable
// cheaper than WriteAt followed by Flush.
type FUAWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// RefReader is implemented by engines that keep the volume in memory and
// can lend it for a read (pipeline.FlagRef): ReadRef appends to dst slices
// of its memory holding [off, off+n), in order, and reports false, leaving
// dst alone, when that would need more than cap(dst) slices. The range is
// checked by the caller. The slices never alias memory that is reused for
// other offsets, so they stay correct for as long as a frontend needs to
// send them, apart from later writes to the same range (see
// pipeline.Request.Ref).
type RefReader interface {
	ReadRef(dst [][]byte, off int64, n int) ([][]byte, bool)
}

// WriteLender is implemented by engines that keep the volume in memory and
// can take a write's payload in place: LendWrite returns the engine's own
// memory for [off, off+n) when the range lies in one allocation unit (nil
// otherwise, or for a range outside the volume). A frontend reads the
// payload straight into it and then passes that slice to WriteAt as
// usual, which recognises its own memory and skips the copy; if the memory
// was dropped meanwhile (a concurrent Trim), WriteAt copies from it. The
// bytes land before the write completes, so a read of the same range in
// flight at the same time may see them early: overlapping requests in
// flight have no defined order (see pipeline.Request.Ref).
type WriteLender interface {
	LendWrite(off int64, n int) []byte
}

// Kinds of engine, as stored in volume metadata.
const (
	KindFile   = "file"
	KindMemory = "memory"
)

// Kinds lists the engine kinds Open accepts.
var Kinds = []string{KindFile, KindMemory}

// Open opens (creating if needed) the engine of kind at path with size.
// The memory engine ignores path. File engines bypass the page cache
// (O_DIRECT where the filesystem allows it): the volume pipeline does its
// own caching, and a second copy in the host page cache would make its
// prefetch and write-back decisions meaningless. The one exception is
// CachedWriter, which the db profile uses for writes that a group flush
// writes back in bulk.
func Open(kind, path string, size int64) (Engine, error) {
	switch kind {
	case KindFile, "":
		return OpenFileWith(path, size, OpenFileOptions{Direct: true})
	case KindMemory:
		return NewMemory(size)
	}
	return nil, fmt.Errorf("unknown engine %q (want one of %v)", kind, Kinds)
}

// Reopen opens the existing engine of a volume that was created before:
// for the file engine, a missing or shortened backing file is an error
// (os.ErrNotExist, ErrTruncated), never a new empty one. A memory engine
// starts empty (its data never outlives the process).
func Reopen(kind, path string, size int64) (Engine, error) {
	switch kind {
	case KindFile, "":
		return OpenFileWith(path, size, OpenFileOptions{Direct: true, MustExist: true})
	case KindMemory:
		return NewMemory(size)
	}
	return nil, fmt.Errorf("unknown engine %q (want one of %v)", kind, Kinds)
}

// Handler returns the pipeline Handler that ends every pipeline: it checks
// the range and performs the request on e.
func Handler(e Engine) pipeline.Handler {
	h := &handler{e: e}
	h.fua, _ = e.(FUAWriter)
	h.ref, _ = e.(RefReader)
	return h
}

type handler struct {
	e   Engine
	fua FUAWriter
	ref RefReader
}

func (h *handler) Handle(_ context.Context, r *pipeline.Request) error {
	if r.Offset < 0 || r.End() > h.e.Size() {
		return pipeline.ErrOutOfRange
	}
	switch r.Op {
	case pipeline.OpRead:
		if r.Flags&pipeline.FlagRef != 0 && h.ref != nil {
			if refs, ok := h.ref.ReadRef(r.Ref[:0], r.Offset, int(r.Length)); ok {
				r.Ref = refs
				return nil
			}
		}
		_, err := h.e.ReadAt(r.Buf[:r.Length], r.Offset)
		return err
	case pipeline.OpWrite:
		if r.Flags&pipeline.FlagFUA != 0 {
			if h.fua != nil {
				_, err := h.fua.WriteAtFUA(r.Buf[:r.Length], r.Offset)
				return err
			}
			if _, err := h.e.WriteAt(r.Buf[:r.Length], r.Offset); err != nil {
				return err
			}
			return h.e.Flush()
		}
		_, err := h.e.WriteAt(r.Buf[:r.Length], r.Offset)
		return err
	case pipeline.OpFlush:
		return h.e.Flush()
	case pipeline.OpTrim:
		if err := h.e.Trim(r.Offset, int64(r.Length)); err != nil {
			return err
		}
	case pipeline.OpWriteZeroes:
		if err := h.e.WriteZeroes(r.Offset, int64(r.Length), r.Flags&pipeline.FlagNoHole != 0); err != nil {
			return err
		}
	case pipeline.OpCache:
		return nil
	default:
		return pipeline.ErrNotSupported
	}
	if r.Flags&pipeline.FlagFUA != 0 {
		return h.e.Flush()
	}
	return nil
}
