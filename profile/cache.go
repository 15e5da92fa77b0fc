package profile

import (
	"context"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/pipeline"
)

// segSize is the unit of prefetch: segments cover aligned 1 MiB ranges.
const (
	segSize  = 1 << 20
	pageSize = 4096
	segPages = segSize / pageSize
)

type segState uint8

const (
	segLoading segState = iota
	segValid
)

// segment is one prefetched range [off, off+len(data)).
type segment struct {
	off   int64
	data  []byte // segSize buffer from the budget, len is what was read
	state segState
	stale bool // a write overlapped it while it was loading: drop it
	use   uint64
	read  [segPages / 64]uint64 // pages a reader copied out
}

// cache holds prefetched segments. Reads copy out of valid segments and
// wait for loading ones; every write, trim and drained buffer invalidates
// the segments it overlaps after it reached the engine, and a segment
// that was loading at that moment is dropped when it arrives, so the cache
// never returns data older than a completed write.
//
// Writers skip invalidate while count is 0 (nonEmpty), so a segment must
// be in segs, and count say so, before a worker starts its engine read:
// schedule publishes it and only then hands it to a worker. A writer that
// loaded count 0 after its engine write did so before the segment was
// published, hence before its read began, and the read sees the write; a
// writer that loads a later count takes mu in invalidate and finds the
// segment. Handing the segment over first would leave a moment in which a
// worker reads the old data, the write completes, the writer sees count 0
// and the old data becomes valid.
//
// Segment buffers come from the budget. Dropped segments, buffer and all,
// wait in free for reuse; the ticker gives them and the valid segments
// back once the cache has been idle for a while (idle), Close gives back
// everything (release).
type cache struct {
	s      *Stage
	max    int // segments
	budget *Budget

	mu    sync.Mutex
	cond  sync.Cond // a segment finished loading
	segs  map[int64]*segment
	free  []*segment // not in segs; each with its buffer
	clock uint64
	quit  bool

	jobs chan *segment
	// handoff, if set (tests only), runs right after a segment was
	// handed to a worker, with mu held: it stretches the moment between
	// the worker starting its engine read and schedule returning.
	handoff func()

	count      atomic.Int32 // len(segs)
	held       atomic.Int32 // segments with a buffer: len(segs) + len(free)
	prefetched atomic.Uint64
	hits       atomic.Uint64
	unread     atomic.Uint64

	// The ticker's (idle): hits+prefetched when it last changed, and when.
	seen     uint64
	activeAt time.Time
}

func (c *cache) init(s *Stage, limit int64, b *Budget) {
	c.s = s
	c.budget = b
	c.max = max(2, int(limit/segSize))
	c.segs = make(map[int64]*segment, c.max)
	c.cond.L = &c.mu
	c.jobs = make(chan *segment, c.max)
}

func (c *cache) nonEmpty() bool { return c.count.Load() > 0 }

// schedule queues prefetch of the segments covering [from, to) that are
// not cached yet, evicting the least recently used valid segments.
func (c *cache) schedule(from, to int64) {
	size := c.s.opts.Size()
	to = min(to, size)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.quit {
		return
	}
	for off := from &^ (segSize - 1); off < to; off += segSize {
		if _, ok := c.segs[off]; ok {
			continue
		}
		if len(c.segs) >= c.max && !c.evictLocked(false) {
			return
		}
		seg := c.segmentLocked()
		if seg == nil {
			return // the budget is spent: prefetch less
		}
		seg.off, seg.state = off, segLoading
		seg.data = seg.data[:min(segSize, size-off)]
		// Visible before a worker can start reading: see the type's
		// comment for why writers depend on it.
		c.segs[off] = seg
		c.count.Store(int32(len(c.segs)))
		select {
		case c.jobs <- seg:
			if c.handoff != nil {
				c.handoff()
			}
		default: // cannot happen (jobs holds c.max); prefetch less
			c.dropLocked(seg)
			return
		}
	}
}

// segmentLocked returns an unused segment with a buffer: a free one, a
// new one from the budget or, when the budget is spent, one whose data a
// reader consumed already. It returns nil if there is none of these.
func (c *cache) segmentLocked() *segment {
	if len(c.free) == 0 {
		if buf := c.budget.alloc(segSize); buf != nil {
			c.held.Add(1)
			return &segment{data: buf}
		}
		// Evicting data nobody read yet, to prefetch what will be read
		// after it, would only trade the nearer for the farther.
		if !c.evictLocked(true) {
			return nil
		}
	}
	n := len(c.free)
	seg := c.free[n-1]
	c.free[n-1] = nil
	c.free = c.free[:n-1]
	return seg
}

// evictLocked drops the least useful valid segment, if there is one (with
// consumedOnly, one a reader copied from), and reports whether it did.
func (c *cache) evictLocked(consumedOnly bool) bool {
	// Segments a reader already consumed go first, oldest first; then
	// the oldest prefetched ones.
	var victim *segment
	victimRead := false
	for _, seg := range c.segs {
		if seg.state != segValid {
			continue
		}
		read := seg.read != [segPages / 64]uint64{}
		if consumedOnly && !read {
			continue
		}
		if victim == nil || (read && !victimRead) || (read == victimRead && seg.use < victim.use) {
			victim, victimRead = seg, read
		}
	}
	if victim == nil {
		return false
	}
	c.dropLocked(victim)
	return true
}

func (seg *segment) unreadBytes() uint64 {
	readPages := 0
	for _, w := range seg.read {
		readPages += bits.OnesCount64(w)
	}
	return uint64(max(0, len(seg.data)-readPages*pageSize))
}

