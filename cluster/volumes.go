package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/blockd/blockd/api"
)

// Volume is a cluster volume's record: what it is and where its copies
// are.
type Volume struct {
	Spec  api.Spec `json:"spec"`
	Nodes []string `json:"nodes"` // a copy each, sorted
}

// State is a cluster volume's replication state. Only the owner writes it
// while it owns the volume (guarded by its owner key); a node taking the
// volume over writes it in the same transaction that makes it owner.
type State struct {
	// Owner is the node that owns or last owned the volume, at Epoch.
	Owner string `json:"owner,omitempty"`
	Epoch uint64 `json:"epoch,omitempty"`
	// Generation changes with the in-sync set.
	Generation uint64 `json:"generation"`
	// InSync are the nodes whose copies have every acknowledged write,
	// the owner's included: the only nodes that may become owner.
	InSync []string `json:"in_sync"`
	// Clean: the last owner released the volume with nothing in flight,
	// so the in-sync copies are identical.
	Clean bool `json:"clean"`
	// Attached names the volume's kernel device ("node:/dev/nbd0").
	Attached string `json:"attached,omitempty"`
	// LastFailover is the last change of owner.
	LastFailover *api.Failover `json:"last_failover,omitempty"`
}

// Move is a requested hand-over of a volume to node To; the owner writes
// Error if it refuses.
type Move struct {
	To    string    `json:"to"`
	At    time.Time `json:"at"`
	Error string    `json:"error,omitempty"`
}

// VolumeInfo is everything the store holds about a volume, read at one
// revision.
type VolumeInfo struct {
	Volume
	State State
	// Owner owns the volume now ("" none), at Epoch, under OwnerLease.
	Owner      string
	Epoch      uint64
	OwnerLease int64
	Move       *Move
	// Copies are what the nodes said of their copies: "ok", or
	// "error: why" when a node could not make its copy.
	Copies map[string]string

	volRev, stateRev int64
}

// Has reports whether node holds a copy.
func (v VolumeInfo) Has(node string) bool { return slices.Contains(v.Nodes, node) }

// InSync reports whether node's copy is in sync.
func (v VolumeInfo) InSync(node string) bool { return slices.Contains(v.State.InSync, node) }

// Placement is the API's view of the volume's place.
func (v VolumeInfo) Placement() *api.Placement {
	return &api.Placement{Nodes: v.Nodes, InSync: v.State.InSync, Owner: v.Owner, Epoch: v.Epoch,
		Generation: v.State.Generation, Attached: v.State.Attached, LastFailover: v.State.LastFailover}
}

func (s *Store) readOps(name string) []clientv3.Op {
	return []clientv3.Op{
		clientv3.OpGet(s.key("volumes", name)),
		clientv3.OpGet(s.key("state", name)),
		clientv3.OpGet(s.key("owners", name)),
		clientv3.OpGet(s.key("moves", name)),
		clientv3.OpGet(s.key("copies", name+"/"), clientv3.WithPrefix()),
	}
}

// Get reads a volume; a volume the store does not hold is an
// api.CodeNotFound error.
func (s *Store) Get(ctx context.Context, name string) (VolumeInfo, error) {
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Txn(c).Then(s.readOps(name)...).Commit()
	if err != nil {
		return VolumeInfo{}, unreachable(err)
	}
	var kvs [5][]*mvccpb.KeyValue
	for i, r := range resp.Responses {
		kvs[i] = r.GetResponseRange().Kvs
	}
	if len(kvs[0]) == 0 {
		return VolumeInfo{}, api.Errorf(api.CodeNotFound, "volume %s not found in the cluster", name)
	}
	return s.decode(name, kvs[0][0], first(kvs[1]), first(kvs[2]), first(kvs[3]), kvs[4])
}

func first(kvs []*mvccpb.KeyValue) *mvccpb.KeyValue {
	if len(kvs) == 0 {
		return nil
	}
	return kvs[0]
}

