package probe

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// BenchmarkProbeOverhead measures what the probes cost 4k random reads at
// QD32 (fio, libaio, O_DIRECT) on a loop device over tmpfs. One fio run
// lasts the whole benchmark while the loaded programs are attached and
// detached every PROBE_BENCH_PHASE (default 1s) for PROBE_BENCH_ROUNDS
// off/on pairs (default 30); fio logs IOPS every 250ms and each sample
// lying wholly inside a phase counts for that phase's side. Interleaving
// finely in one run makes the load of a shared machine fall on both sides
// alike. Reported: the median IOPS of each side, their ratio (on/off), and
// from a last phase with kernel BPF statistics on, the programs' own run
// time per request. Run with `make bench-probe` (root).
func BenchmarkProbeOverhead(b *testing.B) {
	needRoot(b)
	if _, err := exec.LookPath("fio"); err != nil {
		b.Skip("fio not installed")
	}
	rounds := 30
	if v, err := strconv.Atoi(os.Getenv("PROBE_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	phase := time.Second
	if v, err := time.ParseDuration(os.Getenv("PROBE_BENCH_PHASE")); err == nil && v > 0 {
		phase = v
	}
	const sampleMs = 250
	loop := newLoop(b, 256<<20)
	logDir := b.TempDir()

	p, err := New(Options{})
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

	for i := 0; i < b.N; i++ {
		// Warm-up phase, the off/on pairs, the statistics phase.
		runtime := time.Duration(2*rounds+2) * phase
		cmd := exec.Command("fio", "--name=probe-overhead", "--filename="+loop.path,
			"--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1",
			"--time_based", "--runtime="+strconv.Itoa(int(runtime.Milliseconds()))+"ms",
			"--write_iops_log="+filepath.Join(logDir, "r"), "--log_avg_msec="+strconv.Itoa(sampleMs),
			"--output=/dev/null")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		type span struct {
			from, to int64 // ms since t0
			on       bool
		}
		var spans []span
		next := t0.Add(phase)
		time.Sleep(time.Until(next)) // fio start-up counts for neither side
		for ph := 0; ph < 2*rounds; ph++ {
			on := ph%2 == 1
			var err error
			if on {
				err = p.attach()
			} else {
				err = p.detach()
			}
			if err != nil {
				cmd.Process.Kill()
				cmd.Wait()
				b.Fatal(err)
			}
			start := time.Now()
			next = next.Add(phase)
			time.Sleep(time.Until(next))
			spans = append(spans, span{start.Sub(t0).Milliseconds(), time.Since(t0).Milliseconds(), on})
		}
		// Last phase: attached, with run-time statistics.
		stats, err := ebpf.EnableStats(0) // BPF_STATS_RUN_TIME
		if err != nil {
			b.Fatal(err)
		}
		if !p.attachedLocked() {
			b.Fatal("probes detached in the statistics phase")
		}
		before := progRuntime(b, p)
		time.Sleep(time.Until(next.Add(phase)))
		after := progRuntime(b, p)
		stats.Close()
		if err := cmd.Wait(); err != nil {
			b.Fatalf("fio: %v", err)
		}
		snap, err := p.Snapshot()
		if err != nil || len(snap.Entries) == 0 {
			b.Fatalf("probes accounted nothing (%v)", err)
		}

		offs, ons := phaseSamples(b, filepath.Join(logDir, "r_iops.1.log"), sampleMs, func(at int64) (on, ok bool) {
			// The sample covers (at-sampleMs, at] of fio's clock, which
			// starts a little after t0: allow 50ms of slack.
			for _, s := range spans {
				if at-sampleMs >= s.from+50 && at <= s.to {
					return s.on, true
				}
			}
			return false, false
		})
		if len(offs) < 3 || len(ons) < 3 {
			b.Fatalf("too few samples: %d off, %d on", len(offs), len(ons))
		}
		mOff, mOn := median(offs), median(ons)
		b.Logf("%d samples off, %d on; median IOPS off %.0f, on %.0f", len(offs), len(ons), mOff, mOn)
		b.ReportMetric(mOff, "iops-off")
		b.ReportMetric(mOn, "iops-on")
		b.ReportMetric(mOn/mOff, "on/off")
		if n := after.starts - before.starts; n > 0 {
			b.ReportMetric(float64(after.ns-before.ns)/float64(n), "bpf-ns/req")
		}
	}
}

type runtimeTotals struct{ ns, starts uint64 }

// progRuntime sums the kernel's run-time statistics of the attached
// programs; starts counts requests (one run of the start program each).
func progRuntime(b *testing.B, p *Probe) runtimeTotals {
	var t runtimeTotals
	for i, name := range p.progs {
		st, err := p.coll.Programs[name].Stats()
		if err != nil {
			b.Fatal(err)
		}
		t.ns += uint64(st.Runtime)
		if i == 1 {
			t.starts = st.RunCount
		}
	}
	return t
}

func (p *Probe) attachedLocked() bool { return len(p.links) == 2 }

// phaseSamples reads a fio IOPS log and sorts its samples by side.
func phaseSamples(b *testing.B, path string, sampleMs int64, side func(at int64) (on, ok bool)) (offs, ons []float64) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Split(sc.Text(), ",")
		if len(fl) < 2 {
			continue
		}
		at, err1 := strconv.ParseInt(strings.TrimSpace(fl[0]), 10, 64)
		v, err2 := strconv.ParseFloat(strings.TrimSpace(fl[1]), 64)
		if err1 != nil || err2 != nil {
			b.Fatalf("fio log line %q", sc.Text())
		}
		if on, ok := side(at); ok {
			if on {
				ons = append(ons, v)
			} else {
				offs = append(offs, v)
			}
		}
	}
	if err := sc.Err(); err != nil {
		b.Fatal(err)
	}
	if dbg := os.Getenv("PROBE_BENCH_DEBUG"); dbg != "" {
		raw, _ := os.ReadFile(path)
		os.WriteFile(dbg, []byte(fmt.Sprintf("off %v\non %v\nlog:\n%s", offs, ons, raw)), 0o644)
	}
	return offs, ons
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
