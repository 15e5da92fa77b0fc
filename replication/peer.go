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

// loop reaches a replica that is not in sync and resyncs it, until the
// replicator closes.
func (p *peer) loop() {
	defer p.r.wg.Done()
	r := p.r
	backoff := time.Duration(0)
	if p.state.Load() == peerInSync {
		// Ask at start whether a newer owner exists: an owner that was
		// replaced while it was down learns it here, before a client
		// reads its stale copy for long. (Asking, not opening: a new
		// volume's replicas are being created meanwhile.)
		ctx, cancel := context.WithTimeout(r.ctx, r.n.Timeout)
		st, err := r.n.State(ctx, p.node, r.name)
		cancel()
		if err == nil && st.Has && st.Epoch > r.epoch {
			r.fence(&StatusError{Status: StatusStaleEpoch, Epoch: st.Epoch})
		}
	}
	for {
		if p.state.Load() == peerInSync {
			select {
			case <-r.ctx.Done():
				return
			case <-p.wake:
			}
			continue
		}
		if backoff > 0 {
			t := time.NewTimer(backoff)
			select {
			case <-r.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			case <-p.wake: // `blockd volume resync`
				t.Stop()
			}
		}
		if r.fenced.Load() {
			<-r.ctx.Done()
			return
		}
		if err := p.open(false); err != nil {
			if IsStale(err) {
				r.fence(err)
				continue
			}
			p.setErr(err)
			if p.state.CompareAndSwap(peerOutOfSync, peerUnreachable) {
				r.log.Warn("replica unreachable; retrying", "replica", p.node, "err", err)
			}
			backoff = min(max(2*backoff, r.n.RetryInterval), 8*r.n.RetryInterval)
			continue
		}
		backoff = 0
		if err := p.resync(); err != nil {
			if r.ctx.Err() != nil {
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
	var resp Msg
	if _, err := r.n.Net.Call(r.ctx, p.node, r.n.Timeout, &m, payload, &resp, nil); err != nil {
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
