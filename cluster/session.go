package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrNotOwner: the node does not own the volume (any more): its lease was
// lost, or its owner key is gone or another's.
var ErrNotOwner = errors.New("this node no longer owns the volume")

// base anchors the monotonic clock the lease is measured with.
var base = time.Now()

func mono() int64 { return int64(time.Since(base)) }

// Session is the node's lease: it keeps the node's alive key and the owner
// keys of the volumes the node owns. While the node renews it, Valid
// holds; a lease that etcd expired is lost for good, with every ownership
// under it, and the session takes a new one.
type Session struct {
	s   *Store
	ttl time.Duration

	lease      atomic.Int64 // the lease id; 0 before the first grant
	validUntil atomic.Int64 // mono() until which the lease is surely alive at etcd

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every renewal, loss and ownership change
	info    func() NodeInfo

	// OnLost is called (on the session's goroutine) with a lease that
	// etcd expired: every volume owned under it must stop.
	onLost func(lease int64)
	// RenewFailures counts keep-alives that failed (etcd unreachable or
	// slow); LeasesLost counts leases that expired.
	RenewFailures atomic.Int64
	LeasesLost    atomic.Int64

	cancel context.CancelFunc
	done   chan struct{}
}

// NodeInfo is what a node tells the cluster about itself.
type NodeInfo struct {
	Name     string            `json:"name"`
	Addr     string            `json:"addr"`
	Labels   map[string]string `json:"labels,omitempty"`
	Capacity int64             `json:"capacity"`
	Free     int64             `json:"free"`
	Version  string            `json:"version,omitempty"`
	Started  time.Time         `json:"started"`
	Updated  time.Time         `json:"updated"`
}

// StartSession takes the node's lease (the one its state dir remembers, if
// etcd still holds it: a restarted daemon keeps what it owned), registers
// the node with what info returns, and keeps both alive until Close.
// onLost is told of every lease etcd expired.
func (s *Store) StartSession(ctx context.Context, info func() NodeInfo, onLost func(lease int64)) (*Session, error) {
	ss := &Session{s: s, ttl: s.cfg.LeaseTTL, changed: make(chan struct{}), info: info, onLost: onLost, done: make(chan struct{})}
	if err := ss.grant(ctx, s.file.Lease); err != nil {
		return nil, err
	}
	var lctx context.Context
	lctx, ss.cancel = context.WithCancel(context.Background())
	go ss.loop(lctx)
	return ss, nil
}

// grant adopts lease old if etcd still holds it, or grants a new one, and
// registers the node under it.
func (ss *Session) grant(ctx context.Context, old int64) error {
	s := ss.s
	sent := mono()
	var id int64
	var ttl int64
	if old != 0 {
		c, cancel := s.call(ctx)
		resp, err := s.cli.KeepAliveOnce(c, clientv3.LeaseID(old))
		cancel()
		if err == nil {
			id, ttl = old, resp.TTL
			s.log.Info("kept the lease of the node's last run", "lease", fmt.Sprintf("%x", id), "ttl", time.Duration(ttl)*time.Second)
		} else if !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return fmt.Errorf("cluster: renewing the node's lease: %w", unreachable(err))
		}
	}
	if id == 0 {
		c, cancel := s.call(ctx)
		resp, err := s.cli.Grant(c, int64(ss.ttl/time.Second))
		cancel()
		if err != nil {
			return fmt.Errorf("cluster: granting the node's lease: %w", unreachable(err))
		}
		id, ttl = int64(resp.ID), resp.TTL
		s.log.Info("node lease granted", "lease", fmt.Sprintf("%x", id), "ttl", time.Duration(ttl)*time.Second)
	}
	if err := ss.register(ctx, id); err != nil {
		return err
	}
	if s.file.Lease != id {
		s.file.Lease = id
		if err := s.saveFile(); err != nil {
			return err
		}
	}
	ss.lease.Store(id)
	ss.setValid(sent, ttl)
	return nil
}

// register writes the node's member and alive keys.
func (ss *Session) register(ctx context.Context, lease int64) error {
	s := ss.s
	ni := ss.info()
	ni.Name, ni.Updated = s.cfg.Node, time.Now().UTC()
	v := mustJSON(ni)
	c, cancel := s.call(ctx)
	defer cancel()
	_, err := s.cli.Txn(c).Then(
		clientv3.OpPut(s.key("members", s.cfg.Node), v),
		clientv3.OpPut(s.key("alive", s.cfg.Node), v, clientv3.WithLease(clientv3.LeaseID(lease))),
	).Commit()
	if err != nil {
		return fmt.Errorf("cluster: registering the node: %w", unreachable(err))
	}
	return nil
}

// setValid records a renewal sent at mono() sent that etcd answered with
// ttl seconds: etcd expires the lease no earlier than ttl after it got the
// renewal, so the node counts it valid for 90% of that from when it sent
// it (the margin covers clocks that tick at slightly different rates).
func (ss *Session) setValid(sent, ttl int64) {
	d := time.Duration(ttl) * time.Second
	ss.validUntil.Store(sent + int64(d-d/10))
	ss.notify()
}

func (ss *Session) notify() {
	ss.mu.Lock()
	close(ss.changed)
	ss.changed = make(chan struct{})
	ss.mu.Unlock()
}

func (ss *Session) wait() <-chan struct{} {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.changed
}

