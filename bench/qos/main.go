// Command qosbench measures blockd's QoS with fio's nbd engine: cap
// accuracy (total over the run and every 1 s window after the first, from
// fio's per-second logs), isolation of a reserved volume from a noisy one
// (with QoS and without), and the overhead of the QoS stage with no limits.
//
//	go run ./bench/qos -blockd bin/blockd [-duration 10s] [-only accuracy,live,isolation,overhead]
//
// It starts its own daemons (`blockd serve --state-dir TMP --nbd-listen
// 127.0.0.1:PORT --qos-capacity-iops N | --qos=false`) on memory volumes
// and drives them with `blockd volume create/set`; it prints a table and
// writes it, with fio's logs and JSON, under -out.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var (
	blockdBin   = flag.String("blockd", "bin/blockd", "blockd binary")
	fioBin      = flag.String("fio", "fio", "fio binary")
	duration    = flag.Duration("duration", 10*time.Second, "length of each fio run")
	only        = flag.String("only", "accuracy,live,isolation,overhead", "comma-separated parts to run")
	outDir      = flag.String("out", "", "directory for logs and results (default a new temp dir)")
	capFraction = flag.Float64("capacity-fraction", 0.8, "node capacity for the isolation runs, as a fraction of the measured QoS-off maximum")
	reservation = flag.Int64("reservation", 2000, "IOPS reservation of the isolated volume")
	overheadRep = flag.Int("overhead-runs", 10, "side-by-side runs for the overhead comparison")
	isoRounds   = flag.Int("isolation-rounds", 5, "alternating solo/loaded rounds per isolation setup (medians are compared)")
)

func main() {
	flag.Parse()
	if *outDir == "" {
		d, err := os.MkdirTemp("", "qosbench-")
		check(err)
		*outDir = d
	}
	check(os.MkdirAll(*outDir, 0o755))
	var report strings.Builder
	w := io.MultiWriter(os.Stdout, &report)
	fmt.Fprintf(w, "# blockd QoS bench (%s runs, fio %s, %s)\n\n", *duration, fioVersion(), time.Now().UTC().Format(time.RFC3339))
	parts := map[string]bool{}
	for _, p := range strings.Split(*only, ",") {
		parts[strings.TrimSpace(p)] = true
	}
	ok := true
	if parts["accuracy"] {
		ok = accuracy(w) && ok
	}
	if parts["live"] {
		ok = live(w) && ok
	}
	if parts["isolation"] {
		ok = isolation(w) && ok
	}
	if parts["overhead"] {
		ok = overhead(w) && ok
	}
	check(os.WriteFile(filepath.Join(*outDir, "results.md"), []byte(report.String()), 0o644))
	fmt.Printf("\nlogs and results in %s\n", *outDir)
	if !ok {
		os.Exit(1)
	}
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "qosbench:", err)
		os.Exit(2)
	}
}

func pass(b bool) string {
	if b {
		return "PASS"
	}
	return "FAIL"
}

func fioVersion() string {
	out, err := exec.Command(*fioBin, "--version").Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(out))
}

// server is one running `blockd serve`.
type server struct {
	cmd   *exec.Cmd
	state string
	port  int
	log   *os.File
}

var serverSeq int

