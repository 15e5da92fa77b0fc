package probe

import (
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
)

// BenchmarkProbeOverhead measures what the probes cost 4k random reads at
// QD32 (fio, libaio, O_DIRECT) on a loop device over tmpfs, two ways:
//
//   - Throughput: one fio run lasts the whole benchmark while the loaded
//     programs are detached and attached in PROBE_BENCH_ROUNDS (default
//     60) short off/on rounds of PROBE_BENCH_PHASE (default 250ms) each,
//     ending with an extra off phase. Completed reads are counted from
//     the device's own statistics (/sys/block/loopN/stat) at the phase
//     edges, after a settling pause that follows each attach or detach.
//     Each on phase is compared with the mean of the off phases either
//     side of it, which cancels load that drifts slowly on a shared
//     machine; the median of these per-round ratios is reported as
//     on/off, with a distribution-free 95% confidence interval (order
//     statistics around the median). On a busy shared machine a single
//     round swings by tens of percent, and the interval says whether the
//     median resolves a few percent; PROBE_BENCH_CONTROL=empty runs the
//     same rounds with empty programs, which shows the method's own
//     spread and bias on the machine at hand.
//   - CPU time: a last phase runs with kernel BPF statistics on
//     (BPF_STATS_RUN_TIME) and reports each program's run time per run,
//     together with that of an empty program on the same tracepoint
//     (the floor the statistics themselves add to every figure: two
//     clock reads). bpf-ns/req is the two programs' time per request;
//     implied-on/off is 1 - bpf-ns/req / ns-per-I/O (ns-per-I/O = 1e9 /
//     off IOPS), the throughput left if the I/O path were one CPU's work
//     (pessimistic when that work spreads over several CPUs). The
//     figures leave out the dispatch to the programs (the tracepoints
//     and trampolines, live only while something is attached): the
//     control run's ratio shows what that costs.
//
// Run with `make bench-probe` (root); it prints one PROBE-OVERHEAD line.
func BenchmarkProbeOverhead(b *testing.B) {
	needRoot(b)
	if _, err := exec.LookPath("fio"); err != nil {
		b.Skip("fio not installed")
	}
	rounds := envInt("PROBE_BENCH_ROUNDS", 60)
	phase := envDuration("PROBE_BENCH_PHASE", 250*time.Millisecond)
	// Attaching takes ~13ms (trampolines, text patching): the pause
	// keeps its tail out of the measured phase.
	settle := envDuration("PROBE_BENCH_SETTLE", 100*time.Millisecond)
	statsFor := envDuration("PROBE_BENCH_STATS", 3*time.Second)
	loop := newLoop(b, 256<<20)

	p, err := New(Options{Tracepoints: os.Getenv("PROBE_BENCH_TP")})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	if err := p.SetDevices([]uint32{loop.dev}); err != nil {
		b.Fatal(err)
	}
	if err := p.detach(); err != nil {
		b.Fatal(err)
	}
	empty := emptyProgram(b, "block_rq_complete")
	defer empty.Close()
	// The phases toggle the probes; PROBE_BENCH_CONTROL=empty toggles two
	// empty programs on the same tracepoints instead, a control run that
	// shows what attaching alone costs and what bias the method has.
	on, off := p.attach, p.detach
	if os.Getenv("PROBE_BENCH_CONTROL") == "empty" {
		startTP := "block_io_start"
		if p.tp == "rq" {
			startTP = "block_rq_issue"
		}
		e2 := emptyProgram(b, startTP)
		defer e2.Close()
		var links []link.Link
		on = func() error {
			for _, prog := range []*ebpf.Program{empty, e2} {
				l, err := link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
				if err != nil {
					return err
				}
				links = append(links, l)
			}
			return nil
		}
		off = func() error {
			var errs []error
			for _, l := range links {
				errs = append(errs, l.Close())
			}
			links = nil
			return errors.Join(errs...)
		}
		defer off()
	}
	statPath := filepath.Join("/sys/dev/block", fmt.Sprintf("%d:%d", DevMajor(loop.dev), DevMinor(loop.dev)), "stat")

	for i := 0; i < b.N; i++ {
		// fio runs until it is interrupted below; its runtime is only a
		// bound in case the benchmark dies without killing it.
		bound := time.Duration(2*rounds+1)*(phase+settle+time.Second) + statsFor + time.Minute
		cmd := exec.Command("fio", "--name=probe-overhead", "--filename="+loop.path,
			"--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1",
			"--time_based", "--runtime="+strconv.Itoa(int(bound.Seconds()))+"s",
			"--output=/dev/null")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		// fio's exit status after SIGINT is not 0 (128 for 3.33): only
		// an error other than an exit status is a failure here; a fio
		// that failed early shows as reads that did not move.
		stop := func() error {
			cmd.Process.Signal(os.Interrupt)
			err := cmd.Wait()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return nil
			}
			return err
		}
		fail := func(err error) {
			stop()
			b.Fatal(err)
		}
		time.Sleep(time.Second) // fio start-up counts for neither side

		// Phases alternate off, on, off, ..., off: 2*rounds+1 of them.
		rates := make([]float64, 2*rounds+1)
		for ph := range rates {
			toggle := off
			if ph%2 == 1 {
				toggle = on
			}
			if err := toggle(); err != nil {
				fail(err)
			}
			time.Sleep(settle)
			n0, t0, err := readsCompleted(statPath)
			if err != nil {
				fail(err)
			}
			time.Sleep(phase)
			n1, t1, err := readsCompleted(statPath)
			if err != nil {
				fail(err)
			}
			rates[ph] = float64(n1-n0) / t1.Sub(t0).Seconds()
		}
		if slices.Contains(rates, 0) {
			fail(fmt.Errorf("no reads completed in a phase (rates %v): fio not running?", rates))
		}
		var ratios, offs []float64
		for r := range rounds {
			off := (rates[2*r] + rates[2*r+2]) / 2
			ratios = append(ratios, rates[2*r+1]/off)
		}
		for ph := 0; ph < len(rates); ph += 2 {
			offs = append(offs, rates[ph])
		}

		// Statistics phase: attached, with run-time statistics, next to
		// the empty program.
		if err := off(); err != nil {
			fail(err)
		}
		if err := p.attach(); err != nil {
			fail(err)
		}
		el, err := link.AttachTracing(link.TracingOptions{Program: empty, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			fail(err)
		}
		stats, err := ebpf.EnableStats(uint32(0)) // BPF_STATS_RUN_TIME
		if err != nil {
			el.Close()
			fail(err)
		}
		time.Sleep(settle)
		before := progStats(b, p, empty)
		time.Sleep(statsFor)
		after := progStats(b, p, empty)
		stats.Close()
		el.Close()
		if err := stop(); err != nil {
			b.Fatalf("fio: %v", err)
		}
		snap, err := p.Snapshot()
		if err != nil || len(snap.Entries) == 0 {
			b.Fatalf("probes accounted nothing (%v)", err)
		}

		perRun := func(j int) float64 {
			n := after[j].RunCount - before[j].RunCount
			if n == 0 {
				b.Fatalf("program %d never ran in the statistics phase", j)
			}
			return float64(after[j].Runtime-before[j].Runtime) / float64(n)
		}
		doneNs, startNs, emptyNs := perRun(0), perRun(1), perRun(2)
		// Requests: runs of the start program. Completions run at least
		// once per request (more when a request completes in parts).
		reqs := float64(after[1].RunCount - before[1].RunCount)
		bpfNs := (float64(after[0].Runtime-before[0].Runtime) + float64(after[1].Runtime-before[1].Runtime)) / reqs
		ratio, iopsOff := median(ratios), median(offs)
		nsPerIO := 1e9 / iopsOff
		implied := 1 - bpfNs/nsPerIO
		b.ReportMetric(ratio, "on/off")
		b.ReportMetric(iopsOff, "iops-off")
		b.ReportMetric(startNs, p.progs[1]+"-ns/run")
		b.ReportMetric(doneNs, p.progs[0]+"-ns/run")
		b.ReportMetric(emptyNs, "empty-ns/run")
		b.ReportMetric(bpfNs, "bpf-ns/req")
		b.ReportMetric(implied, "implied-on/off")
		sorted := slices.Clone(ratios)
		slices.Sort(sorted)
		b.Logf("per-round on/off ratios (sorted): %s", fmtFloats(sorted))
		lo, hi := medianCI(sorted)
		fmt.Printf("PROBE-OVERHEAD on/off=%.4f (median of %d rounds, 95%% CI %.4f..%.4f; off %.0f IOPS) "+
			"bpf=%.0f ns/req (%s %.0f + %s %.0f ns/run; empty program %.0f ns/run) implied on/off>=%.4f (%.0f ns/IO)\n",
			ratio, rounds, lo, hi, iopsOff,
			bpfNs, p.progs[1], startNs, p.progs[0], doneNs, emptyNs, implied, nsPerIO)
	}
}

