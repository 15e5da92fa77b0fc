package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Row is one line of the job matrix: an access pattern at a queue depth.
// The same Row produces the same fio command line for every server.
type Row struct {
	Name string `json:"name"`
	// RW is fio's rw= value: read, write, randread, randwrite.
	RW string `json:"rw"`
	// BS is the block size in bytes.
	BS int64 `json:"bs"`
	// QD is the total number of requests in flight: Jobs × IODepth.
	QD int `json:"qd"`
}

// Random reports whether the row is a random-access pattern.
func (r Row) Random() bool { return strings.HasPrefix(r.RW, "rand") }

// Write reports whether the row writes.
func (r Row) Write() bool { return strings.HasSuffix(r.RW, "write") }

// DefaultRows is the standard matrix.
var DefaultRows = []Row{
	{Name: "4k-randread-qd32", RW: "randread", BS: 4 << 10, QD: 32},
	{Name: "4k-randwrite-qd32", RW: "randwrite", BS: 4 << 10, QD: 32},
	{Name: "1m-read-qd8", RW: "read", BS: 1 << 20, QD: 8},
	{Name: "1m-write-qd8", RW: "write", BS: 1 << 20, QD: 8},
	{Name: "4k-randread-qd1", RW: "randread", BS: 4 << 10, QD: 1},
}

