package profile

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/blockd/blockd/pipeline"
)

// slabSize is the capacity of one buffered extent. Adjacent extents are
// written to the engine as one request (up to drainMax) when drained.
const (
	slabSize = 128 << 10
	drainMax = 1 << 20
	align    = 4096
)

// extent is buffered data for [off, off+len(buf)). Extents never overlap
// and are kept sorted by offset.
type extent struct {
	off int64
	buf []byte // len is the data, cap is slabSize
}

func (e *extent) end() int64 { return e.off + int64(len(e.buf)) }

// writeBack is the sequential profile's write buffer: small writes are
// copied into extents and written to the engine later, merged, by a FLUSH,
// a FUA write, an overlapping write or trim, the size bound or the age
// bound. Reads overlay it, so it is never observable except as speed.
//
// Locking: mu is held exclusively to change the extents, including for the
// whole of a drain (so no read sees the window where an extent left the
// buffer but its engine write has not finished), and shared by a read that
// overlaps the buffer while it reads the base data and overlays.
type writeBack struct {
	s     *Stage
	limit int // extents (slabs) at most

	mu      sync.RWMutex
	ext     []extent
	free    [][]byte // slabs to reuse
	oldest  time.Time
	req     pipeline.Request // the drain's engine write
	merge   []byte           // aligned drainMax buffer that joins adjacent extents
	lastErr error

	count       atomic.Int32 // len(ext), read without the lock
	bytes       atomic.Int64
	buffered    atomic.Uint64
	drainWrites atomic.Uint64
}

func (w *writeBack) init(s *Stage, limit int64) {
	w.s = s
	w.limit = max(1, int(limit/slabSize))
}

func (w *writeBack) nonEmpty() bool { return w.count.Load() > 0 }

func (w *writeBack) age(now time.Time) time.Duration {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if len(w.ext) == 0 {
		return 0
	}
	return now.Sub(w.oldest)
}

// alignedSlice returns an n-byte slice whose start is 4 KiB aligned, so
// that extents go to an O_DIRECT engine without a bounce.
func alignedSlice(n int) []byte {
	raw := make([]byte, n+align)
	skip := int((align - uintptr(unsafe.Pointer(&raw[0]))%align) % align)
	return raw[skip : skip+n : skip+n]
}

func (w *writeBack) slab() []byte {
	if n := len(w.free); n > 0 {
		b := w.free[n-1]
		w.free = w.free[:n-1]
		return b[:0]
	}
	return alignedSlice(slabSize)[:0]
}

// find returns the index of the first extent that ends after off.
func (w *writeBack) find(off int64) int {
	i, _ := slices.BinarySearchFunc(w.ext, off, func(e extent, off int64) int {
		if e.end() <= off {
			return -1
		}
		return 1
	})
	return i
}

// put buffers a write. Overlapped buffered bytes are overwritten in place;
// the rest extends the extent that ends where it starts or goes into new
// extents.
func (w *writeBack) put(ctx context.Context, r *pipeline.Request) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.ext) == 0 {
		w.oldest = time.Now()
	}
	p := r.Buf[:r.Length]
	pos := r.Offset
	i := w.find(pos)
	for len(p) > 0 {
		if i < len(w.ext) && w.ext[i].off <= pos {
			e := &w.ext[i]
			n := copy(e.buf[pos-e.off:], p)
			p, pos = p[n:], pos+int64(n)
			i++
			continue
		}
		gap := len(p)
		if i < len(w.ext) {
			gap = min(gap, int(w.ext[i].off-pos))
		}
		if i > 0 {
			if e := &w.ext[i-1]; e.end() == pos && len(e.buf) < cap(e.buf) {
				n := min(gap, cap(e.buf)-len(e.buf))
				e.buf = append(e.buf, p[:n]...)
				p, pos = p[n:], pos+int64(n)
				w.bytes.Add(int64(n))
				continue
			}
		}
		n := min(gap, slabSize)
		w.ext = slices.Insert(w.ext, i, extent{off: pos, buf: append(w.slab(), p[:n]...)})
		w.count.Store(int32(len(w.ext)))
		w.bytes.Add(int64(n))
		p, pos = p[n:], pos+int64(n)
		i++
	}
	w.buffered.Add(1)
	if len(w.ext) > w.limit {
		return w.drainLocked(ctx)
	}
	return nil
}

