// Package probe gives per-pod block I/O visibility with eBPF.
//
// BPF programs on the block layer's request start and completion
// tracepoints (block_io_start/block_io_done on 6.5+ kernels,
// block_rq_issue/block_rq_complete before) count, per cgroup, device and op
// class, the requests, bytes and a log2 latency histogram in per-CPU maps.
// Nothing crosses to user space per request: [Probe.Snapshot] reads the
// maps, resolves cgroup ids to Kubernetes pods and containers from the
// cgroup v2 path (kubelet's cgroupfs and systemd layouts) and returns a
// [Snapshot]. [NewCollector] turns snapshots into Prometheus metrics and
// [Top] into a refreshing terminal table.
//
// Without BPF permission or kernel BTF, [New] fails with an error that
// wraps [ErrUnavailable]; the daemon logs it and runs without probes.
package probe