// ValidFor is how long the current lease counts as valid without another
// renewal.
func (ss *Session) ValidFor() time.Duration {
	return max(time.Duration(ss.validUntil.Load()-mono()), 0)
}

// Lease is the current lease's id.
func (ss *Session) Lease() int64 { return ss.lease.Load() }

// Valid reports whether lease is the node's current lease and surely
// alive at etcd.
func (ss *Session) Valid(lease int64) bool {
	return ss.lease.Load() == lease && mono() < ss.validUntil.Load()
}

// loop renews the lease every TTL/5 and the node's record every 30s.
func (ss *Session) loop(ctx context.Context) {
	defer close(ss.done)
	every := ss.ttl / 5
	t := time.NewTicker(every)
	defer t.Stop()
	lastInfo := time.Now()
	failing := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		id := ss.lease.Load()
		sent := mono()
		c, cancel := context.WithTimeout(ctx, every)
		resp, err := ss.s.cli.KeepAliveOnce(c, clientv3.LeaseID(id))
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err == nil:
			ss.setValid(sent, resp.TTL)
			if failing > 0 {
				ss.s.log.Info("node lease renewed again", "failed_renewals", failing)
				failing = 0
			}
			if time.Since(lastInfo) >= 30*time.Second {
				if err := ss.register(ctx, id); err != nil {
					ss.s.log.Warn("updating the node's record", "err", err)
				}
				lastInfo = time.Now()
			}
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			ss.LeasesLost.Add(1)
			ss.validUntil.Store(0)
			ss.s.log.Error("the node's lease expired at etcd: every volume this node owned is fenced; taking a new lease",
				"lease", fmt.Sprintf("%x", id))
			for ctx.Err() == nil {
				if err := ss.grant(ctx, 0); err == nil {
					break
				} else {
					ss.s.log.Warn("taking a new lease", "err", err)
				}
				select {
				case <-ctx.Done():
				case <-time.After(every):
				}
			}
			// Ownerships under the old lease are lost once the new
			// lease is in place (Wait sees the change).
			ss.notify()
			if ss.onLost != nil {
				ss.onLost(id)
			}
		default:
			ss.RenewFailures.Add(1)
			failing++
			left := time.Duration(ss.validUntil.Load() - mono())
			if failing == 1 || failing%10 == 0 {
				ss.s.log.Warn("renewing the node's lease failed; owned volumes stop serving when it runs out", "err", err,
					"valid_for", left.Round(100*time.Millisecond), "failed_renewals", failing)
			}
		}
	}
}

// Close stops renewing the lease. With revoke, the lease is revoked at
// once (the node's alive key and every owner key under it go); without,
// it expires on its own, or a restarted daemon adopts it.
func (ss *Session) Close(revoke bool) {
	ss.cancel()
	<-ss.done
	if revoke {
		c, cancel := ss.s.call(context.Background())
		defer cancel()
		if _, err := ss.s.cli.Revoke(c, clientv3.LeaseID(ss.lease.Load())); err != nil {
			ss.s.log.Warn("revoking the node's lease", "err", err)
			return
		}
		ss.s.file.Lease = 0
		if err := ss.s.saveFile(); err != nil {
			ss.s.log.Warn("forgetting the node's lease", "err", err)
		}
	}
}

// Ownership states.
const (
	ownHeld int32 = iota
	ownLost
)

// Ownership is this node's ownership of a volume: its owner key, created
// at revision Epoch under lease. It is the replication.Lease of the
// volume's owner pipeline.
type Ownership struct {
	ss     *Session
	Volume string
	Epoch  uint64
	lease  int64
	state  atomic.Int32
}

func (ss *Session) held(volume string, epoch uint64, lease int64) *Ownership {
	return &Ownership{ss: ss, Volume: volume, Epoch: epoch, lease: lease}
}

// Adopt is the ownership of a volume that Store.Owned found this node
// owns under its current lease (a restarted daemon's).
func (ss *Session) Adopt(volume string, epoch uint64) *Ownership {
	return ss.held(volume, epoch, ss.lease.Load())
}

// NotOwned is an ownership that is already lost: what a volume's copy
// claims when the cluster says otherwise.
func (ss *Session) NotOwned(volume string, epoch uint64) *Ownership {
	o := ss.held(volume, epoch, ss.lease.Load())
	o.state.Store(ownLost)
	return o
}

// Valid implements replication.Lease.
func (o *Ownership) Valid() bool {
	return o.state.Load() == ownHeld && o.ss.Valid(o.lease)
}

// Held reports whether the ownership is not lost and its lease is still
// the node's.
func (o *Ownership) Held() bool {
	return o.state.Load() == ownHeld && o.ss.lease.Load() == o.lease
}

// Wait implements replication.Lease: it returns nil once the ownership is
// valid, ErrNotOwner once it is lost.
func (o *Ownership) Wait(ctx context.Context) error {
	for {
		ch := o.ss.wait()
		switch {
		case o.state.Load() == ownLost || o.ss.lease.Load() != o.lease:
			return ErrNotOwner
		case o.Valid():
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Lose marks the ownership lost: its owner key is gone or another's.
func (o *Ownership) Lose() {
	o.state.Store(ownLost)
	o.ss.notify()
}

// Lost reports whether the ownership is lost.
func (o *Ownership) Lost() bool {
	return o.state.Load() == ownLost || o.ss.lease.Load() != o.lease
}
