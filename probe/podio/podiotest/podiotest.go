// Package podiotest has fixtures for tests of per-pod I/O accounting: a
// pair of snapshots one second apart with the kinds of cgroups a node has.
package podiotest

import (
	"time"

	"github.com/blockd/blockd/probe/podio"
)

// Hist is a latency histogram with the given slots filled.
func Hist(slots map[int]uint64) []uint64 {
	h := make([]uint64, podio.Slots)
	for i, n := range slots {
		h[i] = n
	}
	return h
}

// Snapshots is a pair one second apart: a busy cgroupfs-layout pod, a
// systemd-layout pod without a name, a host cgroup, a new cgroup and an
// idle one.
func Snapshots() (podio.Snapshot, podio.Snapshot) {
	t0 := time.Date(2026, 11, 21, 13, 0, 0, 0, time.UTC)
	web := podio.Entry{CgroupID: 100, Cgroup: "/kubepods/burstable/pod0b7d8a4c/1111111111111111", PodUID: "0b7d8a4c",
		Namespace: "team-a", Pod: "web-0", Container: "1111111111111111", Dev: 43<<20 | 0, Device: "nbd0"}
	db := podio.Entry{CgroupID: 200, Cgroup: "/kubepods.slice/x", PodUID: "5f3c2b1a-7d6e-4c8b-9a0f-bbbbbbbbbbbb",
		Container: "2222222222222222", Dev: 259<<20 | 1, Device: "ublkb1"}
	host := podio.Entry{CgroupID: 300, Cgroup: "/system.slice/backup.service", Dev: 43<<20 | 0, Device: "nbd0"}
	idle := podio.Entry{CgroupID: 400, Cgroup: "/kubepods/besteffort/podidle/3333", PodUID: "idle", Namespace: "ops",
		Pod: "idle", Container: "3333", Dev: 43<<20 | 0, Device: "nbd0", Reads: 5, Latency: Hist(map[int]uint64{20: 5})}

	p := podio.Snapshot{Time: t0}
	w0, d0, h0 := web, db, host
	w0.Reads, w0.ReadBytes, w0.Latency = 1000, 1000*4096, Hist(map[int]uint64{16: 1000})
	d0.Writes, d0.WriteBytes, d0.Latency = 10, 10*131072, Hist(map[int]uint64{18: 10})
	h0.Reads, h0.ReadBytes, h0.Latency = 1, 1<<20, Hist(map[int]uint64{22: 1})
	p.Entries = []podio.Entry{w0, d0, h0, idle}

	c := podio.Snapshot{Time: t0.Add(time.Second)}
	w1, d1, h1 := web, db, host
	// 5000 4k reads: 4950 around 65-131µs, 50 at 1-2ms -> p99 131µs.
	w1.Reads, w1.ReadBytes, w1.Latency = 6000, 6000*4096, Hist(map[int]uint64{16: 5950, 20: 50})
	// 2000 128k writes plus 5 flushes, 30 of them above 2^22 ns -> p99 8.4ms.
	d1.Writes, d1.WriteBytes, d1.Flushes, d1.Latency = 2010, 2010*131072, 5, Hist(map[int]uint64{18: 1985, 22: 30})
	h1.Reads, h1.ReadBytes, h1.Latency = 51, 51<<20, Hist(map[int]uint64{22: 51})
	fresh := podio.Entry{CgroupID: 500, Cgroup: "/kubepods/pod9/4444", PodUID: "9", Namespace: "team-c", Pod: "batch-1",
		Container: "4444", Dev: 43<<20 | 0, Device: "nbd0", Writes: 300, WriteBytes: 300 * 65536,
		Latency: Hist(map[int]uint64{30: 300})}
	c.Entries = []podio.Entry{w1, d1, h1, idle, fresh}
	return p, c
}
