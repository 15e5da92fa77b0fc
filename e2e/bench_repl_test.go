package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// BenchmarkRepl is `make bench-repl`: repl 1, 2 and 3 on memory volumes,
// daemons in network namespaces, fio's nbd engine on the owner (through
// its NBD unix socket), all in one run:
//
//   - 4k randwrite at QD32 (IOPS) and QD1 (clat p50, p99), 1M write at QD8
//     (MiB/s), and the CPU time per write of the owner and of a replica;
//   - repl 2 with a relay adding a 200µs round trip between the nodes:
//     4k randwrite QD1 p50;
//   - a resync of 256 MiB of changes against --resync-rate: its rate, and
//     the p99 of application writes during it against without.
//
// It prints a table and writes JSON under bench/results (BENCH_OUT).
// Knobs: BENCH_REPL_RUNTIME (seconds per fio run, default 5).
func BenchmarkRepl(b *testing.B) {
	need(b, "fio")
	runtime := 5
	if s := os.Getenv("BENCH_REPL_RUNTIME"); s != "" {
		runtime, _ = strconv.Atoi(s)
	}
	res := replBench{Time: time.Now().UTC(), Runtime: runtime}
	for _, repl := range []int{1, 2, 3} {
		res.Rows = append(res.Rows, benchReplRow(b, repl, runtime, 0))
	}
	res.Relay = benchReplRow(b, 2, runtime, 100*time.Microsecond)
	res.Resync = benchResync(b, runtime)
	res.print(os.Stdout)
	out := os.Getenv("BENCH_OUT")
	if out == "" {
		out = "../bench/results"
	}
	if err := os.MkdirAll(out, 0o755); err == nil {
		js, _ := json.MarshalIndent(res, "", "  ")
		path := filepath.Join(out, "repl-"+res.Time.Format("20060102T150405Z")+".json")
		if err := os.WriteFile(path, append(js, '\n'), 0o644); err == nil {
			fmt.Printf("\nwritten to %s\n", path)
		}
	}
}

type replBench struct {
	Time    time.Time `json:"time"`
	Runtime int       `json:"runtime_seconds"`
	Rows    []replRow `json:"rows"`
	Relay   replRow   `json:"relay_200us_rtt"`
	Resync  resyncRow `json:"resync"`
}

type replRow struct {
	Repl          int     `json:"repl"`
	RelayRTTus    int     `json:"relay_rtt_us,omitempty"`
	IOPSQD32      float64 `json:"randwrite_4k_qd32_iops"`
	P50QD1us      float64 `json:"randwrite_4k_qd1_p50_us"`
	P99QD1us      float64 `json:"randwrite_4k_qd1_p99_us"`
	MiBpsQD8      float64 `json:"write_1m_qd8_mibps"`
	OwnerCPUus    float64 `json:"owner_cpu_us_per_write"`
	ReplicaCPUus  float64 `json:"replica_cpu_us_per_write"`
	FioCPUus      float64 `json:"fio_cpu_us_per_write"`
	WritesCounted float64 `json:"qd32_writes"`
}

type resyncRow struct {
	CapMiBps      float64 `json:"cap_mibps"`
	MiBps         float64 `json:"mibps"`
	Bytes         int64   `json:"bytes"`
	P99Idle       float64 `json:"app_randwrite_qd1_p99_us_idle"`
	P99Resyncing  float64 `json:"app_randwrite_qd1_p99_us_during_resync"`
	P50Resyncing  float64 `json:"app_randwrite_qd1_p50_us_during_resync"`
	CopiedBytes   int64   `json:"copied_bytes"`
	ResyncSeconds float64 `json:"seconds"`
}

// fioResult is what a fio run gave: IOPS, bandwidth, clat percentiles.
type fioResult struct {
	IOPS, MiBps, P50us, P99us float64
	CPUus                     float64 // fio's own CPU per I/O
	IOs                       float64
}