// SelectRows returns the rows of DefaultRows named in the comma-separated
// list names ("" or "all" selects every row).
func SelectRows(names string) ([]Row, error) {
	if names == "" || names == "all" {
		return DefaultRows, nil
	}
	var out []Row
	for _, n := range strings.Split(names, ",") {
		n = strings.TrimSpace(n)
		found := false
		for _, r := range DefaultRows {
			if r.Name == n {
				out = append(out, r)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown row %q", n)
		}
	}
	return out, nil
}

// Job is a Row made concrete: how many connections, for how long, over
// how much of the export.
type Job struct {
	Row Row `json:"row"`
	// Jobs is fio's numjobs; with the nbd engine every job is one NBD
	// connection, so this is also the connection count.
	Jobs int `json:"numjobs"`
	// IODepth is per job (per connection).
	IODepth int `json:"iodepth"`
	// Runtime and Ramp are time-based; Ramp is excluded from the results.
	Runtime time.Duration `json:"runtime_ns"`
	Ramp    time.Duration `json:"ramp_ns"`
	// Size is the export size; sequential jobs each get a disjoint
	// Size/Jobs slice so that two connections do not read the same bytes.
	Size int64 `json:"size"`
	// Extra fio options appended as given (e.g. "--rate_iops=500" for a
	// QoS benchmark); none in the standard matrix.
	Extra []string `json:"extra,omitempty"`
}

// MakeJob spreads row.QD over up to conns connections. The queue depth is
// kept exact: conns is lowered until it divides QD.
func MakeJob(row Row, conns int, runtime, ramp time.Duration, size int64) Job {
	if conns < 1 {
		conns = 1
	}
	if conns > row.QD {
		conns = row.QD
	}
	for row.QD%conns != 0 {
		conns--
	}
	return Job{Row: row, Jobs: conns, IODepth: row.QD / conns, Runtime: runtime, Ramp: ramp, Size: size}
}

// percentiles fio reports; the keys in its JSON are "%f"-formatted.
const percentileList = "50:99:99.9"

// Args returns fio's command line (without the program name) for the job
// against uri, writing JSON to out.
func (j Job) Args(uri, out string) []string {
	args := append([]string{"--name=" + j.Row.Name}, targetArgs(uri)...)
	args = append(args,
		"--rw="+j.Row.RW,
		"--bs="+strconv.FormatInt(j.Row.BS, 10),
		"--iodepth="+strconv.Itoa(j.IODepth),
		"--numjobs="+strconv.Itoa(j.Jobs),
		// Threads, not processes: one fio process to kill, and no fork cost
		// charged to the first second of the run.
		"--thread",
		"--group_reporting",
		"--time_based",
		"--runtime="+fioDuration(j.Runtime),
		"--ramp_time="+fioDuration(j.Ramp),
		"--percentile_list="+percentileList,
		"--clat_percentiles=1",
		"--lat_percentiles=1",
		"--output-format=json",
		"--output="+out,
	)
	if j.Row.Random() {
		// One fixed seed per row so every server sees the same offsets.
		args = append(args, "--randrepeat=1", "--norandommap", "--random_generator=tausworthe64")
	} else if j.Jobs > 1 {
		slice := j.Size / int64(j.Jobs)
		slice -= slice % j.Row.BS
		args = append(args, "--size="+strconv.FormatInt(slice, 10), "--offset_increment="+strconv.FormatInt(slice, 10))
	}
	return append(args, j.Extra...)
}

// PrefillArgs returns the fio command line that writes the whole export
// once with 1 MiB sequential writes, so that reads return real data on every
// server (some servers answer reads of never-written ranges without copying
// anything, which would flatter them). fio's default buffers are random
// bytes, so no server can store them as holes.
func PrefillArgs(uri, out string) []string {
	return append(append([]string{"--name=prefill"}, targetArgs(uri)...),
		"--rw=write",
		"--bs=1M",
		"--iodepth=8",
		"--numjobs=1",
		"--thread",
		"--output-format=json",
		"--output="+out,
	)
}

// targetArgs selects fio's engine for uri: nbd for an NBD URI; io_uring
// with O_DIRECT for a file:// URI (the Disk ceiling).
func targetArgs(uri string) []string {
	if path, ok := strings.CutPrefix(uri, "file://"); ok {
		return []string{"--ioengine=io_uring", "--direct=1", "--filename=" + path}
	}
	return []string{"--ioengine=nbd", "--uri=" + uri}
}

func fioDuration(d time.Duration) string {
	ms := d.Milliseconds()
	if ms%1000 == 0 {
		return strconv.FormatInt(ms/1000, 10) + "s"
	}
	return strconv.FormatInt(ms, 10) + "ms"
}

// Metrics is what a fio run measured, for the direction the row exercises.
type Metrics struct {
	IOPS   float64 `json:"iops"`
	MiBps  float64 `json:"mib_s"`
	P50us  float64 `json:"clat_p50_us"`
	P99us  float64 `json:"clat_p99_us"`
	P999us float64 `json:"clat_p99_9_us"`
	MeanUs float64 `json:"clat_mean_us"`
	// Lat* are the total latency (submission + completion), what the
	// application waits. With fio's nbd engine, submission includes libnbd
	// sending the request on the socket, which clat leaves out.
	LatP50us  float64 `json:"lat_p50_us"`
	LatP99us  float64 `json:"lat_p99_us"`
	LatMeanUs float64 `json:"lat_mean_us"`
	// IOs is the number of completed requests after ramp.
	IOs int64 `json:"ios"`
	// ServerCPU is the server's CPU use during the run, in cores (1.0 =
	// one CPU busy all the time), and ServerCPUPerIO the CPU time it spent
	// per request. Throughput on a shared machine swings with the
	// neighbours' load; CPU per request much less so. Zero when unknown.
	ServerCPU      float64 `json:"server_cpu_cores,omitempty"`
	ServerCPUPerIO float64 `json:"server_cpu_us_per_io,omitempty"`
}

// fio's JSON, only the parts we read.
type fioOutput struct {
	FioVersion string   `json:"fio version"`
	Jobs       []fioJob `json:"jobs"`
}

type fioJob struct {
	Name  string `json:"jobname"`
	Error int    `json:"error"`
	Read  fioDir `json:"read"`
	Write fioDir `json:"write"`
}

type fioDir struct {
	IOBytes  int64   `json:"io_bytes"`
	BWBytes  float64 `json:"bw_bytes"`
	IOPS     float64 `json:"iops"`
	TotalIOs int64   `json:"total_ios"`
	Clat     fioLat  `json:"clat_ns"`
	Lat      fioLat  `json:"lat_ns"`
}

type fioLat struct {
	Mean       float64            `json:"mean"`
	Percentile map[string]float64 `json:"percentile"`
}

// ParseFio extracts the metrics of the write or read direction from fio's
// --output-format=json output. It expects --group_reporting (one entry in
// "jobs"); with several entries it sums throughput and keeps the worst
// percentiles, which is the conservative reading.
func ParseFio(data []byte, write bool) (Metrics, error) {
	var out fioOutput
	if err := json.Unmarshal(trimToJSON(data), &out); err != nil {
		return Metrics{}, fmt.Errorf("parse fio json: %w", err)
	}
	if len(out.Jobs) == 0 {
		return Metrics{}, errors.New("parse fio json: no jobs")
	}
	var m Metrics
	var meanWeighted, latMeanWeighted float64
	for _, j := range out.Jobs {
		if j.Error != 0 {
			return Metrics{}, fmt.Errorf("fio job %s: error %d (%s)", j.Name, j.Error, syscall.Errno(j.Error))
		}
		d := j.Read
		if write {
			d = j.Write
		}
		m.IOPS += d.IOPS
		m.MiBps += d.BWBytes / (1 << 20)
		m.IOs += d.TotalIOs
		meanWeighted += d.Clat.Mean * float64(d.TotalIOs)
		latMeanWeighted += d.Lat.Mean * float64(d.TotalIOs)
		m.LatP50us = max(m.LatP50us, d.Lat.Percentile["50.000000"]/1e3)
		m.LatP99us = max(m.LatP99us, d.Lat.Percentile["99.000000"]/1e3)
		m.P50us = max(m.P50us, d.Clat.Percentile["50.000000"]/1e3)
		m.P99us = max(m.P99us, d.Clat.Percentile["99.000000"]/1e3)
		m.P999us = max(m.P999us, d.Clat.Percentile["99.900000"]/1e3)
	}
	if m.IOs == 0 {
		return Metrics{}, errors.New("parse fio json: no I/O completed")
	}
	m.MeanUs = meanWeighted / float64(m.IOs) / 1e3
	m.LatMeanUs = latMeanWeighted / float64(m.IOs) / 1e3
	return m, nil
}

// FioVersion returns the fio version string recorded in its JSON output.
func FioVersion(data []byte) string {
	var out fioOutput
	_ = json.Unmarshal(trimToJSON(data), &out)
	return out.FioVersion
}

// trimToJSON drops what fio writes before its JSON: the nbd engine prints
// "fio: connected to NBD server" lines into the --output file.
func trimToJSON(data []byte) []byte {
	if i := bytes.IndexByte(data, '{'); i > 0 {
		return data[i:]
	}
	return data
}

// Fio runs fio binaries. The zero value runs "fio" from PATH.
type Fio struct {
	// Path is the fio binary; "" means "fio".
	Path string
	// Dir receives the JSON and stderr of each run; "" means a temporary
	// directory per run, removed afterwards.
	Dir string
}

// run runs fio with args (which must include --output-format=json and
// --output=out, as Job.Args and PrefillArgs do) and returns the JSON. A
// deadline on ctx, or its cancellation, kills fio.
func (f Fio) run(ctx context.Context, name string, args func(out string) []string) ([]byte, error) {
	dir := f.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "nbdbench-fio-")
		if err != nil {
			return nil, fmt.Errorf("fio %s: %w", name, err)
		}
		defer os.RemoveAll(d)
		dir = d
	}
	out := filepath.Join(dir, name+".json")
	path := f.Path
	if path == "" {
		path = "fio"
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args(out)...)
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", err, context.Cause(ctx))
		}
		return nil, fmt.Errorf("fio %s: %w: %s", name, err, strings.TrimSpace(lastLines(stderr.String(), 5)))
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("fio %s: %w", name, err)
	}
	return trimToJSON(data), nil
}