func (s *Store) decode(name string, vol, state, owner, move *mvccpb.KeyValue, copies []*mvccpb.KeyValue) (VolumeInfo, error) {
	var vi VolumeInfo
	if err := json.Unmarshal(vol.Value, &vi.Volume); err != nil {
		return VolumeInfo{}, fmt.Errorf("cluster: the record of volume %s is corrupt: %w", name, err)
	}
	vi.volRev = vol.ModRevision
	if state != nil {
		if err := json.Unmarshal(state.Value, &vi.State); err != nil {
			return VolumeInfo{}, fmt.Errorf("cluster: the state of volume %s is corrupt: %w", name, err)
		}
		vi.stateRev = state.ModRevision
	}
	if owner != nil {
		vi.Owner, vi.Epoch, vi.OwnerLease = string(owner.Value), uint64(owner.CreateRevision), owner.Lease
	}
	if move != nil {
		var m Move
		if json.Unmarshal(move.Value, &m) == nil {
			vi.Move = &m
		}
	}
	vi.Copies = map[string]string{}
	for _, kv := range copies {
		vi.Copies[strings.TrimPrefix(string(kv.Key), s.key("copies", name+"/"))] = string(kv.Value)
	}
	return vi, nil
}

// List reads every volume at one revision, which it returns.
func (s *Store) List(ctx context.Context) ([]VolumeInfo, int64, error) {
	c, cancel := s.call(ctx)
	defer cancel()
	kinds := []string{"volumes", "state", "owners", "moves", "copies"}
	var ops []clientv3.Op
	for _, k := range kinds {
		ops = append(ops, clientv3.OpGet(s.p+k+"/", clientv3.WithPrefix()))
	}
	resp, err := s.cli.Txn(c).Then(ops...).Commit()
	if err != nil {
		return nil, 0, unreachable(err)
	}
	by := make([]map[string]*mvccpb.KeyValue, 4)
	copies := map[string][]*mvccpb.KeyValue{}
	for i, r := range resp.Responses {
		pre := s.p + kinds[i] + "/"
		if i < 4 {
			by[i] = map[string]*mvccpb.KeyValue{}
		}
		for _, kv := range r.GetResponseRange().Kvs {
			name := strings.TrimPrefix(string(kv.Key), pre)
			if i == 4 {
				vol, _, _ := strings.Cut(name, "/")
				copies[vol] = append(copies[vol], kv)
				continue
			}
			by[i][name] = kv
		}
	}
	var out []VolumeInfo
	for name, kv := range by[0] {
		vi, err := s.decode(name, kv, by[1][name], by[2][name], by[3][name], copies[name])
		if err != nil {
			s.log.Error("skipping a volume whose record cannot be read", "volume", name, "err", err)
			continue
		}
		out = append(out, vi)
	}
	slices.SortFunc(out, func(a, b VolumeInfo) int { return strings.Compare(a.Spec.Name, b.Spec.Name) })
	return out, resp.Header.Revision, nil
}

// CreateVolume records a new volume: its copies, all in sync at
// generation 1 and empty, are made by the nodes that hold them.
func (s *Store) CreateVolume(ctx context.Context, v Volume) error {
	name := v.Spec.Name
	st := State{Generation: 1, InSync: v.Nodes, Clean: true}
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Txn(c).If(clientv3.Compare(clientv3.CreateRevision(s.key("volumes", name)), "=", 0)).Then(
		clientv3.OpPut(s.key("volumes", name), mustJSON(v)),
		clientv3.OpPut(s.key("state", name), mustJSON(st)),
		clientv3.OpDelete(s.key("owners", name)),
		clientv3.OpDelete(s.key("moves", name)),
	).Commit()
	if err != nil {
		return unreachable(err)
	}
	if !resp.Succeeded {
		return api.Errorf(api.CodeExists, "volume %s already exists in the cluster", name)
	}
	return nil
}

