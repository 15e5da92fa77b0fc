package volume

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/replication"
)

// MaxRepl is the most copies a volume may have, the owner's included.
const MaxRepl = 3

// newReplicator builds the replication stage of a volume owned here.
func (m *Registry) newReplicator(v *Volume, s api.Spec, e ioengine.Engine) (*replication.Replicator, error) {
	if m.opts.Replication == nil {
		return nil, api.Errorf(api.CodeUnavailable, "volume %s is replicated, but this daemon runs without replication (serve --node and --peer)", s.Name)
	}
	cfg := replication.VolumeConfig{
		Spec: s, Engine: e, Dir: m.dataDir(),
		Save: func(r api.Replication) error {
			_, err := m.saveSpec(v, func(s *api.Spec) error { s.Replication = &r; return nil })
			return err
		},
		OnFenced: func(epoch uint64) {
			if m.opts.OnFenced != nil {
				m.opts.OnFenced(v)
			}
		},
	}
	if s.Cluster != "" {
		// The cluster store learns of a state change before this
		// node's copy of it, and the pipeline serves only under the
		// ownership lease.
		c := m.opts.Cluster
		cfg.Lease = c.Lease(s.Name, s.Replication.Epoch)
		local := cfg.Save
		cfg.Save = func(r api.Replication) error {
			if err := c.SaveState(s.Name, r); err != nil {
				return err
			}
			return local(r)
		}
	}
	return m.opts.Replication.NewReplicator(cfg)
}

// placeReplicas fills in a new volume's replication state: the nodes of
// its other copies (s.Nodes, or the peers with the most free space), all
// in sync at generation 1, epoch 1.
func (m *Registry) placeReplicas(s *api.Spec) error {
	if s.Repl <= 1 {
		s.Repl, s.Nodes, s.Replication = 0, nil, nil
		return nil
	}
	if s.Repl > MaxRepl {
		return api.Errorf(api.CodeInvalid, "repl %d: want 1 to %d copies", s.Repl, MaxRepl)
	}
	n := m.opts.Replication
	if n == nil {
		return api.Errorf(api.CodeInvalid, "repl %d: this daemon runs without replication (start it with --node and --peer)", s.Repl)
	}
	peers := n.Peers()
	nodes := slices.DeleteFunc(slices.Clone(s.Nodes), func(x string) bool { return x == n.Name })
	switch {
	case len(nodes) > 0:
		slices.Sort(nodes)
		if d := slices.Compact(slices.Clone(nodes)); len(d) != len(nodes) {
			return api.Errorf(api.CodeInvalid, "nodes %s: a node holds at most one copy", strings.Join(s.Nodes, ","))
		}
		for _, x := range nodes {
			if !slices.Contains(peers, x) {
				return api.Errorf(api.CodeInvalid, "node %q is not a peer of this daemon (peers: %s)", x, strings.Join(peers, ", "))
			}
		}
		if len(nodes) != s.Repl-1 {
			return api.Errorf(api.CodeInvalid, "repl %d needs %d other nodes, --nodes names %d", s.Repl, s.Repl-1, len(nodes))
		}
	default:
		if len(peers) < s.Repl-1 {
			return api.Errorf(api.CodeInvalid, "repl %d needs %d other nodes; this daemon has %d peers", s.Repl, s.Repl-1, len(peers))
		}
		free := map[string]int64{}
		var why []string
		for _, p := range peers {
			free[p] = -1
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if b, err := n.FreeBytes(ctx, p); err == nil {
				free[p] = b
			} else {
				why = append(why, p+": "+err.Error())
			}
			cancel()
		}
		cands := slices.Clone(peers)
		sort.SliceStable(cands, func(i, j int) bool { return free[cands[i]] > free[cands[j]] })
		for _, p := range cands[:s.Repl-1] {
			if free[p] < 0 {
				return api.Errorf(api.CodeUnavailable, "repl %d: only %d of %d peers answer (%s)", s.Repl, countAnswering(free), len(peers), strings.Join(why, "; "))
			}
			nodes = append(nodes, p)
		}
	}
	st := &api.Replication{Role: api.RoleOwner, Owner: n.Name, Epoch: 1, Generation: 1}
	for _, x := range nodes {
		st.Replicas = append(st.Replicas, api.Replica{Node: x, InSync: true})
	}
	s.Nodes, s.Replication = nil, st
	return nil
}

func countAnswering(free map[string]int64) int {
	n := 0
	for _, b := range free {
		if b >= 0 {
			n++
		}
	}
	return n
}

// The replica service's view of the registry (replication.Copies).

// Copy returns the node's copy of a volume, owned or a replica.
func (m *Registry) Copy(name string) (replication.Copy, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	v, ok := m.vols[name]
	if !ok || v.Role() == "" {
		return nil, notFound(name)
	}
	if why, failed := v.Failed(); failed {
		return nil, api.Errorf(api.CodeConflict, "volume %s is failed: %s", name, why)
	}
	return v, nil
}

