package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// ErrFenced fails every request of a volume whose owner learned that
// another node took the volume over at a higher epoch: nothing it does
// may be acknowledged any more.
var ErrFenced = errors.New("volume fenced: another node owns it now")

// Node holds what every replicated volume of a node shares.
type Node struct {
	// Name is this node's name, as its peers know it.
	Name string
	// Net reaches the other nodes.
	Net Network
	// PeerNames are the nodes this node may place replicas on.
	PeerNames []string
	// Timeout bounds a replica's answer while another in-sync copy
	// remains; LastTimeout bounds the answer of the last in-sync
	// replica, which the owner drops only if it must (defaults 5s and
	// 15s).
	Timeout, LastTimeout time.Duration
	// RetryInterval is how often the owner tries to reach a replica it
	// dropped (default 1s).
	RetryInterval time.Duration
	// Resync caps the bytes per second all resyncs of the node copy
	// together (nil: no cap).
	Resync *Limiter
	// Region is the bitmap's region size (default 64 KiB).
	Region int64
	// Log receives replication events (default slog.Default()).
	Log *slog.Logger
	// Latency, if set, returns where a replica's round trips are
	// recorded (a Prometheus histogram's child, resolved once per
	// replica so the data path only observes).
	Latency func(volume, replica string) Observer
}

// Observer records a duration in seconds.
type Observer interface{ Observe(float64) }

func (n *Node) defaults() {
	if n.Timeout <= 0 {
		n.Timeout = 5 * time.Second
	}
	if n.LastTimeout <= 0 {
		n.LastTimeout = 3 * n.Timeout
	}
	if n.RetryInterval <= 0 {
		n.RetryInterval = time.Second
	}
	if n.Region <= 0 {
		n.Region = 64 << 10
	}
	if n.Log == nil {
		n.Log = slog.Default()
	}
}

// VolumeConfig is what a Replicator needs of its volume.
type VolumeConfig struct {
	// Spec is the volume's spec; its Replication is the persisted state.
	Spec api.Spec
	// Engine is the owner's local engine: resync and checksums read it.
	Engine ioengine.Engine
	// Save persists new replication state; durable when it returns.
	Save func(api.Replication) error
	// Dir holds the volume's bitmaps (one per replica) and its
	// activity log.
	Dir string
	// OnFenced is called (on its own goroutine) when the volume is
	// fenced: a replica answered with a higher epoch (epoch is that
	// epoch), or the owner's lease was lost (epoch 0). Another node may
	// own the volume now.
	OnFenced func(epoch uint64)
	// Lease, if set, is the owner's right to serve the volume (a
	// cluster's ownership lease): a request starts and is acknowledged
	// only while it is valid.
	Lease Lease
}

// Lease is an owner's right to serve a volume for a while, kept alive
// elsewhere (package cluster renews it with etcd). While Valid, the owner
// may serve; once it is not, a request waits in Wait until the lease is
// renewed (nil) or lost (an error: another node may own the volume now,
// and this owner must never acknowledge again). Valid is on the data path:
// an atomic load or two.
type Lease interface {
	Valid() bool
	Wait(ctx context.Context) error
}

// Peer states.
const (
	peerInSync int32 = iota
	peerResyncing
	peerOutOfSync
	peerUnreachable
)

var peerStateNames = [...]string{api.ReplicaInSync, api.ReplicaResyncing, api.ReplicaOutOfSync, api.ReplicaUnreachable}

// maxPeers bounds a volume's replicas (repl 3: two).
const maxPeers = 4

// Replicator is the replication stage of a volume's owner: it sends every
// write, trim, write-zeroes and flush to the in-sync and resyncing
// replicas while the local engine does it, and completes the request when
// every in-sync replica has it; it drops a replica that fails or times out
// (persisting the new in-sync set and generation first), records what a
// dropped replica misses, and brings it back with a resync.
type Replicator struct {
	n    *Node
	cfg  VolumeConfig
	name string
	log  *slog.Logger
	next pipeline.Handler

	rl     rangeLock
	seq    atomic.Uint64
	epoch  uint64 // fixed for the replicator's life
	fenced atomic.Bool
	al     *Bitmap // activity log: extents with writes that may be in flight

	// mu orders peer state changes against requests: a request holds it
	// shared while it reads the peers' states and marks the bitmaps of
	// those it will not send to; a state change holds it alone.
	mu    sync.RWMutex
	state api.Replication
	peers []*peer

	ops    sync.Pool // *op
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // peer workers and loops
	closed atomic.Bool
}

