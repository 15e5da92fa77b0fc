package probe

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/blockd/blockd/probe/podio"
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// ErrUnavailable is wrapped by every error New returns when the kernel or
// the process's privileges cannot run the probes (no BTF, no CAP_BPF,
// missing tracepoints). Callers test it with errors.Is and carry on
// without per-pod statistics.
var ErrUnavailable = errors.New("block I/O probes unavailable")

// Op classes, as the BPF program sorts requests.
const (
	OpRead    = 0
	OpWrite   = 1
	OpFlush   = 2
	OpDiscard = 3 // discard, secure erase and write-zeroes
	OpOther   = 4
	numOps    = 5
)

// Slots is the number of log2 latency histogram slots (podio.Slots): slot
// i counts latencies in [2^i, 2^(i+1)) nanoseconds, the last slot
// everything longer. It must match LAT_SLOTS in bpf/blockio.c.
const Slots = podio.Slots

// Counter indexes in the BPF `counters` map (enum counter in blockio.c).
const (
	cntStatsFull = 0
	cntNoStart   = 1
	cntNoSlot    = 2
)

// Dev returns the kernel's dev_t encoding (major<<20 | minor) that
// SetDevices takes and the BPF side compares against.
func Dev(major, minor uint32) uint32 { return major<<20 | minor&0xfffff }

// DevMajor and DevMinor split a kernel dev_t made by Dev.
func DevMajor(dev uint32) uint32 { return dev >> 20 }

// DevMinor returns the minor number of a kernel dev_t made by Dev.
func DevMinor(dev uint32) uint32 { return dev & 0xfffff }

// Options configure New. The zero value accounts no device until
// SetDevices or SetAllDevices is called and finds the cgroup v2 mount and
// the kubelet's pod log directory at their usual places.
type Options struct {
	// AllDevices accounts I/O on every block device, not only the set
	// given to SetDevices (the daemon's --probe-devices=all).
	AllDevices bool
	// CgroupRoot is the cgroup v2 mount point; empty finds it in
	// /proc/self/mountinfo (/sys/fs/cgroup on pure v2 hosts,
	// /sys/fs/cgroup/unified on hybrid ones).
	CgroupRoot string
	// PodLogDir is where the kubelet keeps <namespace>_<name>_<uid>
	// directories; empty means /var/log/pods.
	PodLogDir string
	// Tracepoints forces the start tracepoint ("io" for block_io_start,
	// "rq" for block_rq_issue; completion is block_rq_complete for
	// both); empty picks by probing the kernel's BTF.
	Tracepoints string
}

// Probe owns the loaded BPF objects and their links. Its methods are safe
// for concurrent use; it has no goroutines of its own: maps are read when
// Snapshot is called (by a scrape, the API or Top).
type Probe struct {
	mu       sync.Mutex // serialises map reads/deletes and the resolver caches
	coll     *ebpf.Collection
	links    []link.Link
	stats    *ebpf.Map
	devices  *ebpf.Map
	allDevs  *ebpf.Variable
	counters *ebpf.Map
	res      *resolver
	tp       string
	progs    [2]string           // completion, start: the attach order
	devtab   [devtabSlots]uint32 // mirror of the BPF devices table
	closed   bool

	collOnce sync.Once
	promColl prometheus.Collector
}

