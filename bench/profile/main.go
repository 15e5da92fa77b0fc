// Command profile is the io_profile benchmark behind `make bench-profile`:
// it runs `blockd serve` on a state dir on a real disk (not tmpfs), drives
// fio's nbd engine against one volume under each profile, and prints, in
// one run, every comparison the io_profile issue asks for:
//
//	db vs none           8 jobs 4k randwrite, a FLUSH after every write
//	sequential vs none   128k sequential reads QD1; 4k sequential writes
//	                     QD1 with a FLUSH every 1 MiB
//	random vs sequential 4k random reads (and the bytes sequential
//	                     prefetched that were never read)
//	auto                 random -> sequential -> random phases: how long
//	                     the effective profile took to follow, and each
//	                     phase's throughput against the best fixed profile
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/profile"
)

var (
	bin     = flag.String("blockd", "bin/blockd", "blockd binary")
	dirFlag = flag.String("dir", "/var/tmp", "parent of the state dir: must be on a real disk")
	runtime = flag.Duration("runtime", 8*time.Second, "duration of each fio run")
	phase   = flag.Duration("phase", 8*time.Second, "duration of each auto phase")
	rounds  = flag.Int("rounds", 3, "times the auto sequence runs (each phase's ratio is the median of its rounds)")
	volSize = flag.Int64("size", 1<<30, "volume size")
)

type result struct {
	iops float64
	mibs float64
}