// op is one replicated request in flight.
type op struct {
	msg     Msg
	payload []byte
	n       int
	targets [maxPeers]*peer
	tickets [maxPeers]Ticket
	resps   [maxPeers]Msg
	res     [maxPeers]error
}

// alRegion is the activity log's extent: coarse, so that a workload's hot
// set costs few log writes.
const alRegion = 4 << 20

// NewReplicator returns the replication stage of a volume this node owns.
// It opens the volume's bitmaps and activity log; an activity log with
// extents marked means the owner stopped with writes in flight, whose
// extents every replica then re-checks.
func (n *Node) NewReplicator(cfg VolumeConfig) (*Replicator, error) {
	n.defaults()
	if cfg.Spec.Replication == nil || cfg.Spec.Replication.Role != api.RoleOwner {
		return nil, fmt.Errorf("replication: volume %s is not owned here", cfg.Spec.Name)
	}
	if len(cfg.Spec.Replication.Replicas) > maxPeers {
		return nil, fmt.Errorf("replication: volume %s has %d replicas, at most %d", cfg.Spec.Name, len(cfg.Spec.Replication.Replicas), maxPeers)
	}
	r := &Replicator{n: n, cfg: cfg, name: cfg.Spec.Name, log: n.Log.With("volume", cfg.Spec.Name),
		epoch: cfg.Spec.Replication.Epoch, state: cloneState(*cfg.Spec.Replication)}
	r.rl.init()
	r.ops.New = func() any { return new(op) }
	r.ctx, r.cancel = context.WithCancel(context.Background())
	size := cfg.Engine.Size()
	var err error
	if r.al, err = OpenBitmap(filepath.Join(cfg.Dir, r.name+".al"), size, alRegion); err != nil {
		return nil, err
	}
	hot := r.al.Count() > 0
	changed := false
	for i, rep := range r.state.Replicas {
		bm, err := OpenBitmap(bitmapPath(cfg.Dir, r.name, rep.Node), size, n.Region)
		if err != nil {
			r.closeFiles()
			return nil, err
		}
		p := r.newPeer(rep.Node, i, bm, rep.Compare)
		if hot {
			// Writes may have been in flight when the owner stopped:
			// the replicas may differ from us there.
			for e, ok := r.al.Next(0); ok; e, ok = r.al.Next(e + 1) {
				if err := bm.SetRange(e*alRegion, alRegion); err != nil {
					r.closeFiles()
					return nil, err
				}
			}
			p.compare = true
		}
		if p.compare && bm.Count() == 0 {
			// Unknown history (a promotion, a replaced copy): every
			// region is suspect until compared.
			if err := bm.SetAll(); err != nil {
				r.closeFiles()
				return nil, err
			}
		}
		st := peerOutOfSync
		if rep.InSync && bm.Count() == 0 {
			st = peerInSync
		} else if rep.InSync {
			// In the set when we stopped, but behind: out of it now,
			// before we serve anything.
			r.state.Replicas[i].InSync = false
			changed = true
		}
		if p.compare != rep.Compare {
			r.state.Replicas[i].Compare = p.compare
			changed = true
		}
		p.state.Store(st)
		r.peers = append(r.peers, p)
	}
	if changed {
		r.state.Generation++
		if err := cfg.Save(cloneState(r.state)); err != nil {
			r.cancel()
			r.closeFiles()
			return nil, fmt.Errorf("replication: %s: %w", r.name, err)
		}
	}
	if hot {
		r.log.Warn("the volume stopped with writes in flight; its replicas re-check those regions", "extents", r.al.Count())
	}
	return r, nil
}

func bitmapPath(dir, volume, node string) string {
	return filepath.Join(dir, volume+"."+node+".bitmap")
}

func cloneState(s api.Replication) api.Replication {
	s.Replicas = slices.Clone(s.Replicas)
	return s
}