// unreadNow is unread plus what the segments in the cache hold unread.
func (c *cache) unreadNow() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.unread.Load()
	for _, seg := range c.segs {
		if seg.state == segValid {
			n += seg.unreadBytes()
		}
	}
	return n
}

// dropLocked removes seg from segs; its buffer goes to free. A loading
// segment is dropped only by its worker or once the workers stopped, so
// nothing else still refers to it.
func (c *cache) dropLocked(seg *segment) {
	if seg.state == segValid {
		c.unread.Add(seg.unreadBytes())
	}
	delete(c.segs, seg.off)
	c.count.Store(int32(len(c.segs)))
	*seg = segment{data: seg.data[:segSize]}
	if len(c.free) < c.max {
		c.free = append(c.free, seg)
		return
	}
	c.budget.free(seg.data)
	c.held.Add(-1)
}

// worker loads scheduled segments until ctx ends.
func (c *cache) worker(ctx context.Context, wg *sync.WaitGroup) {
	defer wg.Done()
	var req pipeline.Request
	for {
		select {
		case <-ctx.Done():
			return
		case seg := <-c.jobs:
			req = pipeline.Request{Op: pipeline.OpRead, Offset: seg.off, Length: uint32(len(seg.data)), Buf: seg.data}
			err := c.s.next.Handle(ctx, &req)
			req.Buf = nil
			c.mu.Lock()
			if err != nil || seg.stale || c.quit {
				c.dropLocked(seg)
			} else {
				seg.state = segValid
				seg.read = [segPages / 64]uint64{}
				c.clock++
				seg.use = c.clock
				c.prefetched.Add(uint64(len(seg.data)))
			}
			c.cond.Broadcast()
			c.mu.Unlock()
		}
	}
}

// read serves r from the cache if every byte of it is cached, waiting for
// segments still loading. It reports whether it did.
func (c *cache) read(r *pipeline.Request) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		ready := true
		for off := r.Offset &^ (segSize - 1); off < r.End(); off += segSize {
			seg, ok := c.segs[off]
			if !ok || (seg.state == segValid && seg.end() < min(r.End(), off+segSize)) {
				return false
			}
			if seg.state == segLoading {
				ready = false
				break
			}
		}
		if ready {
			break
		}
		if c.quit {
			return false
		}
		c.cond.Wait()
	}
	c.clock++
	for off := r.Offset &^ (segSize - 1); off < r.End(); off += segSize {
		seg := c.segs[off]
		lo, hi := max(off, r.Offset), min(seg.end(), r.End())
		copy(r.Buf[lo-r.Offset:hi-r.Offset], seg.data[lo-off:hi-off])
		for pg := (lo - off) / pageSize; pg < (hi-off+pageSize-1)/pageSize; pg++ {
			seg.read[pg/64] |= 1 << (pg % 64)
		}
		seg.use = c.clock
	}
	c.hits.Add(uint64(r.Length))
	return true
}

// holds reports whether every byte of [off, end) is in valid segments, so
// that read would copy it out without waiting.
func (c *cache) holds(off, end int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for so := off &^ (segSize - 1); so < end; so += segSize {
		seg, ok := c.segs[so]
		if !ok || seg.state != segValid || seg.end() < min(end, so+segSize) {
			return false
		}
	}
	return true
}

func (seg *segment) end() int64 { return seg.off + int64(len(seg.data)) }

// invalidate drops cached data in [off, end): call it after the write
// that changed the range completed.
func (c *cache) invalidate(off, end int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for so := off &^ (segSize - 1); so < end; so += segSize {
		seg, ok := c.segs[so]
		if !ok {
			continue
		}
		if seg.state == segLoading {
			seg.stale = true
			continue
		}
		c.dropLocked(seg)
	}
}

// clear drops every valid segment (loading ones are dropped on arrival).
func (c *cache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, seg := range c.segs {
		if seg.state == segLoading {
			seg.stale = true
			continue
		}
		c.dropLocked(seg)
	}
}

// close wakes readers waiting for segments; the workers stop on the
// stage's context.
func (c *cache) close() {
	c.mu.Lock()
	c.quit = true
	c.cond.Broadcast()
	c.mu.Unlock()
}

// idle runs on the ticker: once nobody has read from the cache or
// prefetched into it for after, it gives its memory back (release). A
// stream that pauses longer loses its prefetched data; it costs one
// prefetch window when it resumes.
func (c *cache) idle(now time.Time, after time.Duration) {
	if n := c.hits.Load() + c.prefetched.Load(); n != c.seen || c.activeAt.IsZero() {
		c.seen, c.activeAt = n, now
		return
	}
	if c.held.Load() > 0 && now.Sub(c.activeAt) >= after {
		c.release(false)
	}
}

// release drops the valid segments and unmaps them and the free ones,
// giving their memory back to the budget and the system. Loading segments
// stay unless all is set, which only Close may do, once the workers have
// stopped.
func (c *cache) release(all bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if all {
		for len(c.jobs) > 0 {
			<-c.jobs // segments no worker took: they are in segs too
		}
	}
	for _, seg := range c.segs {
		if seg.state == segValid || all {
			c.dropLocked(seg)
		}
	}
	for _, seg := range c.free {
		c.budget.free(seg.data)
		c.held.Add(-1)
	}
	clear(c.free)
	c.free = c.free[:0]
}

// memory returns the bytes the cache holds from the budget.
func (c *cache) memory() int64 { return int64(c.held.Load()) * segSize }