// readsCompleted returns the device's completed reads (the first field of
// its sysfs stat file) and when they were read.
func readsCompleted(path string) (uint64, time.Time, error) {
	raw, err := os.ReadFile(path)
	now := time.Now()
	if err != nil {
		return 0, now, err
	}
	f := strings.Fields(string(raw))
	if len(f) == 0 {
		return 0, now, fmt.Errorf("%s: empty", path)
	}
	n, err := strconv.ParseUint(f[0], 10, 64)
	return n, now, err
}

// emptyProgram loads a program that returns at once, for tracepoint tp:
// its run time is the floor that the statistics and the dispatch add to
// every program.
func emptyProgram(b *testing.B, tp string) *ebpf.Program {
	kspec, err := btf.LoadKernelSpec()
	if err != nil {
		b.Fatal(err)
	}
	prog, err := ebpf.NewProgramWithOptions(&ebpf.ProgramSpec{
		Name:         "empty",
		Type:         ebpf.Tracing,
		AttachType:   ebpf.AttachTraceRawTp,
		AttachTo:     tp,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	}, ebpf.ProgramOptions{KernelTypes: kspec})
	if err != nil {
		b.Fatal(err)
	}
	return prog
}

// progStats reads the run-time statistics of the completion program, the
// start program and the empty program, in that order.
func progStats(b *testing.B, p *Probe, empty *ebpf.Program) [3]*ebpf.ProgramStats {
	var out [3]*ebpf.ProgramStats
	for i, prog := range []*ebpf.Program{p.coll.Programs[p.progs[0]], p.coll.Programs[p.progs[1]], empty} {
		st, err := prog.Stats()
		if err != nil {
			b.Fatal(err)
		}
		out[i] = st
	}
	return out
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func fmtFloats(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatFloat(x, 'f', 3, 64)
	}
	return strings.Join(s, " ")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return quantile(s, 0.5)
}

// medianCI returns the order statistics of sorted s that bound its median
// with about 95% confidence whatever the distribution (binomial, normal
// approximation).
func medianCI(s []float64) (lo, hi float64) {
	n := float64(len(s))
	d := 0.98 * math.Sqrt(n)
	i := max(int(math.Floor(n/2-d)), 0)
	j := min(int(math.Ceil(n/2+d)), len(s)-1)
	return s[i], s[j]
}

// quantile interpolates linearly in sorted s.
func quantile(s []float64, q float64) float64 {
	if len(s) == 0 {
		return 0
	}
	pos := q * float64(len(s)-1)
	i := int(pos)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}