// Stage is the pipeline stage; it starts each replica's reconnect and
// resync loop.
func (r *Replicator) Stage() pipeline.Stage {
	return func(next pipeline.Handler) pipeline.Handler {
		r.next = next
		r.mu.Lock()
		for _, p := range r.peers {
			r.startLoop(p)
		}
		r.mu.Unlock()
		return r
	}
}

// Handle implements pipeline.Handler.
func (r *Replicator) Handle(ctx context.Context, req *pipeline.Request) error {
	if r.fenced.Load() {
		return ErrFenced
	}
	if err := r.leased(ctx); err != nil {
		return err
	}
	var err error
	switch req.Op {
	case pipeline.OpWrite, pipeline.OpTrim, pipeline.OpWriteZeroes, pipeline.OpFlush:
		err = r.replicate(ctx, req)
	default:
		err = r.next.Handle(ctx, req) // reads are local
	}
	if err != nil {
		return err
	}
	// The lease may have run out while the request ran: no answer
	// without it (a read, too, could be older than a new owner's write).
	return r.leased(ctx)
}

// leased returns nil while the owner's lease is valid, waits while it is
// being renewed, and fences the volume when it is lost.
func (r *Replicator) leased(ctx context.Context) error {
	l := r.cfg.Lease
	if l == nil || l.Valid() {
		return nil
	}
	err := l.Wait(ctx)
	switch {
	case err == nil:
		if r.fenced.Load() {
			return ErrFenced
		}
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	}
	r.fenceLost(err)
	return ErrFenced
}

var msgOf = [...]uint8{pipeline.OpWrite: MsgWrite, pipeline.OpTrim: MsgTrim, pipeline.OpWriteZeroes: MsgWriteZeroes, pipeline.OpFlush: MsgFlush}

// replicate runs req locally and on every in-sync and resyncing replica
// at once, and completes when the local engine and every in-sync replica
// have it.
func (r *Replicator) replicate(ctx context.Context, req *pipeline.Request) error {
	off, n := req.Offset, int64(req.Length)
	flush := req.Op == pipeline.OpFlush
	if flush {
		// Bits and extents must be durable before the data they cover
		// is.
		if err := r.syncBitmaps(); err != nil {
			return err
		}
	} else {
		h := r.rl.lock(off, off+n)
		defer r.rl.unlock(h)
		if err := r.al.SetRange(off, n); err != nil {
			return err
		}
	}
	o := r.ops.Get().(*op)
	defer r.putOp(o)
	o.msg = Msg{Type: msgOf[req.Op], Volume: r.name, Epoch: r.epoch, Seq: r.seq.Add(1), Offset: off, Length: req.Length}
	if req.Flags&pipeline.FlagFUA != 0 {
		o.msg.Flags |= FlagFUA
	}
	if req.Flags&pipeline.FlagNoHole != 0 {
		o.msg.Flags |= FlagNoHole
	}
	if req.Op == pipeline.OpWrite {
		o.payload = req.Buf[:req.Length]
	}
	if !flush {
		r.n.Resync.Busy()
	}

	var timeouts [maxPeers]time.Duration
	r.mu.RLock()
	inSync := 0
	for _, p := range r.peers {
		if p.state.Load() == peerInSync {
			inSync++
		}
	}
	for _, p := range r.peers {
		switch st := p.state.Load(); st {
		case peerInSync, peerResyncing:
			t := r.n.Timeout
			if inSync == 1 && st == peerInSync {
				t = r.n.LastTimeout
			}
			o.targets[o.n], timeouts[o.n] = p, t
			o.n++
		default:
			if !flush {
				if err := p.bm.SetRange(off, n); err != nil {
					r.mu.RUnlock()
					return fmt.Errorf("replication: recording a write %s misses: %w", p.node, err)
				}
			}
		}
	}
	r.mu.RUnlock()

	// The requests leave first, then the local engine does its part
	// while they travel: the request costs the slower of the two, not
	// their sum.
	start := time.Now()
	for k := range o.n {
		r.n.Net.Send(r.ctx, o.targets[k].node, timeouts[k], &o.msg, o.payload, &o.tickets[k])
	}
	lerr := r.next.Handle(ctx, req)
	for k := range o.n {
		p := o.targets[k]
		err := r.n.Net.Receive(&o.tickets[k], &o.resps[k])
		if err == nil && o.resps[k].Status != StatusOK {
			err = &StatusError{Status: o.resps[k].Status, Epoch: o.resps[k].Epoch}
		}
		if err == nil && p.latency != nil {
			p.latency.Observe(time.Since(start).Seconds())
		}
		o.res[k] = err
	}
	var err error
	for k := range o.n {
		if e := o.res[k]; e != nil {
			if IsStale(e) {
				r.fence(e)
				return ErrFenced
			}
			err = errors.Join(err, r.peerFailed(o.targets[k], o.msg, e))
		}
	}
	if err != nil {
		return err // the miss could not be recorded: never acknowledge
	}
	return lerr
}

