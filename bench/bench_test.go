package bench

import (
	"encoding/json"
	"encoding/xml"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-6*math.Max(math.Abs(a), math.Abs(b)) }

// The fixtures are real fio 3.33 outputs of the nbd engine, including the
// "fio: connected to NBD server" lines it writes before the JSON; the
// expected numbers were read from them with jq.
func TestParseFio(t *testing.T) {
	tests := []struct {
		file  string
		write bool
		want  Metrics
	}{
		{"fio-randread-qd1.json", false, Metrics{IOPS: 17916.541729, MiBps: 73386154.0 / (1 << 20),
			P50us: 31.616, P99us: 125.44, P999us: 211.968, MeanUs: 32.617129341, IOs: 35851,
			LatP50us: 46.336, LatP99us: 152.576, LatMeanUs: 54.819009791}},
		{"fio-randwrite-2jobs.json", true, Metrics{IOPS: 34501.980198, MiBps: 141380942.0 / (1 << 20),
			P50us: 370.688, P99us: 16318.464, P999us: 36438.016, MeanUs: 894.293889378, IOs: 69694,
			LatP50us: 382.976, LatP99us: 16711.68, LatMeanUs: 922.017253241}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseFio(data, tt.write)
			if err != nil {
				t.Fatal(err)
			}
			if got.IOs != tt.want.IOs || !near(got.IOPS, tt.want.IOPS) || !near(got.MiBps, tt.want.MiBps) ||
				!near(got.P50us, tt.want.P50us) || !near(got.P99us, tt.want.P99us) ||
				!near(got.P999us, tt.want.P999us) || !near(got.MeanUs, tt.want.MeanUs) ||
				!near(got.LatP50us, tt.want.LatP50us) || !near(got.LatP99us, tt.want.LatP99us) ||
				!near(got.LatMeanUs, tt.want.LatMeanUs) {
				t.Errorf("got %+v\nwant %+v", got, tt.want)
			}
			// The other direction did no I/O: that must be an error, not
			// a row of zeroes in the table.
			if _, err := ParseFio(data, !tt.write); err == nil {
				t.Error("parsing the idle direction succeeded")
			}
			if v := FioVersion(data); v != "fio-3.33" {
				t.Errorf("FioVersion = %q", v)
			}
		})
	}
}

