// Package volume is the node's volume registry: each volume's metadata
// (api.Spec, stored crash-safely under the state dir), its backing engine
// (package ioengine) and its request pipeline, built the same way for
// every volume:
//
//	metrics -> read-only -> qos -> profile -> encryption -> replication -> engine
//
// (encryption only for encrypted volumes, replication only for the
// replicated volumes this node owns; a replica's pipeline is the engine
// alone).
//
// A Volume is what the frontends serve: the NBD server (nbd.Export) and
// the kernel devices of package attach (a pipeline.Handler).
package volume
