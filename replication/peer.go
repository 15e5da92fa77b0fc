package replication

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/api"
)

// peer is one replica of a volume, seen from its owner.
type peer struct {
	r     *Replicator
	node  string
	idx   int // in r.state.Replicas
	bm    *Bitmap
	state atomic.Int32
	// compare: the replica's history is unknown, so its resync compares
	// checksums before it copies (guarded by r.mu).
	compare bool

	wake    chan struct{} // nudges loop
	latency Observer      // nil: not recorded

	// ctx ends the peer's loop: when the replicator closes, or when the
	// peer is replaced; done closes when the loop has returned.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// downSince is when the replica became unreachable (unix
	// nanoseconds; 0 while it is reached).
	downSince atomic.Int64

	mu      sync.Mutex // guards lastErr and the resync figures
	lastErr string
	total   int64 // regions to copy when the resync started
	rate    float64
	copied  atomic.Int64 // bytes a resync sent
	checked atomic.Int64 // bytes a resync compared by checksum
}

func (p *peer) setErr(err error) {
	p.mu.Lock()
	p.lastErr = err.Error()
	p.mu.Unlock()
}

func (p *peer) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (r *Replicator) newPeer(node string, idx int, bm *Bitmap, compare bool) *peer {
	p := &peer{r: r, node: node, idx: idx, bm: bm, compare: compare, wake: make(chan struct{}, 1), done: make(chan struct{})}
	p.ctx, p.cancel = context.WithCancel(r.ctx)
	if r.n.Latency != nil {
		p.latency = r.n.Latency(r.name, node)
	}
	return p
}

// startLoop runs p's loop, owned by the replicator (r.wg).
func (r *Replicator) startLoop(p *peer) {
	r.wg.Add(1)
	go p.loop()
}

// loop reaches a replica that is not in sync and resyncs it, until the
// replicator closes or the peer is replaced.
func (p *peer) loop() {
	defer p.r.wg.Done()
	defer close(p.done)
	r := p.r
	backoff := time.Duration(0)
	if p.state.Load() == peerInSync {
		// Ask at start whether a newer owner exists: an owner that was
		// replaced while it was down learns it here, before a client
		// reads its stale copy for long. (Asking, not opening: a new
		// volume's replicas are being created meanwhile.)
		ctx, cancel := context.WithTimeout(p.ctx, r.n.Timeout)
		st, err := r.n.State(ctx, p.node, r.name)
		cancel()
		if err == nil && st.Has && st.Epoch > r.epoch {
			r.fence(&StatusError{Status: StatusStaleEpoch, Epoch: st.Epoch})
		}
	}
	for {
		if p.state.Load() == peerInSync {
			select {
			case <-p.ctx.Done():
				return
			case <-p.wake:
			}
			continue
		}
		if backoff > 0 {
			t := time.NewTimer(backoff)
			select {
			case <-p.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			case <-p.wake: // `blockd volume resync`
				t.Stop()
			}
		}
		if r.fenced.Load() {
			<-p.ctx.Done()
			return
		}
		if err := p.open(false); err != nil {
			if IsStale(err) {
				r.fence(err)
				continue
			}
			p.setErr(err)
			if p.state.CompareAndSwap(peerOutOfSync, peerUnreachable) {
				p.downSince.CompareAndSwap(0, time.Now().UnixNano())
				r.log.Warn("replica unreachable; retrying", "replica", p.node, "err", err)
			}
			backoff = min(max(2*backoff, r.n.RetryInterval), 8*r.n.RetryInterval)
			continue
		}
		backoff = 0
		p.downSince.Store(0)
		if err := p.resync(); err != nil {
			if p.ctx.Err() != nil {
				return
			}
			if IsStale(err) {
				r.fence(err)
				continue
			}
			p.setErr(err)
			r.mu.Lock()
			if p.state.Load() == peerResyncing {
				p.state.Store(peerOutOfSync)
			}
			r.mu.Unlock()
			r.log.Warn("resync interrupted; it resumes where it stopped", "replica", p.node, "err", err)
			backoff = r.n.RetryInterval
		}
	}
}

