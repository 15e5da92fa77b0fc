package profile

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/pipeline"
)

// groupCommit lets concurrent flushes share engine flushes. A caller needs
// a flush that started after it arrived (one already running may have
// started before its write completed); the first caller to find no flush
// running starts one for everyone waiting, so N concurrent callers cost
// about two engine flushes, not N.
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

	requests atomic.Uint64
	syncs    atomic.Uint64
}

func (g *groupCommit) init(next pipeline.Handler) {
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
	target := g.started + 1
	for g.done < target {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		g.started++
		gen := g.started
		g.mu.Unlock()
		g.syncs.Add(1)
		err := g.next.Handle(ctx, &g.req)
		g.mu.Lock()
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