func TestParseFioErrors(t *testing.T) {
	for name, in := range map[string]string{
		"not json":  "fio: connected to NBD server\n",
		"no jobs":   `{"fio version": "fio-3.33", "jobs": []}`,
		"job error": `{"jobs": [{"jobname": "x", "error": 5, "read": {"iops": 10, "total_ios": 10}}]}`,
	} {
		if _, err := ParseFio([]byte(in), false); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	_, err := ParseFio([]byte(`{"jobs": [{"jobname": "x", "error": 5}]}`), false)
	if err == nil || !strings.Contains(err.Error(), syscall.EIO.Error()) {
		t.Errorf("job error not named: %v", err)
	}
}

func TestMakeJob(t *testing.T) {
	row := func(qd int) Row { return Row{Name: "r", RW: "randread", BS: 4096, QD: qd} }
	tests := []struct {
		qd, conns, jobs, depth int
	}{
		{32, 2, 2, 16},
		{32, 1, 1, 32},
		{8, 3, 2, 4}, // 3 does not divide 8: lowered to 2
		{1, 2, 1, 1},
		{4, 0, 1, 4},
		{2, 8, 2, 1},
	}
	for _, tt := range tests {
		j := MakeJob(row(tt.qd), tt.conns, time.Second, 0, 1<<30)
		if j.Jobs != tt.jobs || j.IODepth != tt.depth || j.Jobs*j.IODepth != tt.qd {
			t.Errorf("MakeJob(qd %d, conns %d) = %d×%d, want %d×%d", tt.qd, tt.conns, j.Jobs, j.IODepth, tt.jobs, tt.depth)
		}
	}
}

func TestJobArgs(t *testing.T) {
	seq := MakeJob(Row{Name: "1m-read-qd8", RW: "read", BS: 1 << 20, QD: 8}, 2, 10*time.Second, 1500*time.Millisecond, 1<<30)
	args := seq.Args("nbd://127.0.0.1:1/bench", "/x.json")
	for _, want := range []string{"--ioengine=nbd", "--uri=nbd://127.0.0.1:1/bench", "--rw=read", "--bs=1048576",
		"--numjobs=2", "--iodepth=4", "--runtime=10s", "--ramp_time=1500ms", "--time_based", "--group_reporting",
		"--size=536870912", "--offset_increment=536870912", "--output-format=json", "--output=/x.json"} {
		if !slices.Contains(args, want) {
			t.Errorf("sequential args lack %s: %v", want, args)
		}
	}
	rnd := MakeJob(Row{Name: "4k", RW: "randwrite", BS: 4096, QD: 32}, 2, time.Second, 0, 1<<30)
	rnd.Extra = []string{"--rate_iops=500"}
	if a := rnd.Args("u", "o"); a[len(a)-1] != "--rate_iops=500" {
		t.Errorf("extra args not last: %v", a)
	}
	for _, a := range rnd.Args("u", "o") {
		// Random jobs cover the whole export on every connection.
		if strings.HasPrefix(a, "--size=") || strings.HasPrefix(a, "--offset_increment=") {
			t.Errorf("random job restricted: %s", a)
		}
	}
	if !rnd.Row.Write() || rnd.Row.Random() != true || seq.Row.Write() || seq.Row.Random() {
		t.Error("Row.Write/Random wrong")
	}
}

func TestSelectRows(t *testing.T) {
	all, err := SelectRows("")
	if err != nil || len(all) != len(DefaultRows) {
		t.Fatalf("SelectRows(\"\") = %d rows, %v", len(all), err)
	}
	two, err := SelectRows("4k-randread-qd1, 1m-write-qd8")
	if err != nil || len(two) != 2 || two[0].QD != 1 || two[1].RW != "write" {
		t.Fatalf("SelectRows = %+v, %v", two, err)
	}
	if _, err := SelectRows("4k-randread-qd64"); err == nil {
		t.Error("unknown row accepted")
	}
}

func testReport() *Report {
	rows := []Row{DefaultRows[0], DefaultRows[4]}
	return &Report{
		Started: time.Date(2026, 11, 21, 14, 0, 0, 0, time.UTC),
		Primary: "blockd",
		Rows:    rows,
		Servers: []string{"blockd", "nbdkit", "qemu-nbd", "go-nbd"},
		Skipped: map[string]string{"go-nbd": "bin/gonbd not built"},
		Results: []Result{
			{Row: rows[0].Name, Server: "blockd", Metrics: Metrics{IOPS: 100000, MiBps: 390.6, P50us: 300, P99us: 900, LatP50us: 350, LatP99us: 1000, ServerCPUPerIO: 8}},
			{Row: rows[0].Name, Server: "nbdkit", Metrics: Metrics{IOPS: 80000, MiBps: 312.5, P50us: 350, P99us: 1200, ServerCPUPerIO: 12}},
			{Row: rows[0].Name, Server: "qemu-nbd", Metrics: Metrics{IOPS: 50000, MiBps: 195.3, P50us: 600, P99us: 2000, ServerCPUPerIO: 10}},
			{Row: rows[1].Name, Server: "nbdkit", Metrics: Metrics{IOPS: 17234, MiBps: 67.3, P50us: 24.4, P99us: 130.6}},
			{Row: rows[1].Name, Server: "qemu-nbd", Err: "fio 4k-randread-qd1: exit status 1\nmore"},
		},
	}
}

func TestRatio(t *testing.T) {
	r := testReport()
	ratio, peer, ok := r.Ratio("4k-randread-qd32")
	if !ok || peer != "nbdkit" || !near(ratio, 1.25) {
		t.Errorf("Ratio = %v %q %v, want 1.25 nbdkit", ratio, peer, ok)
	}
	// No blockd result: no ratio. A failed peer is never the best peer.
	if _, _, ok := r.Ratio("4k-randread-qd1"); ok {
		t.Error("ratio without primary")
	}
	if peer, iops, ok := r.BestPeer("4k-randread-qd1"); !ok || peer != "nbdkit" || iops != 17234 {
		t.Errorf("BestPeer = %q %v %v", peer, iops, ok)
	}
}

func TestWriteMarkdown(t *testing.T) {
	var b strings.Builder
	if err := testReport().WriteMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	got := b.String()
	for _, want := range []string{
		"| row | blockd IOPS | nbdkit IOPS | qemu-nbd IOPS | go-nbd IOPS | blockd / best peer | blockd CPU/IO ÷ leanest peer |",
		"| 4k-randread-qd32 | 100000 | 80000 | 50000 | – | 1.25× (nbdkit) | 0.80× (qemu-nbd) |",
		"| 4k-randread-qd1 | – | 17200 | error | – | – | – |",
		"| 4k-randread-qd32 | blockd | 100000 | 390.6 | 300.0 | 900.0 | 350.0 | 1000.0 | 0.00 | 8.0 |",
		"| 4k-randread-qd1 | qemu-nbd | error: fio 4k-randread-qd1: exit status 1 | | | | | | | |",
		"| 4k-randread-qd1 | go-nbd | bin/gonbd not built | | | | | | | |",
		"| 4k-randread-qd1 | blockd | not run | | | | | | | |",
	} {
		if !strings.Contains(got, want+"\n") {
			t.Errorf("markdown lacks line\n%s\n--- got:\n%s", want, got)
		}
	}
}

func TestWriteMarkdownSpread(t *testing.T) {
	r := testReport()
	r.Results[0].Samples = []float64{90000, 100000, 131000}
	r.Results[0].ServerCPU, r.Results[0].ServerCPUPerIO = 0.85, 8.5
	var b strings.Builder
	if err := r.WriteMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| row | server | IOPS | MiB/s | clat p50 µs | clat p99 µs | lat p50 µs | lat p99 µs | server CPU | CPU µs/IO | IOPS min–max |",
		"| 4k-randread-qd32 | blockd | 100000 | 390.6 | 300.0 | 900.0 | 350.0 | 1000.0 | 0.85 | 8.5 | 90000–131000 |",
	} {
		if !strings.Contains(b.String(), want+"\n") {
			t.Errorf("markdown lacks line\n%s\n--- got:\n%s", want, b.String())
		}
	}
}

