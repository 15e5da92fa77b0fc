//go:build vmtest

package kerneltest

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/vm/guest"
)

// The ublk-vs-NBD benchmark in the guest: the same fio jobs against one
// memory volume attached as /dev/ublkbN and as /dev/nbdN in turn. It is a
// benchmark, not a timed test: it fails only on I/O errors, and logs the
// numbers. `make bench-kernel-ublk` runs it with more rounds; `make
// test-kernel-ublk` runs one round among the other ublk tests.

var (
	fioRounds  = flag.Int("fio-rounds", 1, "rounds of TestBlockdUblkVsNBDFio; each runs every job on both devices, in alternating order")
	fioRuntime = flag.Duration("fio-runtime", 4*time.Second, "measured time of each fio job in TestBlockdUblkVsNBDFio")
)

// fioJob is one fio job against a block device (libaio, O_DIRECT).
type fioJob struct {
	name    string
	rw      string // fio rw=
	bs      string
	jobs    int // numjobs: fio threads, spread over the device's queues
	iodepth int // per job
}

func (j fioJob) write() bool { return strings.HasSuffix(j.rw, "write") }

// fioResult is what one fio run measured.
type fioResult struct {
	IOPS float64
	IOs  int64
}

// runFio runs job on dev for dur after a ramp of ramp and parses its JSON.
// It returns false when fio is not in the guest (make test-kernel-ublk
// puts it there).
func runFio(t *testing.T, dev string, job fioJob, span int64, ramp, dur time.Duration) (fioResult, bool) {
	t.Helper()
	const fio = "/usr/bin/fio"
	if _, err := os.Stat(fio); err != nil {
		return fioResult{}, false
	}
	args := []string{"--name=" + job.name, "--filename=" + dev, "--rw=" + job.rw, "--bs=" + job.bs,
		"--iodepth=" + strconv.Itoa(job.iodepth), "--numjobs=" + strconv.Itoa(max(job.jobs, 1)),
		"--ioengine=libaio", "--direct=1", "--thread", "--group_reporting",
		"--randrepeat=1", "--norandommap", "--output-format=json"}
	if job.jobs > 1 && !strings.HasPrefix(job.rw, "rand") {
		// Sequential jobs each take their own slice.
		slice := span / int64(job.jobs)
		args = append(args, "--size="+strconv.FormatInt(slice, 10), "--offset_increment="+strconv.FormatInt(slice, 10))
	} else {
		args = append(args, "--size="+strconv.FormatInt(span, 10))
	}
	if dur > 0 { // else one pass over the span
		args = append(args, "--time_based", "--runtime="+strconv.FormatInt(dur.Milliseconds(), 10)+"ms")
	}
	if ramp > 0 {
		args = append(args, "--ramp_time="+strconv.FormatInt(ramp.Milliseconds(), 10)+"ms")
	}
	out := guest.Run(t, fio, args...)
	var res struct {
		Jobs []struct {
			Read struct {
				IOPS     float64 `json:"iops"`
				TotalIOs int64   `json:"total_ios"`
			} `json:"read"`
			Write struct {
				IOPS     float64 `json:"iops"`
				TotalIOs int64   `json:"total_ios"`
			} `json:"write"`
			Error int `json:"error"`
		} `json:"jobs"`
	}
	if i := strings.IndexByte(out, '{'); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) != 1 || res.Jobs[0].Error != 0 {
		t.Fatalf("fio %s on %s: %v\n%s", job.name, dev, err, out)
	}
	d := res.Jobs[0].Read
	if job.write() {
		d = res.Jobs[0].Write
	}
	return fioResult{IOPS: d.IOPS, IOs: d.TotalIOs}, true
}

// procCost is what blockd's threads cost so far: context switches
// (voluntary and not, summed over /proc/PID/task/*/status) and CPU time.
type procCost struct {
	vol, invol int64
	cpu        time.Duration
}

func readProcCost(t *testing.T, pid int) procCost {
	t.Helper()
	var c procCost
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread exited meanwhile
		}
		for _, l := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(l, ":")
			if !ok {
				continue
			}
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			switch k {
			case "voluntary_ctxt_switches":
				c.vol += n
			case "nonvoluntary_ctxt_switches":
				c.invol += n
			}
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)         // utime: field 14 of stat
	st, _ := strconv.ParseInt(f[12], 10, 64)         // stime: field 15
	c.cpu = time.Duration(ut+st) * time.Second / 100 // USER_HZ
	return c
}

// fioSample is one job on one device in one round.
type fioSample struct {
	iops           float64
	csPerIO, volCS float64 // context switches of blockd's threads per I/O (all; voluntary)
	cpuPerIO       float64 // blockd's CPU µs per I/O
}