func (r *Replicator) putOp(o *op) {
	o.payload = nil
	for k := range o.n {
		o.targets[k], o.res[k], o.tickets[k] = nil, nil, Ticket{}
	}
	o.n = 0
	r.ops.Put(o)
}

// syncBitmaps makes every set bit and the activity log durable.
func (r *Replicator) syncBitmaps() error {
	for _, p := range r.peers {
		if err := p.bm.Sync(); err != nil {
			return err
		}
	}
	return r.al.Sync()
}

// peerFailed records that p missed m (or may have) and takes p out of the
// in-sync set, persisting the new set and generation and telling the
// remaining in-sync replicas before the request that saw the failure is
// acknowledged. An error means the miss could not be recorded.
func (r *Replicator) peerFailed(p *peer, m Msg, cause error) error {
	r.mu.RLock()
	if r.peers[p.idx] != p {
		// Replaced while the request was in flight: its misses no
		// longer matter.
		r.mu.RUnlock()
		return nil
	}
	if m.Type != MsgFlush {
		if err := p.bm.SetRange(m.Offset, int64(m.Length)); err != nil {
			r.mu.RUnlock()
			return fmt.Errorf("replication: recording a write %s missed: %w", p.node, err)
		}
	}
	r.mu.RUnlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.peers[p.idx] != p {
		return nil
	}
	p.setErr(cause)
	switch p.state.Load() {
	case peerInSync:
		if err := r.dropLocked(p, cause); err != nil {
			return err
		}
	case peerResyncing:
		p.state.Store(peerOutOfSync)
		r.log.Warn("replica failed during resync; it will be retried", "replica", p.node, "err", cause)
	}
	p.kick()
	return nil
}

// dropLocked takes p out of the in-sync set.
func (r *Replicator) dropLocked(p *peer, cause error) error {
	next := cloneState(r.state)
	next.Replicas[p.idx].InSync = false
	next.Generation++
	if err := r.cfg.Save(cloneState(next)); err != nil {
		return fmt.Errorf("replication: persisting that %s left the in-sync set: %w", p.node, err)
	}
	r.state = next
	p.state.Store(peerOutOfSync)
	r.log.Warn("replica dropped from the in-sync set; writes go on without it and its missed regions are recorded",
		"replica", p.node, "generation", next.Generation, "err", cause)
	return r.tellGenLocked()
}

// tellGenLocked tells every in-sync replica the current generation; one
// that does not hear it leaves the set too.
func (r *Replicator) tellGenLocked() error {
	for _, q := range r.peers {
		if q.state.Load() != peerInSync {
			continue
		}
		m := Msg{Type: MsgSetGen, Volume: r.name, Epoch: r.epoch, Gen: r.state.Generation}
		var resp Msg
		_, err := r.n.Net.Call(r.ctx, q.node, r.n.Timeout, &m, nil, &resp, nil)
		if err == nil && resp.Status != StatusOK {
			err = &StatusError{Status: resp.Status, Epoch: resp.Epoch}
		}
		if IsStale(err) {
			go r.fence(err)
			return ErrFenced
		}
		if err != nil {
			q.setErr(err)
			if err := q.bm.SetAll(); err != nil { // it may lack writes we cannot name
				return err
			}
			if err := r.dropLocked(q, err); err != nil {
				return err
			}
		}
	}
	return nil
}