// DeleteVolume removes a volume's records once check accepts what the
// store holds about it; every node then removes its copy.
func (s *Store) DeleteVolume(ctx context.Context, name string, check func(VolumeInfo) error) error {
	for range 5 {
		vi, err := s.Get(ctx, name)
		if err != nil {
			return err
		}
		if err := check(vi); err != nil {
			return err
		}
		c, cancel := s.call(ctx)
		resp, err := s.cli.Txn(c).If(
			clientv3.Compare(clientv3.ModRevision(s.key("volumes", name)), "=", vi.volRev),
			clientv3.Compare(clientv3.ModRevision(s.key("state", name)), "=", vi.stateRev),
			clientv3.Compare(clientv3.CreateRevision(s.key("owners", name)), "=", int64(vi.Epoch)),
		).Then(
			clientv3.OpDelete(s.key("volumes", name)),
			clientv3.OpDelete(s.key("state", name)),
			clientv3.OpDelete(s.key("owners", name)),
			clientv3.OpDelete(s.key("moves", name)),
		).Commit()
		cancel()
		if err != nil {
			return unreachable(err)
		}
		if resp.Succeeded {
			return nil
		}
	}
	return api.Errorf(api.CodeConflict, "volume %s kept changing while being deleted; try again", name)
}

// OwnedError is the refusal of a volume that a live node owns.
type OwnedError struct {
	Volume, Owner string
	Epoch         uint64
	// ExpiresIn is how long the owner's lease has left, as etcd counts
	// it (a dead owner's runs out).
	ExpiresIn time.Duration
}

func (e *OwnedError) Error() string {
	return fmt.Sprintf("volume %s is owned by node %s (epoch %d, its lease has %s left); use it there, or move it with `blockd volume move %s --to NODE`",
		e.Volume, e.Owner, e.Epoch, e.ExpiresIn.Round(time.Second), e.Volume)
}

// Acquire makes this node the volume's owner: if no node owns it, and
// check accepts what the store holds, it creates the owner key under the
// session's lease, in one transaction with the volume's state as next
// makes it from the current one. It returns the ownership, whose epoch is
// the key's create revision, and the volume as it was just before. A
// volume another node owns is an *OwnedError (in an api.CodeConflict).
func (s *Store) Acquire(ctx context.Context, ss *Session, name string, check func(VolumeInfo) error, next func(VolumeInfo) State) (*Ownership, VolumeInfo, error) {
	for attempt := 0; ; attempt++ {
		vi, err := s.Get(ctx, name)
		if err != nil {
			return nil, VolumeInfo{}, err
		}
		lease := ss.Lease()
		if vi.Owner != "" {
			if vi.Owner == s.cfg.Node && vi.OwnerLease == lease {
				return ss.held(name, vi.Epoch, lease), vi, nil
			}
			if vi.Owner == s.cfg.Node && attempt == 0 {
				// Ours, under a lease of an earlier run of this
				// daemon that it could not adopt: that run is over.
				s.log.Warn("revoking a lease of this node's previous run that still owns a volume", "volume", name, "lease", fmt.Sprintf("%x", vi.OwnerLease))
				c, cancel := s.call(ctx)
				_, err := s.cli.Revoke(c, clientv3.LeaseID(vi.OwnerLease))
				cancel()
				if err != nil && !strings.Contains(err.Error(), "not found") {
					return nil, VolumeInfo{}, unreachable(err)
				}
				continue
			}
			return nil, vi, api.Errorf(api.CodeConflict, "%w", s.ownedError(ctx, vi))
		}
		if err := check(vi); err != nil {
			return nil, vi, err
		}
		st := next(vi)
		c, cancel := s.call(ctx)
		resp, err := s.cli.Txn(c).If(
			clientv3.Compare(clientv3.CreateRevision(s.key("owners", name)), "=", 0),
			clientv3.Compare(clientv3.ModRevision(s.key("volumes", name)), "=", vi.volRev),
			clientv3.Compare(clientv3.ModRevision(s.key("state", name)), "=", vi.stateRev),
		).Then(
			clientv3.OpPut(s.key("owners", name), s.cfg.Node, clientv3.WithLease(clientv3.LeaseID(lease))),
			clientv3.OpPut(s.key("state", name), mustJSON(st)),
		).Commit()
		cancel()
		if err != nil {
			return nil, vi, unreachable(err)
		}
		if resp.Succeeded {
			return ss.held(name, uint64(resp.Header.Revision), lease), vi, nil
		}
		if attempt >= 3 {
			return nil, vi, api.Errorf(api.CodeConflict, "volume %s kept changing while this node tried to take it; try again", name)
		}
	}
}