// TestBlockdUblkVsNBDFio runs 4k random reads and writes at queue depth 1
// and 32 and 128k sequential reads and writes against one memory volume,
// attached as /dev/ublkbN (2 queues) and as /dev/nbdN (2 connections) in
// turn, -fio-rounds times; it logs
// per job the median IOPS of each, the median of the rounds' ublk/nbd
// ratios with their range, and blockd's context switches and CPU per I/O.
// Every job runs on the two devices back to back (the device attached for
// it and detached after), the order alternating, so that the pair shares
// the background load of a noisy host.
func TestBlockdUblkVsNBDFio(t *testing.T) {
	requireUblk(t)
	loadNBD(t)
	if _, err := os.Stat("/usr/bin/fio"); err != nil {
		t.Skip("fio not in the guest: `make test-kernel-ublk` or `make bench-kernel-ublk` adds it")
	}
	const (
		size  = 256 << 20
		conns = 2 // the guest's CPUs: attach's default on 6.12, and ublk's queues
		ramp  = time.Second
	)
	jobs := []fioJob{
		{"4k-randread-qd1", "randread", "4k", 1, 1},
		{"4k-randread-qd32", "randread", "4k", 2, 16},
		{"4k-randwrite-qd1", "randwrite", "4k", 1, 1},
		{"4k-randwrite-qd32", "randwrite", "4k", 2, 16},
		{"128k-read-qd8", "read", "128k", 2, 4},
		{"128k-write-qd8", "write", "128k", 2, 4},
	}
	d := startBlockd(t, t.TempDir())
	d.must("volume", "create", "ufio", "--size", strconv.Itoa(size), "--engine", "memory")

	type device struct {
		name   string
		attach func() string
		detach func(dev string)
	}
	devices := []device{
		{"ublk", func() string { return d.attachUblk("ufio", conns, 0) }, func(dev string) { d.detachUblk("ufio", "ufio", dev) }},
		{"nbd", func() string { return d.attach("ufio", conns) }, func(dev string) { d.detach("ufio", dev) }},
	}
	samples := map[[2]string][]fioSample{}
	prefilled := false
	for round := range max(*fioRounds, 1) {
		for ji, j := range jobs {
			// Each job runs on both devices back to back, the order
			// alternating, so that both see the same background load.
			for k := range devices {
				dv := devices[(k+round+ji)%len(devices)]
				dev := dv.attach()
				if !prefilled {
					// Write the volume once, so reads copy real data.
					runFio(t, dev, fioJob{"prefill", "write", "1m", 1, 8}, size, 0, 0)
					prefilled = true
				}
				before := readProcCost(t, d.p.Pid())
				r, _ := runFio(t, dev, j, size, ramp, *fioRuntime)
				after := readProcCost(t, d.p.Pid())
				dv.detach(dev)
				// The ramp's I/O costs switches too; fio reports only the
				// I/O after it, so scale by the run's share of the time.
				ios := float64(r.IOs) * float64(ramp+*fioRuntime) / float64(*fioRuntime)
				s := fioSample{iops: r.IOPS}
				if ios > 0 {
					s.csPerIO = float64(after.vol+after.invol-before.vol-before.invol) / ios
					s.volCS = float64(after.vol-before.vol) / ios
					s.cpuPerIO = float64((after.cpu - before.cpu).Microseconds()) / ios
				}
				samples[[2]string{j.name, dv.name}] = append(samples[[2]string{j.name, dv.name}], s)
				t.Logf("round %d %-18s %-4s %8.0f IOPS  %.2f cs/IO (%.2f voluntary)  %.1f µs CPU/IO", round+1, j.name, dv.name, s.iops, s.csPerIO, s.volCS, s.cpuPerIO)
			}
		}
	}
	d.stop()

	med := func(v []float64) float64 {
		v = slices.Clone(v)
		slices.Sort(v)
		return v[(len(v)-1)/2]
	}
	field := func(ss []fioSample, f func(fioSample) float64) []float64 {
		var out []float64
		for _, s := range ss {
			out = append(out, f(s))
		}
		return out
	}
	var b strings.Builder
	fmt.Fprintf(&b, "ublk vs NBD, memory volume, %d round(s) of %v per job (TCG: compare within the run):\n", max(*fioRounds, 1), *fioRuntime)
	fmt.Fprintf(&b, "| job | ublk IOPS | nbd IOPS | ublk/nbd (range) | ublk cs/IO | nbd cs/IO | ublk CPU µs/IO | nbd CPU µs/IO |\n")
	fmt.Fprintf(&b, "|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, j := range jobs {
		u, n := samples[[2]string{j.name, "ublk"}], samples[[2]string{j.name, "nbd"}]
		var ratios []float64
		for i := range min(len(u), len(n)) {
			if n[i].iops > 0 {
				ratios = append(ratios, u[i].iops/n[i].iops)
			}
		}
		if len(ratios) == 0 {
			continue
		}
		iops := func(s fioSample) float64 { return s.iops }
		cs := func(s fioSample) float64 { return s.csPerIO }
		cpu := func(s fioSample) float64 { return s.cpuPerIO }
		fmt.Fprintf(&b, "| %s | %.0f | %.0f | %.2f× (%.2f–%.2f) | %.2f | %.2f | %.1f | %.1f |\n", j.name,
			med(field(u, iops)), med(field(n, iops)), med(ratios), slices.Min(ratios), slices.Max(ratios),
			med(field(u, cs)), med(field(n, cs)), med(field(u, cpu)), med(field(n, cpu)))
	}
	t.Log("\n" + b.String())
}