// fence stops the volume for good: another node owns it at a higher
// epoch.
func (r *Replicator) fence(cause error) {
	if !r.fenced.CompareAndSwap(false, true) {
		return
	}
	var se *StatusError
	var epoch uint64
	if errors.As(cause, &se) {
		epoch = se.Epoch
	}
	r.log.Error("a replica knows a newer owner of this volume (higher epoch): the volume is fenced and fails every request from now on",
		"epoch", r.epoch, "newer_epoch", epoch)
	if r.cfg.OnFenced != nil {
		go r.cfg.OnFenced(epoch)
	}
}

// fenceLost fences the volume because its owner lost its lease.
func (r *Replicator) fenceLost(cause error) {
	if !r.fenced.CompareAndSwap(false, true) {
		return
	}
	r.log.Error("this node lost its ownership lease of the volume: it is fenced and fails every request from now on (another node may own it)",
		"epoch", r.epoch, "err", cause)
	if r.cfg.OnFenced != nil {
		go r.cfg.OnFenced(0)
	}
}

// Fence stops the volume for good, as if its lease were lost: the cluster
// learned that another node owns it, or it lost its ownership key.
func (r *Replicator) Fence(cause error) { r.fenceLost(cause) }

// Fenced reports whether the volume is fenced.
func (r *Replicator) Fenced() bool { return r.fenced.Load() }

// State returns the persisted replication state.
func (r *Replicator) State() api.Replication {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return cloneState(r.state)
}

// Close stops the replicator's goroutines and closes its files. The
// pipeline above has drained (no request in flight). A clean close clears
// the activity log: nothing is in flight.
func (r *Replicator) Close() error {
	if !r.closed.CompareAndSwap(false, true) {
		return nil
	}
	r.cancel()
	r.wg.Wait()
	var errs []error
	if !r.fenced.Load() {
		for e, ok := r.al.Next(0); ok; e, ok = r.al.Next(e + 1) {
			r.al.Clear(e)
		}
	}
	errs = append(errs, r.closeFiles())
	return errors.Join(errs...)
}

func (r *Replicator) closeFiles() error {
	var errs []error
	for _, p := range r.peers {
		errs = append(errs, p.bm.Close())
	}
	if r.al != nil {
		errs = append(errs, r.al.Close())
	}
	return errors.Join(errs...)
}

// RemoveFiles deletes a volume's bitmaps and activity log (after Close,
// when the volume is deleted).
func RemoveFiles(dir, volume string, replicas []api.Replica) error {
	var errs []error
	for _, rep := range replicas {
		if err := os.Remove(bitmapPath(dir, volume, rep.Node)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(filepath.Join(dir, volume+".al")); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Copied returns the bytes resyncs sent to each replica.
func (r *Replicator) Copied() map[string]int64 {
	out := map[string]int64{}
	for _, p := range r.peers {
		out[p.node] = p.copied.Load()
	}
	return out
}

// Status returns each replica's live state.
func (r *Replicator) Status() []api.ReplicaStatus {
	out := make([]api.ReplicaStatus, 0, len(r.peers))
	for _, p := range r.peers {
		out = append(out, p.status())
	}
	return out
}

// CreateReplicas makes the copies of a new volume on its replica nodes
// (MsgOpen with FlagCreate), all of them or none: on a failure it asks
// the ones made to delete themselves and returns the error.
func (r *Replicator) CreateReplicas() error {
	var made []*peer
	for _, p := range r.peers {
		if err := p.open(true); err != nil {
			for _, q := range made {
				if derr := q.send(Msg{Type: MsgDelete, Volume: r.name, Epoch: r.epoch}, nil); derr != nil {
					r.log.Warn("removing a replica of a failed create", "replica", q.node, "err", derr)
				}
			}
			return fmt.Errorf("creating the replica on %s: %w", p.node, err)
		}
		made = append(made, p)
	}
	return nil
}

// DeleteReplicas asks every replica to remove its copy; call it after
// Close, so that nothing recreates them. A replica that cannot be reached
// keeps its copy.
func (r *Replicator) DeleteReplicas() error {
	var errs []error
	for _, p := range r.peers {
		if err := p.sendCtx(context.Background(), Msg{Type: MsgDelete, Volume: r.name, Epoch: r.epoch}, nil); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p.node, err))
		}
	}
	return errors.Join(errs...)
}