// CreateCopy creates a replica for its owner.
func (m *Registry) CreateCopy(spec api.Spec, r api.Replication) (replication.Copy, error) {
	s := api.Spec{Name: spec.Name, Size: spec.Size, BlockSize: spec.BlockSize, Engine: spec.Engine, Profile: spec.Profile,
		QoS: spec.QoS, ReadOnly: spec.ReadOnly, Repl: spec.Repl, Cluster: spec.Cluster, Replication: &r, CreatedAt: spec.CreatedAt}
	if s.CreatedAt.IsZero() {
		s.CreatedAt = time.Now().UTC().Truncate(time.Second)
	}
	if err := Validate(&s); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.vols[s.Name]; ok {
		return nil, api.Errorf(api.CodeExists, "volume %s already exists", s.Name)
	}
	v, err := m.createLocked(s)
	if err != nil {
		return nil, err
	}
	m.log.Info("replica created", "volume", s.Name, "owner", r.Owner, "size", s.Size, "engine", s.Engine)
	return v, nil
}

// DeleteCopy removes a replica for its owner.
func (m *Registry) DeleteCopy(name string) error {
	return m.delete(name, true)
}

// FreeBytes is the space left in the state dir's filesystem.
func (m *Registry) FreeBytes() int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(m.dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
}

// Engine is a replica's engine (replication.Copy); nil for a volume this
// node owns: only its own pipeline writes it.
func (v *Volume) Engine() ioengine.Engine {
	if v.Role() != api.RoleReplica {
		return nil
	}
	return v.engine
}

// Replication returns the volume's replication state.
func (v *Volume) Replication() api.Replication {
	if r := v.Spec().Replication; r != nil {
		return *r
	}
	return api.Replication{}
}

// SetReplication persists a replica's new replication state.
func (v *Volume) SetReplication(r api.Replication) error {
	_, err := v.reg.saveSpec(v, func(s *api.Spec) error { s.Replication = &r; return nil })
	return err
}

// StepDown turns a volume this node owned into a replica of owner at
// epoch: another node took it over. Its frontends are cut off and its
// pipeline reopened as a replica's.
func (v *Volume) StepDown(owner string, epoch uint64) error {
	return v.reg.reopen(v.name, func(r *api.Replication) error {
		if r.Role != api.RoleOwner || epoch <= r.Epoch {
			return api.Errorf(api.CodeConflict, "volume %s: not owned here at an older epoch", v.name)
		}
		r.Role, r.Owner, r.Epoch, r.Replicas = api.RoleReplica, owner, epoch, nil
		return nil
	})
}

// reopen changes a volume's replication state and reopens it with the
// pipeline of its new role: the old one drains (its requests fail if it
// was fenced), the engine's data stays.
func (m *Registry) reopen(name string, change func(*api.Replication) error) error {
	return m.reopenWith(name, change, nil, nil)
}

// reopenWith is reopen with two hooks: afterShut, if set, decides the new
// state once the old pipeline has drained (told whether the drain and its
// final flush failed) and the state is persisted only then; beforeOpen,
// if set, runs between the two pipelines (to remove files the new role
// must not inherit).
func (m *Registry) reopenWith(name string, change func(*api.Replication) error, beforeOpen func() error,
	afterShut func(v *Volume, shutErr error) (api.Replication, error)) error {
	m.mu.Lock()
	v, ok := m.vols[name]
	if !ok || v.Role() == "" {
		m.mu.Unlock()
		return notFound(name)
	}
	if why, failed := v.Failed(); failed {
		m.mu.Unlock()
		return api.Errorf(api.CodeConflict, "volume %s is failed: %s", name, why)
	}
	r := v.Replication()
	r.Replicas = slices.Clone(r.Replicas)
	if err := change(&r); err != nil {
		m.mu.Unlock()
		return err
	}
	s := v.Spec()
	if afterShut == nil {
		var err error
		if s, err = m.saveSpec(v, func(s *api.Spec) error { s.Replication = &r; return nil }); err != nil {
			m.mu.Unlock()
			return err
		}
	}
	delete(m.vols, name)
	m.deleting[name] = true
	m.mu.Unlock()
	if m.opts.OnDelete != nil {
		m.opts.OnDelete(v) // frontends of the old role go
	}
	shutErr := v.shut(false)
	if shutErr != nil {
		m.log.Warn("closing the volume to change its role", "volume", name, "err", shutErr)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.deleting, name)
	var err error
	if afterShut != nil {
		if r, err = afterShut(v, shutErr); err == nil {
			s, err = m.saveSpec(v, func(s *api.Spec) error { s.Replication = &r; return nil })
		}
	}
	if err == nil && beforeOpen != nil {
		err = beforeOpen()
	}
	var nv *Volume
	if err == nil {
		// The same engine, in the pipeline of the new role: a memory
		// volume's data stays too.
		nv, err = m.open(s, func(string, string, int64) (ioengine.Engine, error) { return v.engine, nil })
	}
	if err != nil {
		v.engine.Close()
		nv = newFailed(s, fmt.Sprintf("reopening as %s: %v", r.Role, err))
	}
	m.vols[name] = nv
	m.setFailedMetric(name, nv)
	if why, failed := nv.Failed(); failed {
		return fmt.Errorf("reopening %s as %s: %s", name, r.Role, why)
	}
	m.log.Info("volume role changed", "volume", name, "role", s.Replication.Role, "owner", s.Replication.Owner, "epoch", s.Replication.Epoch)
	return nil
}