func main() {
	flag.Parse()
	if *rounds < 1 {
		fmt.Fprintln(os.Stderr, "bench-profile: -rounds must be at least 1")
		os.Exit(2)
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-profile:", err)
		os.Exit(1)
	}
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

type bench struct {
	addr string
	c    *api.Client
}

func run() error {
	dir, err := os.MkdirTemp(*dirFlag, "blockd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	sock := filepath.Join(dir, "blockd.sock")
	cmd := exec.Command(*bin, "serve", "--state-dir", dir, "--nbd-listen", addr, "--metrics-listen", "", "--api-socket", sock)
	logf, _ := os.Create(filepath.Join(dir, "blockd.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}()
	b := &bench{addr: addr, c: api.NewClient(sock)}
	for i := 0; ; i++ {
		if _, err := b.c.ListVolumes(); err == nil {
			break
		}
		if i > 400 {
			return fmt.Errorf("blockd did not start (log in %s)", dir)
		}
		time.Sleep(25 * time.Millisecond)
	}
	la, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("blockd io_profile benchmark: state dir %s, fio runs of %s, volume %d MiB, load average %s\n",
		dir, *runtime, *volSize>>20, strings.Join(strings.Fields(string(la))[:3], " "))

	const vol = "bench"
	if _, err := b.c.CreateVolume(api.Spec{Name: vol, Size: api.Size(*volSize), Profile: "none"}); err != nil {
		return err
	}
	// Fill the volume so reads hit allocated blocks, not holes.
	if _, err := b.fio(vol, "none", "--rw=write", "--bs=1M", "--iodepth=4"); err != nil {
		return fmt.Errorf("prefill: %w", err)
	}

	type cmp struct {
		title      string
		args       []string
		a, b       string // profiles: a is measured against b
		want       float64
		useMiBs    bool
		statsUnder string // print prefetch stats of this profile's run
		flushNote  bool   // print engine flushes per FLUSH
	}
	var notes []string
	rw8 := []string{"--rw=randwrite", "--bs=4k", "--numjobs=8", "--iodepth=1", "--fsync=1", "--size=256M"}
	seqRead := []string{"--rw=read", "--bs=128k", "--iodepth=1"}
	seqWrite := []string{"--rw=write", "--bs=4k", "--iodepth=1", "--fsync=256"}
	randRead := []string{"--rw=randread", "--bs=4k", "--iodepth=8"}
	cmps := []cmp{
		{"8 jobs 4k randwrite, fsync=1 (IOPS)", rw8, "db", "none", 2, false, "", true},
		{"128k seq read QD1 (MiB/s)", seqRead, "sequential", "none", 2, true, "sequential", false},
		{"4k seq write QD1, fsync=256 (MiB/s)", seqWrite, "sequential", "none", 2, true, "", false},
		{"4k randread QD8 (IOPS)", randRead, "random", "sequential", 1, false, "sequential", false},
	}
	fmt.Printf("%-38s %-11s %12s %-11s %12s %7s %6s %s\n", "workload", "profile", "result", "vs", "result", "ratio", "goal", "")
	allOK := true
	for _, c := range cmps {
		// b, a, b, a: the host's caches warm up over a run, so whichever
		// profile ran first would be penalized; each profile's result is
		// the mean of its two runs.
		res := map[string]result{}
		runs := map[string][]string{} // each run's value, to show the spread
		for round, p := range []string{c.b, c.a, c.b, c.a} {
			before, _ := b.stats(vol)
			r, err := b.fio(vol, p, c.args...)
			if err != nil {
				return fmt.Errorf("%s under %s: %w", c.title, p, err)
			}
			after, _ := b.stats(vol)
			prev := res[p]
			res[p] = result{iops: prev.iops + r.iops/2, mibs: prev.mibs + r.mibs/2}
			if c.useMiBs {
				runs[p] = append(runs[p], fmt.Sprintf("%.0f", r.mibs))
			} else {
				runs[p] = append(runs[p], fmt.Sprintf("%.0f", r.iops))
			}
			if p == c.statsUnder && round >= 2 {
				notes = append(notes, fmt.Sprintf("%s under %s: prefetched %d MiB, served from cache %d MiB, prefetched but never read %d MiB",
					c.title, p, (after.PrefetchedBytes-before.PrefetchedBytes)>>20,
					(after.PrefetchHitBytes-before.PrefetchHitBytes)>>20,
					(after.PrefetchUnreadBytes-before.PrefetchUnreadBytes)>>20))
			}
			if c.flushNote && round >= 2 {
				notes = append(notes, fmt.Sprintf("%s under %s: %d FLUSHes, %d engine flushes (fdatasync), %.2f per FLUSH",
					c.title, p, after.Flushes-before.Flushes, after.EngineFlushes-before.EngineFlushes,
					float64(after.EngineFlushes-before.EngineFlushes)/float64(max(1, after.Flushes-before.Flushes))))
			}
		}
		va, vb := res[c.a].iops, res[c.b].iops
		unit := "IOPS"
		if c.useMiBs {
			va, vb, unit = res[c.a].mibs, res[c.b].mibs, "MiB/s"
		}
		ratio := va / vb
		mark := "ok"
		if ratio < c.want {
			mark, allOK = "MISSED", false
		}
		fmt.Printf("%-38s %-11s %7.0f %-5s %-11s %7.0f %-5s %6.2fx %5.1fx %-6s (runs: %s %s, %s %s)\n", c.title, c.a, va, unit, c.b, vb, unit, ratio, c.want, mark,
			c.a, strings.Join(runs[c.a], "/"), c.b, strings.Join(runs[c.b], "/"))
	}
	// The NBD round trip bounds every QD1 result: the same 128k reads from
	// a memory-engine volume show the ceiling no profile can pass here.
	if _, err := b.c.CreateVolume(api.Spec{Name: "ceiling", Size: 256 << 20, Engine: "memory", Profile: "none"}); err == nil {
		if _, err := b.fio("ceiling", "none", "--rw=write", "--bs=1M", "--iodepth=4"); err == nil {
			if r, err := b.fio("ceiling", "none", seqRead...); err == nil {
				notes = append(notes, fmt.Sprintf("ceiling: 128k seq read QD1 from a memory-engine volume (NBD round trip, no disk): %.0f MiB/s", r.mibs))
			}
		}
	}
	for _, n := range notes {
		fmt.Println("  " + n)
	}
	fmt.Println()
	if !b.auto(vol, seqRead, randRead) {
		allOK = false
	}
	if !allOK {
		fmt.Println("\nsome goals were missed (see MISSED above)")
	}
	return nil
}

// auto runs random -> sequential -> random phases on an auto volume and
// reports how fast the effective profile followed and each phase's
// throughput against the fixed profile for it.
//
// The machine is shared and its speed swings within a minute, so each
// auto phase is paired with the same phase under the fixed profile run
// right next to it, on a second volume of the same size and content
// (auto's history is its own volume's I/O; an idle volume keeps its
// profile, so the fixed runs between its phases do not disturb it). The
// order within a pair alternates, the whole sequence runs -rounds times,
// and a phase's ratio is the median of its pairs' ratios.
func (b *bench) auto(vol string, seqRead, randRead []string) bool {
	const fixedVol = "fixed"
	if _, err := b.c.CreateVolume(api.Spec{Name: fixedVol, Size: api.Size(*volSize), Profile: "none"}); err != nil {
		fmt.Println("auto:", err)
		return false
	}
	if _, err := b.fio(fixedVol, "none", "--rw=write", "--bs=1M", "--iodepth=4"); err != nil {
		fmt.Println("auto: prefill:", err)
		return false
	}
	type sample struct {
		at  time.Time
		eff string
	}
	var mu sync.Mutex
	var samples []sample
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // polls the API every 50 ms until the phases end
		defer wg.Done()
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				if vi, err := b.c.GetVolume(vol); err == nil {
					mu.Lock()
					samples = append(samples, sample{now, vi.EffectiveProfile})
					mu.Unlock()
				}
			}
		}
	}()
	defer func() { cancel(); wg.Wait() }()
	phases := []struct {
		name, want string
		args       []string
		mibs       bool
	}{
		{"random (4k randread QD8)", "random", randRead, false},
		{"sequential (128k seq read QD1)", "sequential", seqRead, true},
		{"random (4k randread QD8)", "random", randRead, false},
	}
	val := func(r result, mibs bool) float64 {
		if mibs {
			return r.mibs
		}
		return r.iops
	}
	type pair struct{ auto, fixed float64 }
	pairs := make([][]pair, len(phases))
	follow := make([][]time.Duration, len(phases))
	rt := "--runtime=" + strconv.Itoa(int(phase.Seconds()))
	runAuto := func(i int) (float64, error) {
		ph := phases[i]
		start := time.Now()
		r, err := b.fioRun(vol, append(ph.args, rt)...)
		if err != nil {
			return 0, err
		}
		f := time.Duration(-1)
		mu.Lock()
		for _, s := range samples {
			if s.at.After(start) && s.eff == ph.want {
				f = s.at.Sub(start)
				break
			}
		}
		mu.Unlock()
		follow[i] = append(follow[i], f)
		return val(r, ph.mibs), nil
	}
	runFixed := func(i int) (float64, error) {
		r, err := b.fio(fixedVol, phases[i].want, append(phases[i].args, rt)...)
		return val(r, phases[i].mibs), err
	}
	// Warm both volumes and the host's caches first.
	for _, v := range []string{vol, fixedVol} {
		if _, err := b.fio(v, "random", append(randRead, rt)...); err != nil {
			fmt.Println("warm-up:", err)
			return false
		}
	}
	if _, err := b.c.UpdateVolume(vol, api.UpdateRequest{Profile: ptr("auto")}); err != nil {
		fmt.Println("auto:", err)
		return false
	}
	n := 0
	for round := 0; round < *rounds; round++ {
		for i := range phases {
			var p pair
			var err error
			if n%2 == 0 {
				if p.auto, err = runAuto(i); err == nil {
					p.fixed, err = runFixed(i)
				}
			} else {
				if p.fixed, err = runFixed(i); err == nil {
					p.auto, err = runAuto(i)
				}
			}
			n++
			if err != nil {
				fmt.Println("auto phase:", err)
				return false
			}
			pairs[i] = append(pairs[i], p)
		}
	}
	ok := true
	fmt.Printf("auto: phases of %s after a warm-up; the sequence ran %d times, each auto phase paired with the fixed profile's run next to it (order alternating); effective profile polled every 50 ms\n", *phase, *rounds)
	fmt.Printf("%-32s %-11s %-22s %-28s %7s %s\n", "phase", "followed to", "after", "auto/fixed per pair", "median", "")
	for i, ph := range phases {
		var fs, rs []string
		var ratios []float64
		mark := "ok"
		for _, f := range follow[i] {
			if f < 0 {
				fs = append(fs, "never")
				mark, ok = "MISSED", false
				continue
			}
			fs = append(fs, f.Round(10*time.Millisecond).String())
			if f > 2*time.Second {
				mark, ok = "MISSED", false
			}
		}
		for _, p := range pairs[i] {
			ratios = append(ratios, p.auto/p.fixed)
			rs = append(rs, fmt.Sprintf("%.0f/%.0f", p.auto, p.fixed))
		}
		slices.Sort(ratios)
		med := ratios[len(ratios)/2]
		if med < 0.9 {
			mark, ok = "MISSED", false
		}
		unit := "IOPS"
		if ph.mibs {
			unit = "MiB/s"
		}
		fmt.Printf("%-32s %-11s %-22s %-28s %6.2fx %s (goal: within 2s, within 10%%)\n",
			ph.name, ph.want, strings.Join(fs, ","), strings.Join(rs, " ")+" "+unit, med, mark)
	}
	return ok
}

func ptr[T any](v T) *T { return &v }

func (b *bench) stats(vol string) (profile.Stats, error) {
	vi, err := b.c.GetVolume(vol)
	if err != nil || vi.ProfileStats == nil {
		return profile.Stats{}, err
	}
	return *vi.ProfileStats, nil
}

// fio sets the volume's profile and runs one fio job for -runtime.
func (b *bench) fio(vol, profile string, args ...string) (result, error) {
	if _, err := b.c.UpdateVolume(vol, api.UpdateRequest{Profile: &profile}); err != nil {
		return result{}, err
	}
	if !strings.Contains(strings.Join(args, " "), "--bs=1M") {
		args = append(args, "--time_based", "--runtime="+strconv.Itoa(int(runtime.Seconds())))
	}
	return b.fioRun(vol, args...)
}

func (b *bench) fioRun(vol string, args ...string) (result, error) {
	all := append([]string{"--name=bench", "--ioengine=nbd", "--uri=nbd://" + b.addr + "/" + vol,
		"--group_reporting", "--output-format=json", "--randseed=1"}, args...)
	if !strings.Contains(strings.Join(args, " "), "--time_based") && !strings.Contains(strings.Join(args, " "), "--bs=1M") {
		all = append(all, "--time_based")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "fio", all...).Output()
	if err != nil {
		return result{}, fmt.Errorf("fio %v: %w\n%s", args, err, out)
	}
	var rep struct {
		Jobs []struct {
			Read, Write struct {
				IOPS float64 `json:"iops"`
				BW   float64 `json:"bw"` // KiB/s
			}
		} `json:"jobs"`
	}
	if i := strings.IndexByte(string(out), '{'); i > 0 {
		out = out[i:] // fio may print notes before the JSON
	}
	if err := json.Unmarshal(out, &rep); err != nil || len(rep.Jobs) == 0 {
		return result{}, fmt.Errorf("fio output: %v\n%s", err, out)
	}
	j := rep.Jobs[0]
	return result{iops: j.Read.IOPS + j.Write.IOPS, mibs: (j.Read.BW + j.Write.BW) / 1024}, nil
}