// Run runs job against uri and returns the metrics and fio's raw JSON.
func (f Fio) Run(ctx context.Context, uri string, job Job, tag string) (Metrics, []byte, error) {
	name := job.Row.Name
	if tag != "" {
		name = tag + "-" + name
	}
	// A hung server must not hang the run: fio gets its time plus a margin
	// for connecting and for shutting down its connections.
	ctx, cancel := context.WithTimeout(ctx, job.Runtime+job.Ramp+fioMargin)
	defer cancel()
	data, err := f.run(ctx, name, func(out string) []string { return job.Args(uri, out) })
	if err != nil {
		return Metrics{}, nil, err
	}
	m, err := ParseFio(data, job.Row.Write())
	if err != nil {
		return Metrics{}, data, fmt.Errorf("fio %s: %w", name, err)
	}
	return m, data, nil
}

// Bounds on one fio run; variables so that tests can shorten them.
var (
	fioMargin      = time.Minute
	prefillTimeout = 3 * time.Minute
)

// Prefill writes the whole export at uri once (see PrefillArgs).
func (f Fio) Prefill(ctx context.Context, uri, tag string) (Metrics, error) {
	name := "prefill"
	if tag != "" {
		name = tag + "-prefill"
	}
	// Bounded like Run; 1 GiB at even 10 MiB/s fits.
	ctx, cancel := context.WithTimeout(ctx, prefillTimeout)
	defer cancel()
	data, err := f.run(ctx, name, func(out string) []string { return PrefillArgs(uri, out) })
	if err != nil {
		return Metrics{}, err
	}
	return ParseFio(data, true)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
