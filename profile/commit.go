package profile

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/pipeline"
)

// groupCommit lets concurrent flushes share engine flushes.
//
// A FLUSH must not complete before every write that completed before it
// arrived is durable. An engine flush (fdatasync) makes durable every
// write that completed before it started, so what a caller needs is an
// engine flush that started after its last covered write completed, not
// necessarily one that started after the FLUSH itself arrived. The stage
// counts completed writes (every engine write, cached write, trim and
// zeroing, under every profile); an engine flush records the count when it
// starts. A caller that arrives with count w waits for a flush that
// started with a count >= w: one already running if it qualifies,
// otherwise the next one, which it leads as soon as fewer than maxSyncs
// run. So the writers of a batch whose writes all completed before some
// flush started share it, wherever their FLUSHes land, and a FLUSH with
// no write since the last flush costs no engine flush at all.
//
// There is no timed commit delay: the running flush is the gathering
// window. (A sub-millisecond time.Sleep is no bounded wait in Go: an idle
// runtime waits for timers in epoll with millisecond resolution, so the
// old 250µs delay cost about a millisecond per batch.) Measured on ext4
// over virtio, one flush at a time (maxSyncs 1) batched best; more in
// parallel only raised the engine flushes per FLUSH.
type groupCommit struct {
	next pipeline.Handler

	// writes counts completed writes. It starts at 1: data written before
	// the stage opened (a previous daemon's page-cache writes) is covered
	// only by a flush this stage runs.
	writes atomic.Uint64

	mu      sync.Mutex
	cond    sync.Cond
	running int
	inside  int    // callers in flush (tests wait for arrivals on it)
	leading uint64 // the highest count a running engine flush covers
	covered uint64 // the highest count a successful engine flush covers
	// err is the first engine flush failure. It is sticky: every later
	// FLUSH fails too. A failed fdatasync means writes that completed
	// before it (page-cache writes above all, whose own calls succeeded)
	// may be lost, and the kernel reports that to one fdatasync only; a
	// later flush that succeeded would prove nothing about them, and every
	// later FLUSH covers them.
	err      error
	maxSyncs int
	reqs     []pipeline.Request // one per slot
	counts   []uint64           // the count each running slot covers
	free     []int              // idle slots

	requests atomic.Uint64
	syncs    atomic.Uint64
}

func (g *groupCommit) init(next pipeline.Handler, maxSyncs int) {
	g.next = next
	g.writes.Store(1)
	g.maxSyncs = max(1, maxSyncs)
	g.reqs = make([]pipeline.Request, g.maxSyncs)
	g.counts = make([]uint64, g.maxSyncs)
	for i := range g.reqs {
		g.reqs[i] = pipeline.Request{Op: pipeline.OpFlush}
		g.free = append(g.free, i)
	}
	g.cond.L = &g.mu
}

// wrote records a completed write: call it after the engine returned and
// before the request is acknowledged.
func (g *groupCommit) wrote() { g.writes.Add(1) }

// flush returns when every write that completed before the call is
// durable: an engine flush that started after the last of them completed
// has finished. Once an engine flush has failed, it returns that error.
func (g *groupCommit) flush(ctx context.Context) error {
	w := g.writes.Load()
	g.mu.Lock()
	g.inside++
	for g.covered < w && g.err == nil {
		if g.leading >= w || g.running >= g.maxSyncs {
			g.cond.Wait() // a running flush covers w, or the slots are full
			continue
		}
		g.leadLocked(ctx)
	}
	err := g.err
	g.inside--
	g.mu.Unlock()
	return err
}

// leadLocked runs one engine flush covering every write counted now. It
// is called with mu held and a free slot, and returns with mu held.
func (g *groupCommit) leadLocked(ctx context.Context) {
	// It covers every write counted when it starts, not just the
	// caller's: the writes that completed since ride along for the
	// FLUSHes still on their way.
	count := g.writes.Load()
	slot := g.free[len(g.free)-1]
	g.free = g.free[:len(g.free)-1]
	g.counts[slot] = count
	g.leading = max(g.leading, count)
	g.running++
	g.mu.Unlock()
	g.syncs.Add(1)
	err := g.next.Handle(ctx, &g.reqs[slot])
	g.mu.Lock()
	g.free = append(g.free, slot)
	g.running--
	if err != nil {
		if g.err == nil {
			g.err = err
		}
	} else {
		g.covered = max(g.covered, count)
	}
	// leading is the highest count still running: a failed flush must
	// not make later callers wait for it.
	g.counts[slot] = 0
	g.leading = 0
	for _, c := range g.counts {
		g.leading = max(g.leading, c)
	}
	g.cond.Broadcast()
}
