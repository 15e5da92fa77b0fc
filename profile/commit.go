package profile

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

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
// The running flush is the main gathering window, but on its own it
// splits a steady set of committers into halves that take turns: the
// callers a flush releases come back (write, then FLUSH) a round trip
// later, by when the FLUSHes that arrived during that flush have started
// the next one without them. So, like jbd2's batch wait and PostgreSQL's
// commit_delay, the leader of a new flush may first wait for the others:
// when the last engine flush was slow enough for batching to pay
// (gatherMin) and it served more callers (its batch and those that came
// for the next one while it ran) than are waiting now, it waits until
// that many are waiting, or for at most the last flush's duration
// (capped at gatherMax). The arrivals end the wait, not a
// timer, because a sub-millisecond sleep is no bounded wait in Go (an
// idle runtime waits for timers in epoll with millisecond resolution):
// the timer only bounds the wait when a committer has gone away, and the
// next flush then learns the smaller count. One caller never waits, nor
// do callers of a device whose flushes are fast.
//
// Measured on ext4 over virtio, one flush at a time (maxSyncs 1) batched
// best; more in parallel only raised the engine flushes per FLUSH.
type groupCommit struct {
	next pipeline.Handler

	// writes counts completed writes. It starts at 1: data written before
	// the stage opened (a previous daemon's page-cache writes) is covered
	// only by a flush this stage runs.
	writes atomic.Uint64

	mu      sync.Mutex
	cond    sync.Cond
	running int
	inside  int // callers in flush (tests wait for arrivals on it)

	// Batch gathering, see the type's comment.
	gatherMin  time.Duration // gather only after an engine flush this slow
	gatherMax  time.Duration // the longest wait
	gatherCond sync.Cond     // wakes the gathering leader
	gatherWake *time.Timer   // bounds its wait
	gathering  bool          // a leader is gathering: others wait
	lastSync   time.Duration // the last engine flush's duration
	waitNext   int           // callers that need an engine flush not yet started
	batch      int           // waitNext when the running flush started
	crowd      int           // the last flush's batch and the callers that came for the next: whom to wait for
	gathers    atomic.Uint64 // waits that ended with the crowd inside
	gatherOuts atomic.Uint64 // waits the timer ended
	leading    uint64        // the highest count a running engine flush covers
	covered    uint64        // the highest count a successful engine flush covers
	// lost is the stage's: an engine flush failure is recorded there,
	// and once anything is recorded every flush fails with it (see lost).
	lost     *lost
	maxSyncs int
	reqs     []pipeline.Request // one per slot
	counts   []uint64           // the count each running slot covers
	free     []int              // idle slots

	requests atomic.Uint64
	syncs    atomic.Uint64
}

func (g *groupCommit) init(next pipeline.Handler, maxSyncs int, l *lost) {
	g.next = next
	g.lost = l
	g.writes.Store(1)
	g.maxSyncs = max(1, maxSyncs)
	g.reqs = make([]pipeline.Request, g.maxSyncs)
	g.counts = make([]uint64, g.maxSyncs)
	for i := range g.reqs {
		g.reqs[i] = pipeline.Request{Op: pipeline.OpFlush}
		g.free = append(g.free, i)
	}
	g.cond.L = &g.mu
	g.gatherCond.L = &g.mu
	g.gatherMin = 100 * time.Microsecond
	g.gatherMax = time.Millisecond
	g.gatherWake = time.AfterFunc(time.Hour, func() {
		g.mu.Lock()
		g.gatherCond.Signal()
		g.mu.Unlock()
	})
	g.gatherWake.Stop()
}

// close stops the gathering timer (nil before init).
func (g *groupCommit) close() {
	if g.gatherWake != nil {
		g.gatherWake.Stop()
	}
}

// wrote records a completed write: call it after the engine returned and
// before the request is acknowledged.
func (g *groupCommit) wrote() { g.writes.Add(1) }

// flush returns when every write that completed before the call is
// durable: an engine flush that started after the last of them completed
// has finished. Once the stage has lost durability (an engine flush
// failed, among others), it returns that error.
func (g *groupCommit) flush(ctx context.Context) error {
	w := g.writes.Load()
	g.mu.Lock()
	g.inside++
	if g.covered < w && g.leading < w {
		g.waitNext++
		if g.gathering && g.waitNext >= g.crowd {
			g.gatherCond.Signal()
		}
	}
	for g.covered < w && g.lost.get() == nil {
		if g.leading >= w || g.running >= g.maxSyncs || g.gathering {
			g.cond.Wait() // a running flush covers w, the slots are full, or a leader gathers
			continue
		}
		if g.running == 0 && g.crowd > 1 && g.waitNext < g.crowd && g.lastSync >= g.gatherMin {
			g.gatherLocked()
		}
		g.leadLocked(ctx)
	}
	err := g.lost.get()
	g.inside--
	g.mu.Unlock()
	return err
}

// gatherLocked waits, with mu held, until as many callers as the last
// engine flush served wait for a new one, or the wait bound passes.
func (g *groupCommit) gatherLocked() {
	g.gathering = true
	wait := min(g.lastSync, g.gatherMax)
	deadline := time.Now().Add(wait)
	g.gatherWake.Reset(wait)
	for g.waitNext < g.crowd && g.lost.get() == nil {
		if !time.Now().Before(deadline) {
			g.gatherOuts.Add(1)
			break
		}
		g.gatherCond.Wait()
	}
	if g.waitNext >= g.crowd {
		g.gathers.Add(1)
	}
	g.gatherWake.Stop()
	g.gathering = false
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
	// Every caller waiting for a new flush loaded its count before this
	// one: this flush covers them all.
	g.batch, g.waitNext = g.waitNext, 0
	g.running++
	g.mu.Unlock()
	g.syncs.Add(1)
	start := time.Now()
	err := g.next.Handle(ctx, &g.reqs[slot])
	took := time.Since(start)
	g.mu.Lock()
	g.free = append(g.free, slot)
	g.running--
	g.lastSync = took
	if g.running == 0 {
		g.crowd = g.batch + g.waitNext
	}
	if err != nil {
		g.lost.set(err)
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