func runFio(tb testing.TB, sock, vol string, runtime int, args ...string) fioResult {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(runtime+60)*time.Second)
	defer cancel()
	base := []string{"--name=j", "--ioengine=nbd", "--uri=nbd+unix:///" + vol + "?socket=" + sock,
		"--time_based", "--runtime=" + strconv.Itoa(runtime), "--ramp_time=1", "--output-format=json", "--size=48M"}
	cmd := exec.CommandContext(ctx, "fio", append(base, args...)...)
	cmd.Dir = tb.TempDir()
	out, err := cmd.Output()
	if err != nil {
		tb.Fatalf("fio %v: %v\n%s", args, err, out)
	}
	var js struct {
		Jobs []struct {
			Write struct {
				IOPS     float64 `json:"iops"`
				BW       float64 `json:"bw_bytes"`
				TotalIOs float64 `json:"total_ios"`
				Clat     struct {
					Pct map[string]float64 `json:"percentile"`
				} `json:"clat_ns"`
			} `json:"write"`
			UsrCPU float64 `json:"usr_cpu"`
			SysCPU float64 `json:"sys_cpu"`
		} `json:"jobs"`
	}
	if i := bytes.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	if err := json.Unmarshal(out, &js); err != nil || len(js.Jobs) == 0 {
		tb.Fatalf("fio output: %v\n%s", err, out)
	}
	j := js.Jobs[0]
	r := fioResult{IOPS: j.Write.IOPS, MiBps: j.Write.BW / (1 << 20), IOs: j.Write.TotalIOs,
		P50us: j.Write.Clat.Pct["50.000000"] / 1e3, P99us: j.Write.Clat.Pct["99.000000"] / 1e3}
	if r.IOs > 0 {
		r.CPUus = (j.UsrCPU + j.SysCPU) / 100 * float64(runtime) * 1e6 / r.IOs
	}
	return r
}