// New loads and attaches the block I/O probes. Errors caused by the
// environment wrap ErrUnavailable.
func New(opts Options) (*Probe, error) {
	kspec, err := btf.LoadKernelSpec()
	if err != nil {
		return nil, fmt.Errorf("probe: load kernel btf: %w: %w", ErrUnavailable, err)
	}
	tp := opts.Tracepoints
	if tp == "" {
		tp = pickTracepoints(kspec)
	}
	var startProg, doneProg, startTP, doneTP string
	switch tp {
	case "io":
		startProg, doneProg, startTP, doneTP = "io_start", "rq_complete", "block_io_start", "block_rq_complete"
	case "rq":
		startProg, doneProg, startTP, doneTP = "rq_issue", "rq_complete", "block_rq_issue", "block_rq_complete"
	default:
		return nil, fmt.Errorf("probe: unknown start tracepoint %q (want io or rq)", tp)
	}
	for _, name := range []string{startTP, doneTP} {
		var fn *btf.Typedef
		if err := kspec.TypeByName("btf_trace_"+name, &fn); err != nil {
			return nil, fmt.Errorf("probe: tracepoint %s: %w: %w", name, ErrUnavailable, err)
		}
	}

	res, err := newResolver(opts.CgroupRoot, opts.PodLogDir)
	if err != nil {
		return nil, fmt.Errorf("probe: %w: %w", ErrUnavailable, err)
	}

	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK. A failure
	// here is not fatal: newer kernels do not need it, and where they do
	// the load below fails with the clearer error (which names MEMLOCK).
	_ = rlimit.RemoveMemlock()

	spec, err := loadBlockio()
	if err != nil {
		res.close()
		return nil, fmt.Errorf("probe: %w", err)
	}
	// Only the chosen pair is loaded: the other pair's attach target may
	// not exist on this kernel and would fail verification.
	for name := range spec.Programs {
		if name != startProg && name != doneProg {
			delete(spec.Programs, name)
		}
	}
	if v := spec.Variables["blkcg_v2"]; v != nil {
		if err := v.Set(boolU32(res.ioOnV2())); err != nil {
			res.close()
			return nil, fmt.Errorf("probe: %w", err)
		}
	}
	if ms := spec.Maps["stats"]; ms != nil {
		ms.MaxEntries = statsEntries(ms.MaxEntries, ms.ValueSize, ebpf.MustPossibleCPU())
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Programs: ebpf.ProgramOptions{KernelTypes: kspec},
	})
	if err != nil {
		res.close()
		return nil, fmt.Errorf("probe: load bpf objects: %w: %w", ErrUnavailable, err)
	}
	p := &Probe{
		coll:     coll,
		stats:    coll.Maps["stats"],
		devices:  coll.Maps["devices"],
		allDevs:  coll.Variables["all_devices"],
		counters: coll.Maps["counters"],
		res:      res,
		tp:       tp,
		progs:    [2]string{doneProg, startProg},
	}
	if opts.AllDevices {
		if err := p.SetAllDevices(true); err != nil {
			p.Close()
			return nil, err
		}
	}
	if err := p.attach(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// attach links the programs, completion first so that no request is
// started without a program ready to finish it.
func (p *Probe) attach() error {
	for _, name := range p.progs {
		l, err := link.AttachTracing(link.TracingOptions{Program: p.coll.Programs[name], AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			return fmt.Errorf("probe: attach %s: %w: %w", name, ErrUnavailable, err)
		}
		p.links = append(p.links, l)
	}
	return nil
}

// detach unlinks the programs, start first.
func (p *Probe) detach() error {
	var errs []error
	for i := len(p.links) - 1; i >= 0; i-- {
		errs = append(errs, p.links[i].Close())
	}
	p.links = nil
	return errors.Join(errs...)
}

// pickTracepoints prefers block_io_start (6.5+), which fires in the
// submitter's context when the request is accounted, over block_rq_issue,
// which may fire from a kblockd worker.
func pickTracepoints(kspec *btf.Spec) string {
	var fn *btf.Typedef
	if kspec.TypeByName("btf_trace_block_io_start", &fn) == nil {
		return "io"
	}
	return "rq"
}

// Tracepoints reports the start tracepoint in use: "io" (block_io_start)
// or "rq" (block_rq_issue).
func (p *Probe) Tracepoints() string { return p.tp }

// Device table layout, shared with blockio.c (DEVTAB_SLOTS,
// DEVTAB_PROBES and the hash in dev_wanted).
const (
	devtabSlots  = 1024
	devtabProbes = 4
)

func devHash(dev uint32) uint32 { return (dev * 0x9E3779B1) >> 22 }

// SetDevices replaces the set of accounted devices (kernel dev_t, see Dev).
// It has no effect while SetAllDevices(true) is in force. A few hundred
// devices fit; more fail with an error and leave the set unchanged.
func (p *Probe) SetDevices(devs []uint32) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("probe: set devices: %w", os.ErrClosed)
	}
	want := make(map[uint32]bool, len(devs))
	for _, d := range devs {
		if d == 0 {
			return fmt.Errorf("probe: set devices: dev_t 0 is not a disk")
		}
		want[d] = true
	}
	// Keep devices where they are, so the BPF side never misses one
	// that stays in the set; place new ones in free slots of their
	// probe window.
	next := p.devtab
	for i, d := range next {
		if d != 0 && !want[d] {
			next[i] = 0
		}
	}
	placed := map[uint32]bool{}
	for _, d := range next {
		if d != 0 {
			placed[d] = true
		}
	}
	for d := range want {
		if placed[d] {
			continue
		}
		ok := false
		for i := range uint32(devtabProbes) {
			idx := (devHash(d) + i) & (devtabSlots - 1)
			if next[idx] == 0 && p.devtab[idx] == 0 {
				next[idx], ok = d, true
				break
			}
		}
		if !ok {
			// A slot freed by this very call is reused only if nothing
			// else fits, after the removal has been written.
			for i := range uint32(devtabProbes) {
				idx := (devHash(d) + i) & (devtabSlots - 1)
				if next[idx] == 0 {
					next[idx], ok = d, true
					break
				}
			}
		}
		if !ok {
			return fmt.Errorf("probe: set devices: no free slot for %d:%d", DevMajor(d), DevMinor(d))
		}
	}
	// Removals first, then additions: a slot handed from one device to
	// another is cleared before it is refilled.
	for pass := range 2 {
		for i := range next {
			if next[i] == p.devtab[i] {
				continue
			}
			if (pass == 0) != (next[i] == 0) {
				continue
			}
			if err := p.devices.Put(uint32(i), next[i]); err != nil {
				return fmt.Errorf("probe: set devices: %w", err)
			}
			p.devtab[i] = next[i]
		}
	}
	return nil
}