// Peers lists the nodes this node can replicate to.
func (n *Node) Peers() []string { return slices.Clone(n.PeerNames) }

// FreeBytes asks peer how much space its state dir has left.
func (n *Node) FreeBytes(ctx context.Context, peer string) (int64, error) {
	n.defaults()
	m := Msg{Type: MsgState}
	var resp Msg
	if _, err := n.Net.Call(ctx, peer, n.Timeout, &m, nil, &resp, nil); err != nil {
		return 0, err
	}
	if resp.Status != StatusOK {
		return 0, &StatusError{Status: resp.Status}
	}
	return resp.Offset, nil
}

// CopyState is what a node knows of a volume.
type CopyState struct {
	Has               bool // the node holds a copy
	Owner             bool // it owns the volume
	Epoch, Generation uint64
}

// State asks peer what it knows of volume.
func (n *Node) State(ctx context.Context, peer, volume string) (CopyState, error) {
	n.defaults()
	m := Msg{Type: MsgState, Volume: volume}
	var resp Msg
	if _, err := n.Net.Call(ctx, peer, n.Timeout, &m, nil, &resp, nil); err != nil {
		return CopyState{}, err
	}
	switch resp.Status {
	case StatusOK:
	case StatusNoVolume:
		return CopyState{}, nil
	default:
		return CopyState{}, &StatusError{Status: resp.Status}
	}
	return CopyState{Has: true, Owner: resp.Flags&FlagOwner != 0, Epoch: resp.Epoch, Generation: resp.Gen}, nil
}

// Verify compares every in-sync replica with the owner's copy, region by
// region, by checksum. Writes to the regions being compared wait (the
// range lock), so a write in flight never shows as a difference.
func (r *Replicator) Verify(ctx context.Context) []api.ReplicaVerify {
	var out []api.ReplicaVerify
	size := r.cfg.Engine.Size()
	region := r.n.Region
	span := region * resyncBatch
	for _, p := range r.peers {
		res := api.ReplicaVerify{Node: p.node, State: peerStateNames[p.state.Load()], Region: region}
		if p.state.Load() != peerInSync {
			res.Error = "not in sync: nothing to verify yet"
			out = append(out, res)
			continue
		}
		for off := int64(0); off < size && ctx.Err() == nil; off += span {
			n := min(span, size-off)
			h := r.rl.lock(off, off+n)
			m := Msg{Type: MsgChecksums, Volume: r.name, Epoch: r.epoch, Offset: off, Length: uint32((n + region - 1) / region), Flags: uint32(region)}
			var resp Msg
			remote, err := r.n.Net.Call(ctx, p.node, r.n.LastTimeout, &m, nil, &resp, nil)
			if err == nil && resp.Status != StatusOK {
				err = &StatusError{Status: resp.Status, Epoch: resp.Epoch}
			}
			var local []byte
			if err == nil {
				local, err = Checksums(r.cfg.Engine, off, int64(m.Length), region, nil)
			}
			r.rl.unlock(h)
			if err != nil {
				res.Error = err.Error()
				break
			}
			if len(remote) != len(local) {
				res.Error = fmt.Sprintf("replica answered %d checksums for %d regions", len(remote)/8, len(local)/8)
				break
			}
			for i := 0; i < len(local); i += 8 {
				if string(local[i:i+8]) != string(remote[i:i+8]) {
					res.Differ = append(res.Differ, off/region+int64(i/8))
				}
			}
			res.Compared += n
		}
		if err := ctx.Err(); err != nil && res.Error == "" {
			res.Error = err.Error()
		}
		out = append(out, res)
	}
	return out
}

// Resync wakes every replica that is not in sync, so it is retried now
// rather than at its next attempt.
func (r *Replicator) Resync() {
	for _, p := range r.peers {
		p.kick()
	}
}

