// Package podio holds the per-pod block I/O accounting as the daemon
// reports it (GET /v1/io/pods) and `blockd top` renders it, apart from the
// eBPF programs that collect it (package probe), so that API clients do
// not link the eBPF loader.
package podio

import (
	"math"
	"sort"
	"time"
)

// Snapshot is the cumulative block I/O accounting at one instant, one
// Entry per (cgroup, device). Counters only grow while a cgroup lives, so
// rates come from the difference of two snapshots. It is the JSON the
// daemon's API returns for `blockd top`.
type Snapshot struct {
	Time    time.Time `json:"time"`
	Entries []Entry   `json:"entries"`
	// StatsFull counts completions lost because the BPF stats map was
	// full; Unmatched counts completions on accounted devices whose
	// start was not recorded (in flight when the probe attached, or not
	// accounted by the block layer, like the flush requests of a
	// flush sequence); NoSlot counts starts that found no free slot.
	StatsFull uint64 `json:"stats_full,omitempty"`
	Unmatched uint64 `json:"unmatched,omitempty"`
	NoSlot    uint64 `json:"no_slot,omitempty"`
}

// Entry is the I/O of one cgroup on one device. PodUID is empty for
// cgroups outside the kubelet's pod tree (Cgroup still names them).
type Entry struct {
	CgroupID  uint64 `json:"cgroup_id"`
	Cgroup    string `json:"cgroup"` // path below the cgroup v2 mount
	PodUID    string `json:"pod_uid,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Pod       string `json:"pod,omitempty"`
	Container string `json:"container,omitempty"` // container id
	Dev       uint32 `json:"dev"`                 // kernel dev_t, see Dev
	Device    string `json:"device"`              // e.g. "nbd0", or "43:0"

	Reads        uint64 `json:"reads"`
	Writes       uint64 `json:"writes"`
	Flushes      uint64 `json:"flushes"`
	Discards     uint64 `json:"discards"`
	Others       uint64 `json:"others"`
	ReadBytes    uint64 `json:"read_bytes"`
	WriteBytes   uint64 `json:"write_bytes"`
	DiscardBytes uint64 `json:"discard_bytes"`

	// Latency[i] counts requests (of every op) that took [2^i, 2^(i+1))
	// ns from start to completion; the last slot also holds longer ones.
	Latency      []uint64 `json:"latency_log2_ns"`
	LatencySumNs uint64   `json:"latency_sum_ns"`
}

// Ops is the number of completed requests of every op class.
func (e *Entry) Ops() uint64 { return e.Reads + e.Writes + e.Flushes + e.Discards + e.Others }

// Sort orders entries by pod, container, cgroup and device so that
// snapshots (and their JSON) are stable.
func (s *Snapshot) Sort() {
	sort.Slice(s.Entries, func(i, j int) bool {
		a, b := &s.Entries[i], &s.Entries[j]
		if a.PodUID != b.PodUID {
			return a.PodUID < b.PodUID
		}
		if a.Container != b.Container {
			return a.Container < b.Container
		}
		if a.Cgroup != b.Cgroup {
			return a.Cgroup < b.Cgroup
		}
		return a.Dev < b.Dev
	})
}

// Slots is the number of log2 latency histogram slots: slot i counts
// requests that took [2^i, 2^(i+1)) ns.
const Slots = 40

// SlotUpperBound is the exclusive upper bound of histogram slot i.
func SlotUpperBound(i int) time.Duration {
	return time.Duration(math.Ldexp(1, i+1))
}

// Quantile returns the upper bound of the log2 slot holding quantile q of
// the histogram, 0 for an empty one. Log2 slots make it an overestimate by
// at most 2x, the usual price of a fixed-size in-kernel histogram.
func Quantile(hist []uint64, q float64) time.Duration {
	var total uint64
	for _, n := range hist {
		total += n
	}
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	if rank == 0 {
		rank = 1
	}
	var cum uint64
	for i, n := range hist {
		cum += n
		if cum >= rank {
			return SlotUpperBound(i)
		}
	}
	return SlotUpperBound(len(hist) - 1)
}