// SetAllDevices switches between accounting every block device (true) and
// only those given to SetDevices (false).
func (p *Probe) SetAllDevices(all bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("probe: set all devices: %w", os.ErrClosed)
	}
	var v uint32
	if all {
		v = 1
	}
	if err := p.allDevs.Set(v); err != nil {
		return fmt.Errorf("probe: set all devices: %w", err)
	}
	return nil
}

// Close detaches the programs and frees the maps. It is idempotent.
func (p *Probe) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	err := p.detach()
	p.coll.Close()
	p.res.close()
	return err
}

// Snapshot reads the cumulative counters. Counters of cgroups that no
// longer exist are deleted from the maps (and so vanish from the next
// snapshot); the rest are resolved to pods and containers.
func (p *Probe) Snapshot() (podio.Snapshot, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return podio.Snapshot{}, fmt.Errorf("probe: snapshot: %w", os.ErrClosed)
	}
	snap := podio.Snapshot{Time: time.Now()}
	type ekey struct {
		cg  uint64
		dev uint32
	}
	idx := map[ekey]int{}
	var dead []blockioIoKey
	var key blockioIoKey
	var vals []blockioIoStats
	it := p.stats.Iterate()
	for it.Next(&key, &vals) {
		cg, alive := p.res.cgroup(key.CgroupId)
		if !alive {
			dead = append(dead, key)
			continue
		}
		ek := ekey{key.CgroupId, key.Dev}
		i, ok := idx[ek]
		if !ok {
			i = len(snap.Entries)
			idx[ek] = i
			snap.Entries = append(snap.Entries, podio.Entry{
				CgroupID:  key.CgroupId,
				Cgroup:    cg.path,
				PodUID:    cg.podUID,
				Namespace: cg.namespace,
				Pod:       cg.pod,
				Container: cg.container,
				Dev:       key.Dev,
				Device:    p.res.device(key.Dev),
				Latency:   make([]uint64, Slots),
			})
		}
		e := &snap.Entries[i]
		for _, v := range vals {
			addOp(e, key.Op, v.Ops, v.Bytes)
			e.LatencySumNs += v.LatSumNs
			for s, n := range v.LatSlots {
				e.Latency[s] += n
			}
		}
	}
	if err := it.Err(); err != nil {
		return podio.Snapshot{}, fmt.Errorf("probe: read stats: %w", err)
	}
	for _, k := range dead {
		if err := p.stats.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return podio.Snapshot{}, fmt.Errorf("probe: drop stats: %w", err)
		}
	}
	var err error
	if snap.StatsFull, err = p.counter(cntStatsFull); err != nil {
		return podio.Snapshot{}, err
	}
	if snap.Unmatched, err = p.counter(cntNoStart); err != nil {
		return podio.Snapshot{}, err
	}
	if snap.NoSlot, err = p.counter(cntNoSlot); err != nil {
		return podio.Snapshot{}, err
	}
	snap.Sort()
	return snap, nil
}

