// Package probe gives per-pod block I/O visibility with eBPF.
//
// BPF programs on the block layer's request start tracepoint
// (block_io_start on 6.5+ kernels, block_rq_issue before, chosen by
// looking the tracepoints up in the kernel's BTF) and its completion
// tracepoint (block_rq_complete, which reports the bytes completed) count, per cgroup, device and op
// class, the requests, bytes and a log2 latency histogram in per-CPU maps.
// Nothing crosses to user space per request: [Probe.Snapshot] reads the
// maps, resolves cgroup ids to Kubernetes pods and containers from the
// cgroup v2 path (kubelet's cgroupfs and systemd layouts) and returns a
// [Snapshot]. The Probe is a prometheus.Collector (see [NewCollector]) and
// [Top] draws snapshots as a refreshing terminal table.
//
// # Attribution
//
// A request is charged to the cgroup of its bio's blkcg when that lives on
// the cgroup v2 hierarchy, so buffered writeback that a kworker submits is
// charged to the writer; when the submitting task sits below that blkcg
// (the io controller is not enabled all the way down) or the blkcg belongs
// to cgroup v1 (hybrid hosts), the submitting task's v2 cgroup is used.
// Pod names and namespaces come from the kubelet's log directory
// /var/log/pods/<namespace>_<name>_<uid>, which exists for every pod on
// the node; the container label is the runtime's container id from the
// cgroup name.
//
// # Wiring in the daemon
//
//	p, err := probe.New(probe.Options{AllDevices: flagProbeDevices == "all"})
//	if errors.Is(err, probe.ErrUnavailable) {
//		log.Printf("per-pod I/O stats disabled: %v", err) // run without
//	} else if err != nil {
//		return err
//	} else {
//		defer p.Close()
//		registry.MustRegister(p)         // blockd_pod_* metrics
//		go p.Run(ctx, time.Minute)      // drops dead cgroups without scrapes
//		// whenever the set of exported devices changes:
//		dev, _ := probe.DevOfPath("/dev/nbd0")
//		p.SetDevices([]uint32{dev /* , ... */})
//		// API route for `blockd top`: JSON of p.Snapshot()
//	}
//
// and in `blockd top`: probe.Top(ctx, os.Stdout, fetchSnapshotFromAPI, time.Second).
//
// Without BPF permission or kernel BTF, [New] fails with an error that
// wraps [ErrUnavailable].
package probe