// open starts a session with the replica and makes it resyncing: from
// now on every write goes to it too.
func (p *peer) open(create bool) error {
	r := p.r
	spec := r.cfg.Spec
	spec.Replication = &api.Replication{Role: api.RoleReplica, Owner: r.n.Name, Epoch: r.epoch, Replicas: r.State().Replicas}
	spec.Attachment, spec.Nodes = nil, nil
	payload, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	m := Msg{Type: MsgOpen, Volume: r.name, Epoch: r.epoch, Gen: r.State().Generation}
	if create {
		m.Flags |= FlagCreate
	}
	// A create makes files and fsyncs them on the replica, and no write
	// waits on it (only the user's create): it gets the longer timeout,
	// so a busy replica node does not fail a create the data path would
	// have waited for.
	timeout := r.n.Timeout
	if create {
		timeout = r.n.LastTimeout
	}
	var resp Msg
	if _, err := r.n.Net.Call(p.ctx, p.node, timeout, &m, payload, &resp, nil); err != nil {
		return err
	}
	if resp.Status != StatusOK {
		return &StatusError{Status: resp.Status, Epoch: resp.Epoch}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if resp.Flags&FlagNoHistory != 0 && !p.compare {
		// The replica cannot vouch for its data: compare everything.
		if err := p.bm.SetAll(); err != nil {
			return err
		}
		if err := r.setCompareLocked(p, true); err != nil {
			return err
		}
		r.log.Info("replica has no history we can trust; its resync compares every region", "replica", p.node)
	}
	if resp.Gen == r.state.Generation && p.bm.Count() == 0 && r.state.Replicas[p.idx].InSync {
		p.state.Store(peerInSync)
		return nil
	}
	p.state.Store(peerResyncing)
	return nil
}

func (r *Replicator) setCompareLocked(p *peer, on bool) error {
	next := cloneState(r.state)
	next.Replicas[p.idx].Compare = on
	if err := r.cfg.Save(cloneState(next)); err != nil {
		return err
	}
	r.state = next
	p.compare = on
	return nil
}

// inSyncLocked makes a resyncing replica whose bitmap is empty in-sync:
// a new generation, persisted, and told to every in-sync replica.
func (r *Replicator) inSyncLocked(p *peer) (bool, error) {
	if p.state.Load() != peerResyncing || p.bm.Count() != 0 {
		return false, nil
	}
	next := cloneState(r.state)
	next.Replicas[p.idx].InSync = true
	next.Replicas[p.idx].Compare = false
	next.Generation++
	if err := r.cfg.Save(cloneState(next)); err != nil {
		return false, err
	}
	r.state = next
	p.compare = false
	p.state.Store(peerInSync)
	if err := r.tellGenLocked(); err != nil {
		return false, err
	}
	return p.state.Load() == peerInSync, nil
}

func (p *peer) status() api.ReplicaStatus {
	st := api.ReplicaStatus{Node: p.node, State: peerStateNames[p.state.Load()], CopiedBytes: p.copied.Load(), ComparedBytes: p.checked.Load()}
	if t := p.downSince.Load(); t != 0 && st.State == api.ReplicaUnreachable {
		st.DownSince = time.Unix(0, t).UTC()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if st.State != api.ReplicaInSync {
		st.LastError = p.lastErr
		left := p.bm.Count()
		st.BytesLeft = left * p.bm.Region()
		if p.total > 0 {
			st.ResyncPercent = 100 * float64(p.total-min(left, p.total)) / float64(p.total)
		}
		st.RateBytes = int64(p.rate)
		if p.rate > 0 {
			st.ETASeconds = float64(st.BytesLeft) / p.rate
		}
	}
	return st
}