// cpuSeconds is a process's user+system CPU time.
func cpuSeconds(tb testing.TB, pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func benchReplRow(b *testing.B, repl, runtime int, relayDelay time.Duration) replRow {
	c := newTestCluster(b, repl, "--repl-timeout", "5s", "--repl-last-timeout", "10s")
	owner := c.nodes[0]
	if relayDelay > 0 {
		owner.peerAddr = map[string]string{}
		for _, o := range c.nodes[1:] {
			owner.peerAddr[o.name] = c.lab.Relay(0, ":0", o.ip()+":"+replPort, relayDelay)
		}
	}
	c.startAll()
	if _, err := owner.api().CreateVolume(api.Spec{Name: "v", Size: 64 << 20, Engine: "memory", Profile: "none", Repl: repl}); err != nil {
		b.Fatal(err)
	}
	row := replRow{Repl: repl}
	if relayDelay > 0 {
		row.RelayRTTus = int(2 * relayDelay / time.Microsecond)
	}
	pids := []int{owner.cmd.Process.Pid}
	if repl > 1 {
		pids = append(pids, c.nodes[1].cmd.Process.Pid)
	}
	before := make([]float64, len(pids))
	for i, p := range pids {
		before[i] = cpuSeconds(b, p)
	}
	r32 := runFio(b, owner.nbdSock(), "v", runtime, "--rw=randwrite", "--bs=4k", "--iodepth=32")
	row.IOPSQD32, row.WritesCounted, row.FioCPUus = r32.IOPS, r32.IOs, r32.CPUus
	// CPU over the whole run (ramp included) divided by the I/Os fio
	// counted after the ramp: a slight overestimate, the same for every
	// row.
	ios := r32.IOPS * float64(runtime+1)
	row.OwnerCPUus = (cpuSeconds(b, pids[0]) - before[0]) * 1e6 / ios
	if repl > 1 {
		row.ReplicaCPUus = (cpuSeconds(b, pids[1]) - before[1]) * 1e6 / ios
	}
	r1 := runFio(b, owner.nbdSock(), "v", runtime, "--rw=randwrite", "--bs=4k", "--iodepth=1")
	row.P50QD1us, row.P99QD1us = r1.P50us, r1.P99us
	if relayDelay == 0 {
		r8 := runFio(b, owner.nbdSock(), "v", runtime, "--rw=write", "--bs=1M", "--iodepth=8")
		row.MiBpsQD8 = r8.MiBps
	}
	for _, n := range c.nodes {
		n.stop()
	}
	return row
}

func benchResync(b *testing.B, runtime int) resyncRow {
	const capMiB = 64
	c := newTestCluster(b, 2, "--repl-timeout", "500ms", "--repl-last-timeout", "1s",
		"--resync-rate", fmt.Sprintf("%dMiB", capMiB), "--resync-min-rate", "0")
	c.startAll()
	a, rb := c.nodes[0], c.nodes[1]
	if _, err := a.api().CreateVolume(api.Spec{Name: "v", Size: 512 << 20, Engine: "memory", Profile: "none", Repl: 2}); err != nil {
		b.Fatal(err)
	}
	row := resyncRow{CapMiBps: capMiB}
	row.P99Idle = runFio(b, a.nbdSock(), "v", runtime, "--rw=randwrite", "--bs=4k", "--iodepth=1", "--offset=300M").P99us
	rb.stop()
	dev, err := a.dial(context.Background(), "v")
	if err != nil {
		b.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{0x6b}, 1<<20)
	for i := 0; i < 256; i++ {
		if _, err := dev.WriteAt(chunk, int64(i)<<20); err != nil {
			b.Fatal(err)
		}
	}
	dev.Close()
	rb.start()
	a.waitState("v", rb.name, api.ReplicaResyncing, 30*time.Second)
	start := time.Now()
	during := make(chan fioResult, 1)
	go func() {
		during <- runFio(b, a.nbdSock(), "v", 2, "--rw=randwrite", "--bs=4k", "--iodepth=1", "--offset=300M")
	}()
	v := a.waitInSync("v", 5*time.Minute)
	row.ResyncSeconds = time.Since(start).Seconds()
	r := <-during
	row.P99Resyncing, row.P50Resyncing = r.P99us, r.P50us
	row.CopiedBytes = v.Replicas[0].CopiedBytes
	row.Bytes = 256 << 20
	row.MiBps = float64(row.CopiedBytes) / (1 << 20) / row.ResyncSeconds
	return row
}

func (r replBench) print(w *os.File) {
	fmt.Fprintf(w, "# blockd replication bench (%s, %ds per fio run, memory volumes, nodes in network namespaces)\n\n", r.Time.Format(time.RFC3339), r.Runtime)
	fmt.Fprintln(w, "| repl | 4k randwrite QD32 IOPS | vs repl 1 | QD1 p50 µs | QD1 p99 µs | 1M write QD8 MiB/s | owner CPU µs/write | replica CPU µs/write | fio CPU µs/write |")
	fmt.Fprintln(w, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	base := r.Rows[0].IOPSQD32
	for _, x := range r.Rows {
		fmt.Fprintf(w, "| %d | %.0f | %.2f× | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f |\n", x.Repl, x.IOPSQD32, x.IOPSQD32/base,
			x.P50QD1us, x.P99QD1us, x.MiBpsQD8, x.OwnerCPUus, x.ReplicaCPUus, x.FioCPUus)
	}
	fmt.Fprintf(w, "\nrepl 2 through a relay adding a %dµs round trip: QD1 p50 %.0fµs (repl 1 %.0fµs + RTT + 100µs = %.0fµs), p99 %.0fµs\n",
		r.Relay.RelayRTTus, r.Relay.P50QD1us, r.Rows[0].P50QD1us, r.Rows[0].P50QD1us+float64(r.Relay.RelayRTTus)+100, r.Relay.P99QD1us)
	s := r.Resync
	fmt.Fprintf(w, "resync of %dMiB at --resync-rate %.0fMiB: %.1fMiB/s (%.0f%% of the cap) in %.1fs, copied %dMiB; application 4k write QD1 p99 %.0fµs idle, %.0fµs during the resync\n",
		s.Bytes>>20, s.CapMiBps, s.MiBps, 100*s.MiBps/s.CapMiBps, s.ResyncSeconds, s.CopiedBytes>>20, s.P99Idle, s.P99Resyncing)
}