// OpenSessions tells every in-sync replica this owner's epoch before the
// volume serves anything: from then on each refuses the older epochs, so
// an owner this one replaced can no longer write there. A replica that
// does not answer leaves the in-sync set (persisted first); one that knows
// a newer epoch fences this owner (ErrFenced). Call it after Stage.
func (r *Replicator) OpenSessions() error {
	r.mu.RLock()
	var ps []*peer
	for _, p := range r.peers {
		if p.state.Load() == peerInSync {
			ps = append(ps, p)
		}
	}
	r.mu.RUnlock()
	for _, p := range ps {
		err := p.open(false)
		if err == nil {
			continue
		}
		if IsStale(err) {
			r.fence(err)
			return ErrFenced
		}
		r.mu.Lock()
		p.setErr(err)
		if p.state.Load() == peerInSync {
			// It has every write so far: nothing to mark, it just
			// cannot vouch for the ones to come.
			if derr := r.dropLocked(p, err); derr != nil {
				r.mu.Unlock()
				return derr
			}
		}
		r.mu.Unlock()
		p.kick()
	}
	return nil
}

// ReplacePeer gives the volume a new replica on node next in place of the
// one on node old, which must not be in sync (a replica gone for good).
// The new one starts with no history: its resync compares every region by
// checksum and copies what differs (holes cost a checksum of zeroes). The
// new replica set is persisted before ReplacePeer returns.
func (r *Replicator) ReplacePeer(old, next string) error {
	r.mu.Lock()
	var p *peer
	for _, q := range r.peers {
		if q.node == next {
			r.mu.Unlock()
			return fmt.Errorf("replication: %s already holds a replica of %s", next, r.name)
		}
		if q.node == old {
			p = q
		}
	}
	if next == r.n.Name {
		r.mu.Unlock()
		return fmt.Errorf("replication: the owner cannot be its own replica")
	}
	switch {
	case p == nil:
		r.mu.Unlock()
		return fmt.Errorf("replication: %s holds no replica of %s", old, r.name)
	case p.state.Load() != peerOutOfSync && p.state.Load() != peerUnreachable:
		r.mu.Unlock()
		return fmt.Errorf("replication: the replica on %s is %s; only a replica out of sync is replaced", old, peerStateNames[p.state.Load()])
	}
	p.cancel()
	r.mu.Unlock()
	<-p.done // its loop may have been waiting for r.mu

	bm, err := OpenBitmap(bitmapPath(r.cfg.Dir, r.name, next), r.cfg.Engine.Size(), r.n.Region)
	if err != nil {
		return r.resumePeer(p, err)
	}
	if err := bm.SetAll(); err != nil {
		bm.Close()
		return r.resumePeer(p, err)
	}
	r.mu.Lock()
	if st := p.state.Load(); st != peerOutOfSync && st != peerUnreachable {
		// It came back while its loop stopped.
		r.mu.Unlock()
		bm.Close()
		return r.resumePeer(p, fmt.Errorf("replication: the replica on %s came back in sync", old))
	}
	q := r.newPeer(next, p.idx, bm, true)
	q.state.Store(peerOutOfSync)
	st := cloneState(r.state)
	st.Replicas[p.idx] = api.Replica{Node: next, Compare: true}
	st.Generation++
	if err := r.cfg.Save(cloneState(st)); err != nil {
		r.mu.Unlock()
		bm.Close()
		os.Remove(bitmapPath(r.cfg.Dir, r.name, next))
		return r.resumePeer(p, fmt.Errorf("replication: persisting the new replica set: %w", err))
	}
	r.state = st
	r.peers[p.idx] = q
	r.startLoop(q)
	r.mu.Unlock()
	if err := p.bm.Close(); err != nil {
		r.log.Warn("closing a replaced replica's bitmap", "replica", old, "err", err)
	}
	if err := os.Remove(bitmapPath(r.cfg.Dir, r.name, old)); err != nil && !errors.Is(err, os.ErrNotExist) {
		r.log.Warn("removing a replaced replica's bitmap", "replica", old, "err", err)
	}
	r.log.Warn("replica replaced: the new one is built by a full resync", "old", old, "new", next, "generation", st.Generation)
	return nil
}

// resumePeer restarts the loop of a peer ReplacePeer stopped and could not
// replace, and returns err.
func (r *Replicator) resumePeer(p *peer, err error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	q := r.newPeer(p.node, p.idx, p.bm, p.compare)
	q.state.Store(p.state.Load())
	q.downSince.Store(p.downSince.Load())
	q.lastErr = p.lastErr
	r.peers[p.idx] = q
	if !r.closed.Load() {
		r.startLoop(q)
	}
	return err
}