// Promote makes this node's replica of a volume its owner, at an epoch
// above every epoch the reachable copies know, when no reachable copy
// holds a newer generation and no reachable node owns it (force skips
// those checks). Every other copy is resynced from this one, by
// checksum: writes in flight when the old owner failed may have reached
// some copies and not others.
func (m *Registry) Promote(name string, force bool) (api.Spec, error) {
	n := m.opts.Replication
	if n == nil {
		return api.Spec{}, api.Errorf(api.CodeConflict, "this daemon runs without replication")
	}
	m.mu.RLock()
	v, ok := m.vols[name]
	m.mu.RUnlock()
	if !ok {
		return api.Spec{}, notFound(name)
	}
	cur := v.Replication()
	if cur.Role != api.RoleReplica {
		return api.Spec{}, api.Errorf(api.CodeConflict, "volume %s is not a replica here (role %q)", name, cur.Role)
	}
	others := []string{cur.Owner}
	for _, rep := range cur.Replicas {
		if rep.Node != n.Name && !slices.Contains(others, rep.Node) {
			others = append(others, rep.Node)
		}
	}
	epoch := cur.Epoch
	var refusals []string
	var unreachable []string
	for _, o := range others {
		ctx, cancel := context.WithTimeout(context.Background(), n.Timeout)
		st, err := n.State(ctx, o, name)
		cancel()
		switch {
		case err != nil:
			unreachable = append(unreachable, o)
			continue
		case !st.Has:
			continue
		}
		epoch = max(epoch, st.Epoch)
		if st.Owner && st.Epoch >= cur.Epoch {
			refusals = append(refusals, fmt.Sprintf("%s owns it and answers", o))
		}
		if st.Generation > cur.Generation {
			refusals = append(refusals, fmt.Sprintf("%s holds a newer generation (%d, ours %d)", o, st.Generation, cur.Generation))
		}
	}
	if len(refusals) > 0 && !force {
		return api.Spec{}, api.Errorf(api.CodeConflict, "promote %s refused: %s (--force overrides, and may lose acknowledged writes)", name, strings.Join(refusals, "; "))
	}
	if len(refusals) > 0 {
		m.log.Warn("promoting despite refusals (--force)", "volume", name, "refusals", strings.Join(refusals, "; "))
	}
	if len(unreachable) > 0 {
		m.log.Info("promoting without hearing from these nodes", "volume", name, "unreachable", strings.Join(unreachable, ","))
	}
	err := m.reopen(name, func(r *api.Replication) error {
		r.Role, r.Owner, r.Epoch = api.RoleOwner, n.Name, epoch+1
		r.Generation++
		var reps []api.Replica
		for _, o := range others {
			reps = append(reps, api.Replica{Node: o, Compare: true})
		}
		r.Replicas = reps
		return nil
	})
	if err != nil {
		return api.Spec{}, err
	}
	nv, err := m.Volume(name)
	if err != nil {
		return api.Spec{}, err
	}
	m.log.Warn("volume promoted: this node owns it now", "volume", name, "epoch", epoch+1)
	return nv.Spec(), nil
}

// Verify compares every in-sync replica of a volume owned here with this
// copy (see replication.Replicator.Verify).
func (v *Volume) Verify(ctx context.Context) ([]api.ReplicaVerify, error) {
	if v.repl == nil {
		return nil, api.Errorf(api.CodeConflict, "volume %s has no replicas here to verify (repl 1, or not owned by this node)", v.name)
	}
	return v.repl.Verify(ctx), nil
}

// Resync retries every replica of a volume owned here that is not in sync.
func (v *Volume) Resync() error {
	if v.repl == nil {
		return api.Errorf(api.CodeConflict, "volume %s has no replicas here (repl 1, or not owned by this node)", v.name)
	}
	v.repl.Resync()
	return nil
}

// ResyncCopied returns the bytes resyncs sent to each replica of a volume
// owned here.
func (v *Volume) ResyncCopied() map[string]int64 {
	if v.repl == nil {
		return nil
	}
	return v.repl.Copied()
}
