// Package cluster is blockd's control plane: what the nodes of a cluster
// agree on, kept in etcd (an existing distributed store; blockd runs no
// consensus of its own). A node without a cluster needs none of it.
//
// Everything lives under one prefix (default /blockd/):
//
//	cluster                 the cluster's id, made by the first node
//	members/NODE            NodeInfo of every node that ever joined
//	alive/NODE              NodeInfo, bound to the node's lease: present while it lives
//	volumes/VOL             Volume: the spec and the nodes holding a copy
//	state/VOL               State: in-sync set, generation, last owner, clean flag
//	owners/VOL              the owner's name, bound to its node's lease
//	moves/VOL               Move: a requested hand-over
//	copies/VOL/NODE         a node holds its copy of VOL (made by the node)
//
// Ownership. A node owns a volume while owners/VOL, which it created with
// a transaction that required the key to be absent, exists. The key's
// create revision is the owner's epoch: etcd's revisions only grow, so a
// later owner always has a higher epoch, and replicas refuse a lower one
// (fencing at the replicas). The key is bound to the node's lease: if the
// node dies or is cut off from etcd, the lease expires and the key goes,
// and another node may take the volume, but only a node in the in-sync
// set of state/VOL, which the owner changes (guarded by its owner key)
// before it acknowledges a write a dropped replica missed.
//
// The owner keeps its lease alive with a keep-alive every TTL/5, and
// counts it valid until the time it sent the last successful keep-alive
// plus 0.9 TTL: etcd expires the lease no earlier than TTL after it
// received that keep-alive, so an owner cut off stops serving before any
// other node can take over (package replication gates every request on
// it).
package cluster