// read serves r if it overlaps the buffer: the base data (cache or
// engine) with the buffered bytes on top. done is false if r does not
// overlap the buffer; the caller reads it normally.
func (w *writeBack) read(ctx context.Context, r *pipeline.Request, p Profile) (done bool, err error) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	i := w.find(r.Offset)
	if i == len(w.ext) || w.ext[i].off >= r.End() {
		return false, nil
	}
	if err := w.s.readBase(ctx, r, p); err != nil {
		return true, err
	}
	for ; i < len(w.ext) && w.ext[i].off < r.End(); i++ {
		e := &w.ext[i]
		lo, hi := max(e.off, r.Offset), min(e.end(), r.End())
		copy(r.Buf[lo-r.Offset:hi-r.Offset], e.buf[lo-e.off:hi-e.off])
	}
	return true, nil
}

// clearOf reports whether nothing buffered overlaps [off, end), so a read
// of it needs no overlay and a write no drain. It does not wait: while the
// buffer is locked (a put or a drain) it says false.
func (w *writeBack) clearOf(off, end int64) bool {
	if !w.mu.TryRLock() {
		return false
	}
	defer w.mu.RUnlock()
	i := w.find(off)
	return i == len(w.ext) || w.ext[i].off >= end
}

// ranges appends to dst the buffered ranges that overlap [off, end),
// clipped to it, adjacent ones joined. Unlike clearOf it waits for the
// lock, so a drain is either over (its data is in the engine) or not
// started (its data is still here) when it answers.
func (w *writeBack) ranges(dst []Range, off, end int64) []Range {
	w.mu.RLock()
	defer w.mu.RUnlock()
	for i := w.find(off); i < len(w.ext) && w.ext[i].off < end; i++ {
		lo, hi := max(w.ext[i].off, off), min(w.ext[i].end(), end)
		if k := len(dst); k > 0 && dst[k-1].End == lo {
			dst[k-1].End = hi
			continue
		}
		dst = append(dst, Range{lo, hi})
	}
	return dst
}

// hasRoom reports whether put could buffer [off, end) without draining:
// even written as new slabs it would stay within the limit. Like clearOf
// it does not wait for the lock.
func (w *writeBack) hasRoom(off, end int64) bool {
	if !w.mu.TryRLock() {
		return false
	}
	defer w.mu.RUnlock()
	return len(w.ext)+int((end-off+slabSize-1)/slabSize) <= w.limit
}

// drainIfOverlap drains the buffer if any of it overlaps [off, end).
func (w *writeBack) drainIfOverlap(ctx context.Context, off, end int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := w.find(off)
	if i == len(w.ext) || w.ext[i].off >= end {
		return nil
	}
	return w.drainLocked(ctx)
}

// drain writes the whole buffer to the engine.
func (w *writeBack) drain(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.drainLocked(ctx)
}

// drainLocked writes every extent to the engine, runs of adjacent extents
// as one write, and empties the buffer. On an engine error the extents not
// yet written stay buffered (reads keep seeing them), the stage records
// the loss (see lost) and the error is returned, so the flush that asked
// for the drain fails, and every later one.
func (w *writeBack) drainLocked(ctx context.Context) error {
	if len(w.ext) == 0 {
		return nil
	}
	written := 0
	var err error
	for written < len(w.ext) {
		// A run of adjacent extents, at most drainMax bytes.
		j := written + 1
		size := len(w.ext[written].buf)
		for j < len(w.ext) && w.ext[j].off == w.ext[j-1].end() && size+len(w.ext[j].buf) <= drainMax {
			size += len(w.ext[j].buf)
			j++
		}
		off := w.ext[written].off
		buf := w.ext[written].buf
		if j-written > 1 {
			if w.merge == nil {
				w.merge = alignedSlice(drainMax)
			}
			n := 0
			for _, e := range w.ext[written:j] {
				n += copy(w.merge[n:], e.buf)
			}
			buf = w.merge[:n]
		}
		w.req = pipeline.Request{Op: pipeline.OpWrite, Offset: off, Length: uint32(len(buf)), Buf: buf}
		err = w.s.next.Handle(ctx, &w.req)
		w.s.gc.wrote()
		if err != nil {
			// The data stays buffered and is tried again, but it was
			// acknowledged and the engine refused it: like a failed
			// flush, no later FLUSH may claim it is safe.
			w.s.lost.set(err)
			break
		}
		w.drainWrites.Add(1)
		if w.s.cache.nonEmpty() {
			w.s.cache.invalidate(off, off+int64(len(buf)))
		}
		for _, e := range w.ext[written:j] {
			w.bytes.Add(-int64(len(e.buf)))
			if len(w.free) < w.limit {
				w.free = append(w.free, e.buf[:0])
			}
		}
		written = j
	}
	w.req.Buf = nil
	clear(w.ext[:written])
	w.ext = append(w.ext[:0], w.ext[written:]...)
	w.count.Store(int32(len(w.ext)))
	if len(w.ext) > 0 {
		w.oldest = time.Now()
	}
	return err
}