func startServer(extra ...string) *server {
	serverSeq++
	s := &server{state: filepath.Join(*outDir, fmt.Sprintf("state%d", serverSeq))}
	check(os.RemoveAll(s.state)) // a reused -out dir: start from an empty state
	check(os.MkdirAll(s.state, 0o700))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	s.port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	s.log, err = os.Create(filepath.Join(*outDir, fmt.Sprintf("blockd%d.log", serverSeq)))
	check(err)
	args := append([]string{"serve", "--state-dir", s.state, "--nbd-listen", fmt.Sprintf("127.0.0.1:%d", s.port),
		"--nbd-socket", "none", "--metrics-listen", ""}, extra...)
	s.cmd = exec.Command(*blockdBin, args...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	check(s.cmd.Start())
	for i := 0; ; i++ {
		if _, err := s.blockd("volume", "list"); err == nil {
			return s
		}
		if i == 100 {
			s.stop()
			check(fmt.Errorf("blockd %v did not come up (see %s)", args, s.log.Name()))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *server) blockd(args ...string) (string, error) {
	args = append(args, "--api-socket", filepath.Join(s.state, "blockd.sock"))
	out, err := exec.Command(*blockdBin, args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("blockd %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (s *server) create(name string, qos ...string) {
	_, err := s.blockd(append([]string{"volume", "create", name, "--size", "1GiB", "--engine", "memory"}, qos...)...)
	check(err)
}

func (s *server) set(name string, qos ...string) {
	_, err := s.blockd(append([]string{"volume", "set", name}, qos...)...)
	check(err)
}

func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-done
	}
	s.log.Close()
}

// job is one fio job against a volume.
type job struct {
	name, vol, rw string
	bs            string
	qd            int
	srv           *server // nil: the server runFio was given
}

// result is what one job achieved.
type result struct {
	iops, bps float64   // over the whole run
	windows   []float64 // per second: IOPS, or bytes/s for bw logs
	p99       time.Duration
}

var fioSeq int

// runFio runs jobs concurrently (one fio process) for the run duration and
// returns their results, with per-second iops or bw logs.
func runFio(s *server, bwLog bool, jobs ...job) []result {
	fioSeq++
	dir := filepath.Join(*outDir, fmt.Sprintf("fio%02d", fioSeq))
	check(os.MkdirAll(dir, 0o755))
	args := []string{"--output-format=json", "--output=" + filepath.Join(dir, "out.json"),
		"--ioengine=nbd", "--time_based", fmt.Sprintf("--runtime=%d", int(duration.Seconds())),
		"--lat_percentiles=1", "--log_avg_msec=1000", "--randrepeat=0"}
	for _, j := range jobs {
		js := s
		if j.srv != nil {
			js = j.srv
		}
		args = append(args, "--name="+j.name, fmt.Sprintf("--uri=nbd://127.0.0.1:%d/%s", js.port, j.vol),
			"--rw="+j.rw, "--bs="+j.bs, fmt.Sprintf("--iodepth=%d", j.qd))
		if bwLog {
			args = append(args, "--write_bw_log="+filepath.Join(dir, j.name))
		} else {
			args = append(args, "--write_iops_log="+filepath.Join(dir, j.name))
		}
	}
	cmd := exec.Command(*fioBin, args...)
	out, err := cmd.CombinedOutput()
	os.WriteFile(filepath.Join(dir, "cmd.txt"), []byte(*fioBin+" "+strings.Join(args, " ")+"\n"+string(out)), 0o644)
	if err != nil {
		check(fmt.Errorf("fio: %v: %s", err, out))
	}
	data, err := os.ReadFile(filepath.Join(dir, "out.json"))
	check(err)
	// fio may print warnings before the JSON document.
	if i := strings.IndexByte(string(data), '{'); i > 0 {
		data = data[i:]
	}
	var fr struct {
		Jobs []struct {
			Name  string `json:"jobname"`
			Read  fioDir `json:"read"`
			Write fioDir `json:"write"`
		} `json:"jobs"`
	}
	check(json.Unmarshal(data, &fr))
	res := make([]result, len(jobs))
	for i, j := range jobs {
		for _, fj := range fr.Jobs {
			if fj.Name != j.name {
				continue
			}
			res[i].iops = fj.Read.IOPS + fj.Write.IOPS
			res[i].bps = float64(fj.Read.BWBytes + fj.Write.BWBytes)
			res[i].p99 = time.Duration(max(fj.Read.p99(), fj.Write.p99()))
		}
		kind := "iops"
		if bwLog {
			kind = "bw"
		}
		logs, _ := filepath.Glob(filepath.Join(dir, j.name+"_"+kind+".*.log"))
		res[i].windows = readWindows(logs, bwLog)
	}
	return res
}

type fioDir struct {
	IOPS    float64 `json:"iops"`
	BWBytes int64   `json:"bw_bytes"`
	Lat     struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"lat_ns"`
	Clat struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

func (d fioDir) p99() float64 {
	if v, ok := d.Lat.Percentile["99.000000"]; ok {
		return v
	}
	return d.Clat.Percentile["99.000000"]
}

// readWindows sums fio's averaged log lines (msec, value, ddir, bs, ...)
// over directions per 1 s window. bw logs are in KiB/s; returned in B/s.
func readWindows(files []string, bw bool) []float64 {
	sums := map[int]float64{}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			p := strings.Split(sc.Text(), ",")
			if len(p) < 2 {
				continue
			}
			ms, err1 := strconv.ParseFloat(strings.TrimSpace(p[0]), 64)
			v, err2 := strconv.ParseFloat(strings.TrimSpace(p[1]), 64)
			if err1 != nil || err2 != nil {
				continue
			}
			if bw {
				v *= 1024
			}
			sums[int(math.Round(ms/1000))] += v
		}
		fh.Close()
	}
	keys := make([]int, 0, len(sums))
	for k := range sums {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	out := make([]float64, 0, len(keys))
	for _, k := range keys {
		out = append(out, sums[k])
	}
	return out
}

// accuracy: caps of 1k, 5k, 20k IOPS (4k randrw QD32) and 50, 200 MiB/s
// (128k randrw QD32): within 2% over the run, 5% in every window after the
// first.
func accuracy(w io.Writer) bool {
	s := startServer()
	defer s.stop()
	s.create("acc")
	// The QoS-off reference: what this host can do without a cap.
	free := runFio(s, false, job{"free", "acc", "randrw", "4k", 32, nil})[0]
	fmt.Fprintf(w, "## Accuracy (uncapped on this host: %.0f IOPS at 4k QD32)\n\n", free.iops)
	fmt.Fprintln(w, "| cap | achieved | error | worst 1 s window after the first | total ±2% | windows ±5% |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	ok := true
	cases := []struct {
		label string
		flag  string
		value float64
		bs    string
		bw    bool
	}{
		{"1k IOPS", "--iops-limit=1000", 1000, "4k", false},
		{"5k IOPS", "--iops-limit=5000", 5000, "4k", false},
		{"20k IOPS", "--iops-limit=20000", 20000, "4k", false},
		{"50 MiB/s", "--bps-limit=50MiB", 50 << 20, "128k", true},
		{"200 MiB/s", "--bps-limit=200MiB", 200 << 20, "128k", true},
	}
	for _, c := range cases {
		s.set("acc", "--iops-limit=none", "--bps-limit=none", c.flag)
		r := runFio(s, c.bw, job{"acc", "acc", "randrw", c.bs, 32, nil})[0]
		got := r.iops
		if c.bw {
			got = r.bps
		}
		errTotal := got/c.value - 1
		worst := 0.0
		for i, v := range r.windows {
			if i == 0 || i >= int(duration.Seconds()) {
				continue // the first window holds the burst; a last partial one is noise
			}
			if e := v/c.value - 1; math.Abs(e) > math.Abs(worst) {
				worst = e
			}
		}
		totalOK := math.Abs(errTotal) <= 0.02
		winOK := math.Abs(worst) <= 0.05 && len(r.windows) >= 2
		note := ""
		if !c.bw && c.value > free.iops {
			note = " (cap above what the host reaches uncapped)"
		}
		ok = ok && totalOK && winOK
		fmt.Fprintf(w, "| %s | %s | %+.2f%% | %+.2f%% | %s | %s%s |\n", c.label, human(got, c.bw), 100*errTotal, 100*worst, pass(totalOK), pass(winOK), note)
	}
	fmt.Fprintln(w)
	return ok
}

func human(v float64, bw bool) string {
	if bw {
		return fmt.Sprintf("%.1f MiB/s", v/(1<<20))
	}
	return fmt.Sprintf("%.0f IOPS", v)
}

// isolation: V (reservation, QD1 4k randread) alone, then with A (QD32 4k
// randwrite) at node capacity; with QoS and with QoS off.
func isolation(w io.Writer) bool {
	// Node capacity: a fraction of what A reaches alone without QoS.
	s := startServer("--qos=false")
	s.create("a")
	max := runFio(s, false, job{"a", "a", "randwrite", "4k", 32, nil})[0].iops
	s.stop()
	capacity := int64(max * *capFraction)
	fmt.Fprintf(w, "## Isolation (QoS-off maximum %.0f IOPS; node capacity %d IOPS; V reservation %d IOPS; median of %d alternating rounds)\n\n",
		max, capacity, *reservation, *isoRounds)
	fmt.Fprintln(w, "| setup | V alone IOPS | V alone p99 | V with A IOPS | V with A p99 | A IOPS | V ≥ reservation | p99 ≤ 1.5× solo |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	ok := true
	var detail strings.Builder
	for _, qosOn := range []bool{true, false} {
		var s *server
		if qosOn {
			s = startServer(fmt.Sprintf("--qos-capacity-iops=%d", capacity))
			s.create("v", fmt.Sprintf("--iops-reservation=%d", *reservation))
		} else {
			s = startServer("--qos=false")
			s.create("v")
		}
		s.create("a")
		// A QD1 client's p99 over one 10 s run on a shared host swings by
		// 2-3x from run to run (wake-ups from idle, other tenants), so solo
		// and loaded runs alternate and the medians are compared: a slow
		// spell hits both sides alike.
		var soloIOPS, soloP99, bothIOPS, bothP99, aIOPS []float64
		minBoth := math.Inf(1)
		for i := 0; i < *isoRounds; i++ {
			solo := runFio(s, false, job{"v", "v", "randread", "4k", 1, nil})[0]
			both := runFio(s, false, job{"v", "v", "randread", "4k", 1, nil}, job{"a", "a", "randwrite", "4k", 32, nil})
			soloIOPS = append(soloIOPS, solo.iops)
			soloP99 = append(soloP99, float64(solo.p99))
			bothIOPS = append(bothIOPS, both[0].iops)
			bothP99 = append(bothP99, float64(both[0].p99))
			aIOPS = append(aIOPS, both[1].iops)
			minBoth = math.Min(minBoth, both[0].iops)
		}
		s.stop()
		rateOK := minBoth >= float64(*reservation)
		latOK := median(bothP99) <= 1.5*median(soloP99)
		label := "QoS on"
		if qosOn {
			ok = ok && rateOK && latOK
		} else {
			label = "QoS off (reference)"
		}
		fmt.Fprintf(w, "| %s | %.0f | %s | %.0f (min %.0f) | %s | %.0f | %s | %s (%.2f×) |\n", label, median(soloIOPS), dur(median(soloP99)),
			median(bothIOPS), minBoth, dur(median(bothP99)), median(aIOPS), pass(rateOK), pass(latOK), median(bothP99)/median(soloP99))
		fmt.Fprintf(&detail, "- %s, per round: V alone p99 %s; V with A p99 %s; V with A IOPS %v\n", label, durs(soloP99), durs(bothP99), rounded(bothIOPS))
	}
	fmt.Fprintln(w)
	fmt.Fprint(w, detail.String())
	fmt.Fprintln(w)
	return ok
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func dur(ns float64) time.Duration { return time.Duration(ns).Round(time.Microsecond) }

func durs(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = dur(x).String()
	}
	return "[" + strings.Join(parts, " ") + "]"
}

func overhead(w io.Writer) bool {
	// Fresh daemons for every pair: one process can be a few percent
	// faster than another with the same flags for the whole of its life
	// (where its threads and memory landed), which would otherwise pass
	// for the cost or the gain of QoS.
	var ratios, onIOPS, offIOPS []float64
	for i := 0; i < *overheadRep; i++ {
		off := startServer("--qos=false")
		on := startServer()
		off.create("o")
		on.create("o")
		jOff := job{"off", "o", "randread", "4k", 32, off}
		jOn := job{"on", "o", "randread", "4k", 32, on}
		var a, b result
		if i%2 == 0 {
			a = runFio(nil, false, jOff)[0]
			b = runFio(nil, false, jOn)[0]
		} else {
			b = runFio(nil, false, jOn)[0]
			a = runFio(nil, false, jOff)[0]
		}
		off.stop()
		on.stop()
		offIOPS = append(offIOPS, a.iops)
		onIOPS = append(onIOPS, b.iops)
		ratios = append(ratios, b.iops/a.iops)
	}
	med := median(ratios)
	fmt.Fprintf(w, "## Overhead (4k randread QD32, QoS off and on alternating, %d pairs)\n\n", *overheadRep)
	fmt.Fprintln(w, "| QoS off IOPS per run | QoS on, no limits IOPS per run | median ratio on/off | ≥ 0.97 |")
	fmt.Fprintln(w, "|---|---|---|---|")
	fmt.Fprintf(w, "| %v | %v | %.3f | %s |\n\n", rounded(offIOPS), rounded(onIOPS), med, pass(med >= 0.97))
	return med >= 0.97
}

func rounded(v []float64) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

// live: a cap raised and lowered with `blockd volume set` while fio runs
// must hold in the next whole 1 s window of fio's per-second log.
func live(w io.Writer) bool {
	s := startServer()
	defer s.stop()
	s.create("live", "--iops-limit=2000")
	saved := *duration
	*duration = 9 * time.Second
	defer func() { *duration = saved }()
	done := make(chan []result, 1)
	go func() { done <- runFio(s, false, job{"live", "live", "randrw", "4k", 32, nil}) }()
	time.Sleep(3 * time.Second)
	s.set("live", "--iops-limit=5000")
	time.Sleep(3 * time.Second)
	s.set("live", "--iops-limit=1000")
	r := (<-done)[0]
	fmt.Fprintf(w, "## Live change (cap 2000 -> 5000 at 3 s -> 1000 at 6 s; fio 1 s windows)\n\n")
	fmt.Fprintln(w, "| second | IOPS | expected | within ±5% |")
	fmt.Fprintln(w, "|---|---|---|---|")
	ok := len(r.windows) >= 9
	for i, v := range r.windows {
		want := 0.0
		// The sets are issued 3 s and 6 s after fio is launched; fio
		// starts logging within the first second of that, so each change
		// lands in window 2 and 5, and every window after it is whole.
		switch i {
		case 1:
			want = 2000
		case 3, 4:
			want = 5000 // the first whole windows after the raise
		case 6, 7, 8:
			want = 1000 // the first whole windows after the lowering
		}
		if want == 0 {
			fmt.Fprintf(w, "| %d | %.0f | (change or burst) | |\n", i, v)
			continue
		}
		good := math.Abs(v/want-1) <= 0.05
		ok = ok && good
		fmt.Fprintf(w, "| %d | %.0f | %.0f | %s |\n", i, v, want, pass(good))
	}
	fmt.Fprintln(w)
	return ok
}