func TestFmtIOPS(t *testing.T) {
	for in, want := range map[float64]string{0: "0", 1234.5: "1230", 17234: "17200", 99.96: "100", 1: "1", 123456789: "123000000"} {
		if got := fmtIOPS(in); got != want {
			t.Errorf("fmtIOPS(%v) = %s, want %s", in, got, want)
		}
	}
}

func TestSave(t *testing.T) {
	r := testReport()
	raw, err := os.ReadFile("testdata/fio-randread-qd1.json")
	if err != nil {
		t.Fatal(err)
	}
	r.Results[0].Fio = trimToJSON(raw)
	path, err := r.Save(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(path) != "20261121T140000Z.json" {
		t.Errorf("path %s", path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Results) != 5 || back.Results[0].IOPS != 100000 || back.Results[4].Err == "" ||
		FioVersion(back.Results[0].Fio) != "fio-3.33" {
		t.Errorf("round trip lost data: %+v", back.Results[0])
	}
}

// Stop must end the whole process group, including children the server
// forked, and must return only once the leader is reaped.
func TestProcStopKillsGroup(t *testing.T) {
	dir := t.TempDir()
	// The child ignores SIGTERM, so Stop has to escalate to SIGKILL.
	p, err := StartProc("sh", filepath.Join(dir, "log"), "sh", "-c", `trap "" TERM; sleep 30 & echo $! > `+dir+`/child; wait`)
	if err != nil {
		t.Fatal(err)
	}
	var child []byte
	for i := 0; i < 200 && len(child) == 0; i++ {
		time.Sleep(10 * time.Millisecond)
		child, _ = os.ReadFile(filepath.Join(dir, "child"))
	}
	if len(child) == 0 {
		t.Fatal("child never started")
	}
	if err := p.Stop(100 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Exited():
	default:
		t.Fatal("Stop returned before the process exited")
	}
	// The orphaned child is reaped by whoever inherits it, so allow it to
	// linger as a zombie, but not to keep running.
	pid := strings.TrimSpace(string(child))
	for i := 0; ; i++ {
		stat, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil || strings.Contains(string(stat), ") Z ") {
			break
		}
		if i == 500 {
			t.Fatalf("child %s still running after Stop: %s", pid, stat)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = p.Stop(time.Second) // second Stop is harmless
}

func TestParseStatCPU(t *testing.T) {
	// A real line, with a command name that has a space and a ')'.
	line := "4242 (qemu ) nbd) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 37 0 0 20 0 9 0 100 0 0"
	got, err := parseStatCPU(line)
	if err != nil || got != 2870*time.Millisecond {
		t.Errorf("parseStatCPU = %v, %v; want 2.87s", got, err)
	}
	if _, err := parseStatCPU("4242 (x) S 1 2"); err == nil {
		t.Error("short line accepted")
	}
	// The real file parses (its value may still be 0 ticks).
	if self, err := procCPUTime(os.Getpid()); err != nil || self < 0 {
		t.Errorf("own cpu time = %v, %v", self, err)
	}
}

func TestSizeString(t *testing.T) {
	for in, want := range map[int64]string{1 << 30: "1GiB", 256 << 20: "256MiB", 4096: "4096", 3 << 30: "3GiB"} {
		if got := SizeString(in); got != want {
			t.Errorf("SizeString(%d) = %s, want %s", in, got, want)
		}
	}
}

func TestFileTargetArgs(t *testing.T) {
	job := MakeJob(DefaultRows[1], 2, time.Second, 0, 1<<30)
	args := job.Args(fileURI("/var/tmp/x/disk.img"), "/o.json")
	for _, want := range []string{"--ioengine=io_uring", "--direct=1", "--filename=/var/tmp/x/disk.img", "--rw=randwrite", "--iodepth=16"} {
		if !slices.Contains(args, want) {
			t.Errorf("file job args lack %s: %v", want, args)
		}
	}
	for _, a := range append(args, PrefillArgs(fileURI("/f"), "o")...) {
		if strings.HasPrefix(a, "--uri=") || a == "--ioengine=nbd" {
			t.Errorf("file job has NBD arg %s", a)
		}
	}
	if p := PrefillArgs(fileURI("/f"), "o"); !slices.Contains(p, "--filename=/f") || !slices.Contains(p, "--direct=1") {
		t.Errorf("file prefill args: %v", p)
	}
}

// rolesReport has a blockd file volume and a disk ceiling beside the
// peers: neither may be taken for a peer, and the pair columns compare
// them round by round.
func rolesReport() *Report {
	r := testReport()
	r.Servers = append(r.Servers, "blockd-file", "disk")
	r.Roles = map[string]string{"blockd-file": RoleBlockd, "disk": RoleCeiling}
	r.Pairs = []Pair{{A: "blockd-file", B: "blockd"}, {A: "blockd-file", B: "disk"}}
	r.Results[0].Samples = []float64{100000, 90000, 110000}
	r.Results = append(r.Results,
		Result{Row: "4k-randread-qd32", Server: "blockd-file", Metrics: Metrics{IOPS: 60000, ServerCPUPerIO: 4}, Samples: []float64{70000, 45000, 60000}},
		Result{Row: "4k-randread-qd32", Server: "disk", Metrics: Metrics{IOPS: 200000}, Samples: []float64{200000, 150000, 250000}},
	)
	return r
}

func TestRolesAndPairs(t *testing.T) {
	r := rolesReport()
	if ratio, peer, ok := r.Ratio("4k-randread-qd32"); !ok || peer != "nbdkit" || !near(ratio, 1.25) {
		t.Errorf("Ratio = %v %q %v: blockd-file or disk taken for a peer", ratio, peer, ok)
	}
	if ratio, peer, ok := r.CPURatio("4k-randread-qd32"); !ok || peer != "qemu-nbd" || !near(ratio, 0.8) {
		t.Errorf("CPURatio = %v %q %v", ratio, peer, ok)
	}
	// Per round: 0.7, 0.5, 0.545: median 0.545.
	med, lo, hi, ok := r.PairRatio("4k-randread-qd32", r.Pairs[0])
	if !ok || !near(med, 60000.0/110000) || !near(lo, 0.5) || !near(hi, 0.7) {
		t.Errorf("PairRatio file/memory = %v (%v–%v) %v", med, lo, hi, ok)
	}
	if _, _, _, ok := r.PairRatio("4k-randread-qd1", r.Pairs[0]); ok {
		t.Error("pair ratio without results")
	}
	var b strings.Builder
	if err := r.WriteMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| blockd / best peer | blockd CPU/IO ÷ leanest peer | blockd-file / blockd | blockd-file / disk |",
		"| 4k-randread-qd32 | 100000 | 80000 | 50000 | – | 60000 | 200000 | 1.25× (nbdkit) | 0.80× (qemu-nbd) | 0.55× (0.50–0.70) | 0.30× (0.24–0.35) |",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("markdown lacks\n%s\n--- got:\n%s", want, b.String())
		}
	}
}

func TestWriteSVG(t *testing.T) {
	r := rolesReport()
	var b strings.Builder
	if err := r.WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	svg := b.String()
	// Well-formed XML with an svg root.
	d := xml.NewDecoder(strings.NewReader(svg))
	var root string
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("chart is not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q", root)
	}
	for _, want := range []string{
		"4k-randread-qd32", "4k-randread-qd1", "blockd-file", "disk", "nbdkit",
		"100000 IOPS (90000–110000)", // the median and the rounds' range
		"bin/gonbd not built",        // a skipped server is named, not drawn
		"error: fio 4k-randread-qd1: exit status 1",
		`stroke-dasharray="4 2"`, // the ceiling is an outline
	} {
		if !strings.Contains(svg, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
	// Bars are on the row's scale: disk (200000, the row's largest with
	// its 250000 whisker) against blockd (100000).
	widths := map[string]float64{}
	re := regexp.MustCompile(`width="([0-9.]+)" height="16" fill="[^"]*"[^>]*><title>4k-randread-qd32 ([a-z-]+):`)
	for _, m := range re.FindAllStringSubmatch(svg, -1) {
		w, _ := strconv.ParseFloat(m[1], 64)
		widths[m[2]] = w
	}
	if len(widths) != 5 || !near(widths["disk"]/widths["blockd"], 2) || !near(widths["blockd-file"]/widths["blockd"], 0.6) {
		t.Errorf("bar widths %v", widths)
	}
	dir := t.TempDir()
	path, err := r.SaveSVG(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, filepath.Join(dir, "latest.svg")} {
		if got, err := os.ReadFile(p); err != nil || string(got) != svg {
			t.Errorf("%s: %v", p, err)
		}
	}
}