func (s *Store) ownedError(ctx context.Context, vi VolumeInfo) *OwnedError {
	e := &OwnedError{Volume: vi.Spec.Name, Owner: vi.Owner, Epoch: vi.Epoch}
	c, cancel := s.call(ctx)
	defer cancel()
	if r, err := s.cli.TimeToLive(c, clientv3.LeaseID(vi.OwnerLease)); err == nil && r.TTL > 0 {
		e.ExpiresIn = time.Duration(r.TTL) * time.Second
	}
	return e
}

// SaveState persists the state of a volume this node owns. While etcd
// cannot be reached it keeps trying (the caller's writes wait: nothing is
// acknowledged around a state change), until ctx ends or the ownership is
// lost (ErrNotOwner).
func (s *Store) SaveState(ctx context.Context, o *Ownership, st State) error {
	start, logged := time.Now(), time.Now()
	backoff := 100 * time.Millisecond
	for {
		if o.Lost() {
			return ErrNotOwner
		}
		c, cancel := s.call(ctx)
		resp, err := s.cli.Txn(c).If(clientv3.Compare(clientv3.CreateRevision(s.key("owners", o.Volume)), "=", int64(o.Epoch))).
			Then(clientv3.OpPut(s.key("state", o.Volume), mustJSON(st))).Commit()
		cancel()
		switch {
		case err == nil && resp.Succeeded:
			if time.Since(start) > time.Second {
				s.log.Info("volume state persisted after etcd came back", "volume", o.Volume, "waited", time.Since(start).Round(time.Millisecond))
			}
			return nil
		case err == nil:
			o.Lose()
			return ErrNotOwner
		case ctx.Err() != nil:
			return ctx.Err()
		}
		if time.Since(logged) > 5*time.Second {
			s.log.Warn("waiting for etcd to persist a volume's state; its writes wait", "volume", o.Volume, "waiting", time.Since(start).Round(time.Second), "err", err)
			logged = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// Release gives up a volume this node owns, with its final state (Clean
// if nothing was in flight).
func (s *Store) Release(ctx context.Context, o *Ownership, st State) error {
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Txn(c).If(clientv3.Compare(clientv3.CreateRevision(s.key("owners", o.Volume)), "=", int64(o.Epoch))).Then(
		clientv3.OpDelete(s.key("owners", o.Volume)),
		clientv3.OpPut(s.key("state", o.Volume), mustJSON(st)),
	).Commit()
	if err != nil {
		return unreachable(err)
	}
	o.Lose()
	if !resp.Succeeded {
		return ErrNotOwner
	}
	return nil
}

// SetNodes changes where a volume this node owns keeps its copies (a
// replica replaced).
func (s *Store) SetNodes(ctx context.Context, o *Ownership, nodes []string) error {
	vi, err := s.Get(ctx, o.Volume)
	if err != nil {
		return err
	}
	vi.Nodes = slices.Sorted(slices.Values(nodes))
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Txn(c).If(
		clientv3.Compare(clientv3.CreateRevision(s.key("owners", o.Volume)), "=", int64(o.Epoch)),
		clientv3.Compare(clientv3.ModRevision(s.key("volumes", o.Volume)), "=", vi.volRev),
	).Then(clientv3.OpPut(s.key("volumes", o.Volume), mustJSON(vi.Volume))).Commit()
	if err != nil {
		return unreachable(err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("cluster: volume %s changed while its nodes were being set, or this node lost it", o.Volume)
	}
	return nil
}

// UpdateSpec changes a volume's spec (profile, QoS, read-only).
func (s *Store) UpdateSpec(ctx context.Context, name string, fn func(*api.Spec) error) (Volume, error) {
	for range 5 {
		vi, err := s.Get(ctx, name)
		if err != nil {
			return Volume{}, err
		}
		if err := fn(&vi.Spec); err != nil {
			return Volume{}, err
		}
		c, cancel := s.call(ctx)
		resp, err := s.cli.Txn(c).If(clientv3.Compare(clientv3.ModRevision(s.key("volumes", name)), "=", vi.volRev)).
			Then(clientv3.OpPut(s.key("volumes", name), mustJSON(vi.Volume))).Commit()
		cancel()
		if err != nil {
			return Volume{}, unreachable(err)
		}
		if resp.Succeeded {
			return vi.Volume, nil
		}
	}
	return Volume{}, api.Errorf(api.CodeConflict, "volume %s kept changing; try again", name)
}

// SetMove records a requested hand-over (m nil: clears it).
func (s *Store) SetMove(ctx context.Context, name string, m *Move) error {
	c, cancel := s.call(ctx)
	defer cancel()
	var err error
	if m == nil {
		_, err = s.cli.Delete(c, s.key("moves", name))
	} else {
		_, err = s.cli.Txn(c).If(clientv3.Compare(clientv3.CreateRevision(s.key("volumes", name)), ">", 0)).
			Then(clientv3.OpPut(s.key("moves", name), mustJSON(m))).Commit()
	}
	if err != nil {
		return unreachable(err)
	}
	return nil
}

// SetCopy records what became of this node's copy of a volume: "ok",
// "error: why", or "" once it is gone.
func (s *Store) SetCopy(ctx context.Context, name, status string) error {
	c, cancel := s.call(ctx)
	defer cancel()
	var err error
	k := s.key("copies", name+"/"+s.cfg.Node)
	if status != "" {
		_, err = s.cli.Put(c, k, status)
	} else {
		_, err = s.cli.Delete(c, k)
	}
	if err != nil {
		return unreachable(err)
	}
	return nil
}

// Owned returns the volumes this node owns under lease, with their
// epochs: what a starting daemon may serve as owner.
func (s *Store) Owned(ctx context.Context, lease int64) (map[string]uint64, error) {
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Get(c, s.p+"owners/", clientv3.WithPrefix())
	if err != nil {
		return nil, unreachable(err)
	}
	out := map[string]uint64{}
	for _, kv := range resp.Kvs {
		if string(kv.Value) == s.cfg.Node && kv.Lease == lease {
			out[strings.TrimPrefix(string(kv.Key), s.p+"owners/")] = uint64(kv.CreateRevision)
		}
	}
	return out, nil
}

// Copies reads what the nodes said of their copies of a volume, deleted
// or not.
func (s *Store) Copies(ctx context.Context, name string) (map[string]string, error) {
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Get(c, s.key("copies", name+"/"), clientv3.WithPrefix())
	if err != nil {
		return nil, unreachable(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[strings.TrimPrefix(string(kv.Key), s.key("copies", name+"/"))] = string(kv.Value)
	}
	return out, nil
}

// Nodes lists every node that joined the cluster, with whether its lease
// is alive.
func (s *Store) Nodes(ctx context.Context) (members []NodeInfo, alive map[string]NodeInfo, err error) {
	c, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Txn(c).Then(
		clientv3.OpGet(s.p+"members/", clientv3.WithPrefix()),
		clientv3.OpGet(s.p+"alive/", clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, nil, unreachable(err)
	}
	alive = map[string]NodeInfo{}
	for i, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			var ni NodeInfo
			if err := json.Unmarshal(kv.Value, &ni); err != nil {
				s.log.Warn("skipping a node record that cannot be read", "key", string(kv.Key), "err", err)
				continue
			}
			if i == 0 {
				members = append(members, ni)
			} else {
				alive[ni.Name] = ni
			}
		}
	}
	return members, alive, nil
}

// Watch signals changed (without blocking: a signal pending is enough)
// whenever a key of the cluster changes, and once at the start, until ctx
// ends. Consumers re-read what they need, so a watch that breaks loses
// nothing: it signals and starts again.
func (s *Store) Watch(ctx context.Context, changed chan<- struct{}) {
	signal := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	signal()
	for ctx.Err() == nil {
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for resp := range s.cli.Watch(wctx, s.p, clientv3.WithPrefix()) {
			if resp.Err() != nil {
				break
			}
			signal()
		}
		wcancel()
		signal()
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// IsUnreachable reports whether err is etcd not answering.
func IsUnreachable(err error) bool { return errors.Is(err, ErrUnreachable) }
