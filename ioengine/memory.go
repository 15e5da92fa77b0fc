package ioengine

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/pipeline"
)

// memChunk is the unit of allocation of the memory engine: untouched chunks
// cost no memory and read as zeroes.
const memChunk = 1 << 20

type chunk struct {
	mu   sync.RWMutex
	data []byte // nil until first written
}

// Memory is an engine that keeps the volume in RAM, allocated lazily in
// 1 MiB chunks. It is for benchmarks and ephemeral volumes: nothing survives
// Close.
type Memory struct {
	size   atomic.Int64
	chunks atomic.Pointer[[]*chunk]
	grow   sync.Mutex // serializes Resize
}

// NewMemory returns an empty memory engine of size bytes.
func NewMemory(size int64) (*Memory, error) {
	if size < 0 {
		return nil, fmt.Errorf("memory engine: negative size %d", size)
	}
	m := &Memory{}
	cs := make([]*chunk, (size+memChunk-1)/memChunk)
	for i := range cs {
		cs[i] = &chunk{}
	}
	m.chunks.Store(&cs)
	m.size.Store(size)
	return m, nil
}

func (m *Memory) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > m.size.Load() {
		return pipeline.ErrOutOfRange
	}
	return nil
}

// each calls fn for every chunk piece of [off, off+n).
func (m *Memory) each(off, n int64, fn func(c *chunk, coff int64, lo, hi int64)) {
	cs := *m.chunks.Load()
	for n > 0 {
		idx := off / memChunk
		coff := off % memChunk
		l := min(n, memChunk-coff)
		fn(cs[idx], coff, off, off+l)
		off += l
		n -= l
	}
}

// ReadAt implements Engine.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	base := off
	m.each(off, int64(len(p)), func(c *chunk, coff, lo, hi int64) {
		dst := p[lo-base : hi-base]
		c.mu.RLock()
		if c.data == nil {
			clear(dst)
		} else {
			copy(dst, c.data[coff:])
		}
		c.mu.RUnlock()
	})
	return len(p), nil
}

// zeroChunk is what unwritten chunks lend to ReadRef. Nothing writes it;
// as untouched zero memory it costs no RAM.
var zeroChunk [memChunk]byte

// ReadRef implements RefReader. A chunk's data array, once allocated, only
// ever holds that chunk's bytes (Trim drops it rather than reusing it), so
// a lent slice never shows another offset's data.
func (m *Memory) ReadRef(dst [][]byte, off int64, n int) ([][]byte, bool) {
	if n <= 0 {
		return dst, true
	}
	first, last := off/memChunk, (off+int64(n)-1)/memChunk
	if int(last-first+1) > cap(dst)-len(dst) {
		return dst, false
	}
	cs := *m.chunks.Load()
	if last >= int64(len(cs)) { // shrunk under the caller's range check
		return dst, false
	}
	for rest := int64(n); rest > 0; {
		c := cs[off/memChunk]
		coff := off % memChunk
		l := min(rest, memChunk-coff)
		c.mu.RLock()
		d := c.data
		c.mu.RUnlock()
		if d == nil {
			d = zeroChunk[:]
		}
		dst = append(dst, d[coff:coff+l:coff+l])
		off += l
		rest -= l
	}
	return dst, true
}

// LendWrite implements WriteLender: it allocates the chunk if needed.
func (m *Memory) LendWrite(off int64, n int) []byte {
	if n <= 0 || m.check(off, int64(n)) != nil || off/memChunk != (off+int64(n)-1)/memChunk {
		return nil
	}
	cs := *m.chunks.Load()
	if off/memChunk >= int64(len(cs)) { // shrunk under the size check
		return nil
	}
	c := cs[off/memChunk]
	coff := off % memChunk
	c.mu.Lock()
	if c.data == nil {
		c.data = make([]byte, memChunk)
	}
	d := c.data[coff : coff+int64(n) : coff+int64(n)]
	c.mu.Unlock()
	return d
}

// WriteAt implements Engine. A piece of p that is already the chunk's own
// memory (lent by LendWrite) is not copied.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	base := off
	m.each(off, int64(len(p)), func(c *chunk, coff, lo, hi int64) {
		src := p[lo-base : hi-base]
		c.mu.Lock()
		if c.data == nil {
			c.data = make([]byte, memChunk)
		}
		if dst := c.data[coff:]; &dst[0] != &src[0] {
			copy(dst, src)
		}
		c.mu.Unlock()
	})
	return len(p), nil
}

// Flush implements Engine; memory is as durable as it gets.
func (m *Memory) Flush() error { return nil }

// Trim implements Engine: whole chunks are freed, partial ones zeroed.
func (m *Memory) Trim(off, length int64) error { return m.zero(off, length, false) }

// WriteZeroes implements Engine.
func (m *Memory) WriteZeroes(off, length int64, noHole bool) error {
	return m.zero(off, length, noHole)
}

func (m *Memory) zero(off, length int64, keep bool) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	m.each(off, length, func(c *chunk, coff, lo, hi int64) {
		c.mu.Lock()
		switch {
		case c.data == nil:
		case hi-lo == memChunk && !keep:
			c.data = nil
		default:
			clear(c.data[coff : coff+hi-lo])
		}
		c.mu.Unlock()
	})
	return nil
}

// Map implements pipeline.Mapper: a chunk never written, or freed whole
// by a trim, is a hole.
func (m *Memory) Map(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
	if err := m.check(off, n); err != nil {
		return dst, err
	}
	cs := *m.chunks.Load()
	for n > 0 {
		c := cs[off/memChunk]
		l := min(n, memChunk-off%memChunk)
		c.mu.RLock()
		hole := c.data == nil
		c.mu.RUnlock()
		var ok bool
		if dst, ok = pipeline.AppendExtent(dst, l, hole); !ok {
			break
		}
		off += l
		n -= l
	}
	return dst, nil
}

// Size implements Engine.
func (m *Memory) Size() int64 { return m.size.Load() }

// Resize implements Engine. Growing keeps the data; shrinking drops the tail.
func (m *Memory) Resize(size int64) error {
	if size < 0 {
		return fmt.Errorf("memory engine: negative size %d", size)
	}
	m.grow.Lock()
	defer m.grow.Unlock()
	old := *m.chunks.Load()
	n := int((size + memChunk - 1) / memChunk)
	cs := make([]*chunk, n)
	copy(cs, old)
	for i := len(old); i < n; i++ {
		cs[i] = &chunk{}
	}
	if size < m.size.Load() {
		m.size.Store(size)
		m.chunks.Store(&cs)
	} else {
		m.chunks.Store(&cs)
		m.size.Store(size)
	}
	return nil
}

// Close implements Engine.
func (m *Memory) Close() error {
	cs := []*chunk{}
	m.size.Store(0)
	m.chunks.Store(&cs)
	return nil
}
