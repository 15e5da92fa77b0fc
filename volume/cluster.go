package volume

import (
	"errors"
	"fmt"
	"slices"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// Cluster is what the registry needs of the cluster a node belongs to
// (package daemon implements it over package cluster).
type Cluster interface {
	// Lease returns the ownership lease of a volume this node owns at
	// epoch: its owner pipeline serves only while it is valid.
	Lease(vol string, epoch uint64) replication.Lease
	// Owns reports whether the cluster says this node owns vol at epoch
	// (asked at start for each copy that says it is the owner: one that
	// is not opens as a replica).
	Owns(vol string, epoch uint64) bool
	// SaveState persists the replication state of a volume this node
	// owns in the cluster store; it returns once the store has it, or
	// with an error if this node no longer owns the volume.
	SaveState(vol string, r api.Replication) error
}

var errCluster = errors.New("volume of another cluster")

func errForeignCluster(vol, mine string) error {
	if mine == "" {
		return fmt.Errorf("%w: it belongs to cluster %s, and this daemon runs without --cluster; start it with the cluster's etcd", errCluster, vol)
	}
	return fmt.Errorf("%w: it belongs to cluster %s, this daemon to cluster %s", errCluster, vol, mine)
}

// TakeOwnership reopens this node's copy of a cluster volume as its owner
// with replication state r (epoch, generation, replicas). fresh: this
// node's bitmaps and activity log are not its history at the volume's
// last owner (another node owned it since), so they are removed first and
// r's Compare flags say which replicas are compared. Before it returns,
// every in-sync replica has been told the new epoch.
func (m *Registry) TakeOwnership(name string, r api.Replication, fresh bool) (*Volume, error) {
	var old []api.Replica
	if v, err := m.Volume(name); err == nil {
		old = v.Replication().Replicas
	}
	err := m.reopenWith(name, func(cur *api.Replication) error {
		*cur = r
		cur.Role = api.RoleOwner
		cur.Replicas = slices.Clone(r.Replicas)
		return nil
	}, func() error {
		if !fresh {
			return nil
		}
		// Also the bitmaps of nodes that left the volume since.
		return replication.RemoveFiles(m.dataDir(), name, append(old, r.Replicas...))
	}, nil)
	if err != nil {
		return nil, err
	}
	v, err := m.Volume(name)
	if err != nil {
		return nil, err
	}
	if v.repl != nil {
		if err := v.repl.OpenSessions(); err != nil {
			return nil, fmt.Errorf("volume %s: telling the replicas the new epoch: %w", name, err)
		}
	}
	m.log.Info("this node owns the volume now", "volume", name, "epoch", r.Epoch, "generation", v.Replication().Generation)
	return v, nil
}

// GiveUpOwnership reopens a volume this node owns as a replica: its
// frontends are cut off, its writes drained and flushed everywhere. It
// returns the final replication state, and an error if the drain or flush
// failed (then the copies may differ: the hand-over is not clean).
func (m *Registry) GiveUpOwnership(name string) (api.Replication, error) {
	var final api.Replication
	var shutErr error
	err := m.reopenWith(name, func(cur *api.Replication) error {
		if cur.Role != api.RoleOwner {
			return api.Errorf(api.CodeConflict, "volume %s is not owned here", name)
		}
		return nil
	}, nil, func(v *Volume, err error) (api.Replication, error) {
		// After the drain: the state the replicator last persisted.
		shutErr = err
		r := v.Replication()
		if v.repl != nil {
			r = v.repl.State()
		}
		final = r
		r.Role, r.Replicas = api.RoleReplica, nil
		return r, nil
	})
	if err != nil {
		return api.Replication{}, err
	}
	return final, shutErr
}

// Fence stops a volume this node owns for good: the cluster says another
// node owns it, or this node lost its ownership.
func (m *Registry) Fence(name string, cause error) {
	v, err := m.Volume(name)
	if err != nil || v.repl == nil {
		return
	}
	v.repl.Fence(cause)
}

// ReplaceReplica gives a volume owned here a new replica on node next in
// place of the one on node old (replication.Replicator.ReplacePeer).
func (v *Volume) ReplaceReplica(old, next string) error {
	if v.repl == nil {
		return api.Errorf(api.CodeConflict, "volume %s has no replicas here", v.name)
	}
	return v.repl.ReplacePeer(old, next)
}

// Fenced reports whether the volume's owner pipeline is fenced.
func (v *Volume) Fenced() bool { return v.repl != nil && v.repl.Fenced() }

// SyncSpec applies a cluster volume's spec as the cluster store has it
// (io_profile, QoS, read-only) to this node's copy, whatever its role.
func (m *Registry) SyncSpec(name string, want api.Spec) error {
	v, err := m.Volume(name)
	if err != nil {
		return err
	}
	cur := v.Spec()
	if cur.Profile == want.Profile && cur.QoS == want.QoS && cur.ReadOnly == want.ReadOnly {
		return nil
	}
	if v.Role() == api.RoleOwner {
		_, err := m.Update(name, func(s *api.Spec) error {
			s.Profile, s.QoS, s.ReadOnly = want.Profile, want.QoS, want.ReadOnly
			return nil
		})
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	_, err = m.saveSpec(v, func(s *api.Spec) error {
		s.Profile, s.QoS, s.ReadOnly = want.Profile, want.QoS, want.ReadOnly
		return nil
	})
	return err
}
