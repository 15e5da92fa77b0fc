package probe

import (
	"encoding/json"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"testing"
)

// BenchmarkProbeOverhead runs fio (4k random reads, QD32, libaio, O_DIRECT)
// against a loop device over tmpfs with the probes detached and attached,
// alternating ABBA for PROBE_BENCH_ROUNDS rounds (default 3) in one run so
// that drift on a shared machine hits both sides alike. It reports the
// median IOPS of each side and their ratio (on/off). `make bench-probe`.
func BenchmarkProbeOverhead(b *testing.B) {
	needRoot(b)
	if _, err := exec.LookPath("fio"); err != nil {
		b.Skip("fio not installed")
	}
	rounds := 3
	if v, err := strconv.Atoi(os.Getenv("PROBE_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	runtime := os.Getenv("PROBE_BENCH_SECONDS")
	if runtime == "" {
		runtime = "5"
	}
	loop := newLoop(b, 256<<20)
	fio := func() float64 {
		out, err := exec.Command("fio", "--name=probe-overhead", "--filename="+loop.path,
			"--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1",
			"--time_based", "--runtime="+runtime, "--ramp_time=1", "--output-format=json").Output()
		if err != nil {
			b.Fatalf("fio: %v", err)
		}
		var res struct {
			Jobs []struct {
				Read struct {
					IOPS float64 `json:"iops"`
				} `json:"read"`
			} `json:"jobs"`
		}
		if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) != 1 {
			b.Fatalf("fio output: %v", err)
		}
		return res.Jobs[0].Read.IOPS
	}
	on := func() float64 {
		p, err := New(Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer p.Close()
		if err := p.SetDevices([]uint32{loop.dev}); err != nil {
			b.Fatal(err)
		}
		iops := fio()
		s, err := p.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		var ops uint64
		for _, e := range s.Entries {
			ops += e.Reads
		}
		if ops == 0 {
			b.Fatal("probes attached but accounted no reads")
		}
		return iops
	}
	var offs, ons []float64
	for i := 0; i < b.N; i++ {
		for r := range rounds {
			var a, c float64
			if r%2 == 0 {
				a = fio()
				c = on()
			} else {
				c = on()
				a = fio()
			}
			offs, ons = append(offs, a), append(ons, c)
			b.Logf("round %d: off %.0f IOPS, on %.0f IOPS (%.3f)", r, a, c, c/a)
		}
	}
	mOff, mOn := median(offs), median(ons)
	b.ReportMetric(mOff, "iops-off")
	b.ReportMetric(mOn, "iops-on")
	b.ReportMetric(mOn/mOff, "on/off")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
