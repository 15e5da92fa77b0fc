package profile

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/pipeline"
)

// slabSize is the capacity of one buffered extent. Adjacent extents are
// written to the engine as one request (up to drainMax) when drained.
const (
	slabSize = 128 << 10
	drainMax = 1 << 20
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
//
// Slabs and the merge buffer come from the stage's budget. A write the
// budget has no slab for is not buffered: the stage writes it through.
// Drained slabs wait in free for reuse until the buffer has been idle for
// a while (idle) or the stage closes (release).
type writeBack struct {
	s     *Stage
	limit int // extents (slabs) at most

	mu     sync.RWMutex
	ext    []extent
	free   [][]byte // slabs to reuse
	oldest time.Time
	req    pipeline.Request // the drain's engine write
	merge  []byte           // drainMax buffer that joins adjacent extents, or nil

	count       atomic.Int32 // len(ext), read without the lock
	slabs       atomic.Int32 // slabs held: in ext or free
	merging     atomic.Bool  // merge is held
	bytes       atomic.Int64
	buffered    atomic.Uint64
	drainWrites atomic.Uint64

	// The ticker's (idle): buffered+drainWrites when it last changed,
	// and when.
	seen     uint64
	activeAt time.Time
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

// slab returns an empty slab: a free one, or a new one from the budget;
// nil when the budget is spent.
func (w *writeBack) slab() []byte {
	if n := len(w.free); n > 0 {
		b := w.free[n-1]
		w.free[n-1] = nil
		w.free = w.free[:n-1]
		return b[:0]
	}
	if b := w.s.opts.Budget.alloc(slabSize); b != nil {
		w.slabs.Add(1)
		return b[:0]
	}
	return nil
}

// recycle keeps a drained slab for reuse, or gives it back.
func (w *writeBack) recycle(b []byte) {
	if len(w.free) < w.limit {
		w.free = append(w.free, b[:0])
		return
	}
	w.s.opts.Budget.free(b)
	w.slabs.Add(-1)
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

// put buffers a write of at most slabSize bytes. Overlapped buffered bytes
// are overwritten in place; the rest extends the extent that ends where it
// starts or goes into new extents. It reports false, buffering nothing, if
// the budget has no slab for it: the caller writes it through.
//
// Such a write needs at most one new slab, so put secures one before it
// changes anything. Only the gap at the start of the write (or after the
// extent the write starts in) can lack room: an extent that lies wholly
// inside the write is at most slabSize minus the gap after it long, so it
// has room for that gap.
func (w *writeBack) put(ctx context.Context, r *pipeline.Request) (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.free) == 0 {
		b := w.slab()
		if b == nil {
			return false, nil
		}
		w.free = append(w.free, b)
	}
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
		b := w.slab()
		if b == nil {
			// Cannot happen (see above); if it did, the budget would
			// run over by a slab rather than the write fail half done.
			b = w.s.opts.Budget.allocOver(slabSize)[:0]
			w.slabs.Add(1)
		}
		w.ext = slices.Insert(w.ext, i, extent{off: pos, buf: append(b, p[:n]...)})
		w.count.Store(int32(len(w.ext)))
		w.bytes.Add(int64(n))
		p, pos = p[n:], pos+int64(n)
		i++
	}
	w.buffered.Add(1)
	if len(w.ext) > w.limit {
		return true, w.drainLocked(ctx)
	}
	return true, nil
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
	return len(w.ext)+int((end-off+slabSize-1)/slabSize) <= w.limit &&
		(len(w.free) > 0 || w.s.opts.Budget.room(slabSize))
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
		// A run of adjacent extents, at most drainMax bytes, if the
		// budget has room for the buffer that joins them.
		j := written + 1
		size := len(w.ext[written].buf)
		for j < len(w.ext) && w.ext[j].off == w.ext[j-1].end() && size+len(w.ext[j].buf) <= drainMax {
			size += len(w.ext[j].buf)
			j++
		}
		if j-written > 1 && w.merge == nil {
			if w.merge = w.s.opts.Budget.alloc(drainMax); w.merge == nil {
				j = written + 1
			} else {
				w.merging.Store(true)
			}
		}
		off := w.ext[written].off
		buf := w.ext[written].buf
		if j-written > 1 {
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
			w.recycle(e.buf)
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

// idle runs on the ticker: once the buffer is empty and nothing was put
// or drained for after, it gives its memory back (release).
func (w *writeBack) idle(now time.Time, after time.Duration) {
	if n := w.buffered.Load() + w.drainWrites.Load(); n != w.seen || w.activeAt.IsZero() {
		w.seen, w.activeAt = n, now
		return
	}
	if (w.slabs.Load() > 0 || w.merging.Load()) && !w.nonEmpty() && now.Sub(w.activeAt) >= after {
		w.release()
	}
}

// release unmaps the free slabs and the merge buffer, giving their memory
// back to the budget and the system. Buffered data keeps its slabs: only
// Close, once its drain failed, gives those up too (releaseAll).
func (w *writeBack) release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.releaseLocked()
}

func (w *writeBack) releaseLocked() {
	for _, b := range w.free {
		w.s.opts.Budget.free(b)
		w.slabs.Add(-1)
	}
	clear(w.free)
	w.free = w.free[:0]
	if w.merge != nil {
		w.s.opts.Budget.free(w.merge)
		w.merge = nil
		w.merging.Store(false)
	}
}

// releaseAll gives back everything, buffered data included: the stage is
// closing and its final drain has run.
func (w *writeBack) releaseAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.ext {
		w.bytes.Add(-int64(len(e.buf)))
		w.s.opts.Budget.free(e.buf)
		w.slabs.Add(-1)
	}
	clear(w.ext)
	w.ext = w.ext[:0]
	w.count.Store(0)
	w.releaseLocked()
}

// memory returns the bytes the buffer holds from the budget.
func (w *writeBack) memory() int64 {
	n := int64(w.slabs.Load()) * slabSize
	if w.merging.Load() {
		n += drainMax
	}
	return n
}
