package encryption

import (
	"context"

	"github.com/blockd/blockd/pipeline"
)

// CachedWriter is an engine's page-cache write path
// (ioengine.CachedWriter), which the db profile writes through.
type CachedWriter interface {
	WriteAtCached(p []byte, off int64) (int, error)
}

// Cached puts the stage in front of an engine's page-cache write path, so
// that the db profile's writes, which skip the stages below it, are
// encrypted too. It also passes DropCache on when c has it.
func (s *Stage) Cached(c CachedWriter) *Cached {
	return &Cached{s: s, c: c}
}

// Cached is a page-cache write path behind the encryption stage.
type Cached struct {
	s *Stage
	c CachedWriter
}

// WriteAtCached encrypts whole blocks into a pooled buffer and writes them
// into the page cache. A write that covers part of a block goes the
// stage's own way (read-modify-write, direct to the engine, which keeps
// the page cache coherent): rare, and it needs the exclusive lock anyway.
func (w *Cached) WriteAtCached(p []byte, off int64) (int, error) {
	if len(p) == 0 || off < 0 || !aligned(off, uint32(len(p))) {
		r := pipeline.Request{Op: pipeline.OpWrite, Offset: off, Length: uint32(len(p)), Buf: p}
		if err := w.s.Handle(context.Background(), &r); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	w.s.rmw.RLock()
	defer w.s.rmw.RUnlock()
	b := getBuffer(len(p))
	ct := b.b[:len(p)]
	w.s.x.EncryptBlocks(ct, p, uint64(off/BlockSize))
	n, err := w.c.WriteAtCached(ct, off)
	putBuffer(b)
	return n, err
}

// DropCache empties the page cache below when it can be (see
// ioengine.CacheDropper).
func (w *Cached) DropCache() error {
	if d, ok := w.c.(interface{ DropCache() error }); ok {
		return d.DropCache()
	}
	return nil
}
