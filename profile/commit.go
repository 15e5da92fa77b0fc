package profile

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/pipeline"
)

// groupCommit lets concurrent flushes share engine flushes. A caller needs
// a flush that started after it arrived (one already running may have
// started before its write completed); the first caller to find no flush
// running leads the next one for everyone waiting, so N concurrent callers
// cost about two engine flushes, not N. When the previous flush served
// more than one caller, the leader first waits CommitDelay so that callers
// whose writes are just completing join this flush rather than the next
// (the commit delay of database group commit); a lone flusher never
// waits.
type groupCommit struct {
	next pipeline.Handler
	req  pipeline.Request // the engine flush; only the leader uses it

	mu      sync.Mutex
	cond    sync.Cond
	running bool
	started uint64 // flushes started
	done    uint64 // flushes finished; flushes finish in start order
	failed  uint64 // the last failed flush (0: none)
	err     error  // its error

	// delay is how long a leader gathers more flushers before it starts
	// the engine flush, when the last batch showed concurrency.
	delay     time.Duration
	lastBatch int // flushers the last engine flush served
	waiting   int // flushers waiting for the next engine flush

	requests atomic.Uint64
	syncs    atomic.Uint64
}

func (g *groupCommit) init(next pipeline.Handler, delay time.Duration) {
	g.delay = delay
	g.next = next
	g.req = pipeline.Request{Op: pipeline.OpFlush}
	g.cond.L = &g.mu
}

// flush returns when an engine flush that started after the call began
// has finished: every write that completed before the call is durable. If
// a flush in that span failed, its error is returned: a later success does
// not prove the earlier writes reached stable storage.
func (g *groupCommit) flush(ctx context.Context) error {
	g.mu.Lock()
	// The next flush to start is started+1 whether it is running or being
	// gathered: a flush is counted as started only when it is issued.
	target := g.started + 1
	g.waiting++
	for g.done < target {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		if g.delay > 0 && g.lastBatch > 1 {
			// Concurrent flushers were seen: give the ones whose
			// writes are completing now a moment to join.
			g.mu.Unlock()
			time.Sleep(g.delay)
			g.mu.Lock()
		}
		g.started++
		gen := g.started
		batch := g.waiting
		g.waiting = 0
		g.mu.Unlock()
		g.syncs.Add(1)
		err := g.next.Handle(ctx, &g.req)
		g.mu.Lock()
		g.lastBatch = batch
		g.running = false
		g.done = gen
		if err != nil {
			g.failed, g.err = gen, err
		}
		g.cond.Broadcast()
	}
	var err error
	if g.failed >= target {
		err = g.err
	}
	g.mu.Unlock()
	return err
}