func (p *Probe) counter(idx uint32) (uint64, error) {
	var vals []uint64
	if err := p.counters.Lookup(idx, &vals); err != nil {
		return 0, fmt.Errorf("probe: read counter: %w", err)
	}
	var n uint64
	for _, v := range vals {
		n += v
	}
	return n, nil
}

// Describe and Collect make the Probe a prometheus.Collector (see
// NewCollector for the metrics); each scrape takes a fresh Snapshot.
func (p *Probe) Describe(ch chan<- *prometheus.Desc) { p.collector().Describe(ch) }

// Collect implements prometheus.Collector.
func (p *Probe) Collect(ch chan<- prometheus.Metric) { p.collector().Collect(ch) }

func (p *Probe) collector() prometheus.Collector {
	p.collOnce.Do(func() { p.promColl = NewCollector(p.Snapshot) })
	return p.promColl
}

// DevOfPath returns the kernel dev_t (see Dev) of a block device node such
// as /dev/nbd0, for SetDevices.
func DevOfPath(path string) (uint32, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("probe: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("probe: %s is not a block device", path)
	}
	return Dev(unix.Major(st.Rdev), unix.Minor(st.Rdev)), nil
}

// Run takes a Snapshot every interval until ctx is done, so that the
// counters of removed cgroups are dropped from the BPF maps even when
// nothing scrapes the metrics. It returns nil when ctx ends, or the first
// Snapshot error (os.ErrClosed after Close). The caller owns the goroutine
// it runs on.
func (p *Probe) Run(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if _, err := p.Snapshot(); err != nil {
				return err
			}
		}
	}
}

// statsMemBudget bounds the preallocated memory of the per-CPU stats map
// (entries × value size × possible CPUs): 16384 (pod, device) entries cost
// 5.6 MB per CPU, over 700 MB on a 128-CPU node. A completion that finds
// the map full is counted (Counters.StatsFull), not lost silently.
const statsMemBudget = 64 << 20

// statsEntries returns how many entries the stats map gets: the compiled-in
// maximum, or fewer so that it fits statsMemBudget on ncpu CPUs, but never
// below 1024 (a busy node's pods times its devices).
func statsEntries(limit, valueSize uint32, ncpu int) uint32 {
	if valueSize == 0 || ncpu <= 0 {
		return limit
	}
	n := uint64(statsMemBudget) / (uint64(valueSize) * uint64(ncpu))
	return uint32(min(uint64(limit), max(n, 1024)))
}

func boolU32(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

// addOp adds ops requests of the BPF op class op, of bytes bytes, to e.
func addOp(e *podio.Entry, op uint32, ops, bytes uint64) {
	switch op {
	case OpRead:
		e.Reads += ops
		e.ReadBytes += bytes
	case OpWrite:
		e.Writes += ops
		e.WriteBytes += bytes
	case OpFlush:
		e.Flushes += ops
	case OpDiscard:
		e.Discards += ops
		e.DiscardBytes += bytes
	default:
		e.Others += ops
	}
}
