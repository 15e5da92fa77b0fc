// Command memorybench measures blockd's resident memory with many volumes
// streaming at once: it starts `blockd serve` with a --cache-memory
// budget, creates -volumes sequential file volumes, reads all of them
// sequentially at once over NBD for -load, then lets them idle, sampling
// the daemon's VmRSS every 250 ms. It prints RSS before, at the peak
// under load, and after 3 s and 15 s idle, against the budget, and
// writes the same as JSON under -out.
//
//	go run ./bench/memory -blockd bin/blockd [-volumes 200] [-budget 256MiB] [-load 10s] [-dir /var/tmp]
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/units"
)

var (
	blockdBin = flag.String("blockd", "bin/blockd", "blockd binary")
	nvol      = flag.Int("volumes", 200, "volumes streaming at once")
	volSize   = flag.String("size", "256MiB", "size of each volume (sparse)")
	budget    = flag.String("budget", "256MiB", "serve --cache-memory (auto, none or a size)")
	load      = flag.Duration("load", 10*time.Second, "how long every volume is read sequentially")
	idle      = flag.Duration("idle", 15*time.Second, "how long the daemon is watched idle afterwards")
	dir       = flag.String("dir", os.TempDir(), "where the state dir goes")
	outDir    = flag.String("out", "bench/results", "where the JSON result goes")
	keep      = flag.Bool("keep", false, "keep the state dir and the daemon's log")
)

type result struct {
	Time          time.Time `json:"time"`
	Volumes       int       `json:"volumes"`
	Budget        string    `json:"cache_memory"`
	BudgetBytes   int64     `json:"cache_memory_bytes"`
	RSSBefore     int64     `json:"rss_before_bytes"`
	RSSPeak       int64     `json:"rss_peak_bytes"`
	RSSIdle3s     int64     `json:"rss_idle_3s_bytes"`
	RSSIdleEnd    int64     `json:"rss_idle_end_bytes"`
	CacheHigh     int64     `json:"cache_high_water_bytes"`
	Denials       int64     `json:"cache_denials"`
	BytesRead     int64     `json:"bytes_read"`
	ReadMiBPerSec float64   `json:"read_mib_per_s"`
}

func main() {
	flag.Parse()
	size, err := units.ParseSize(*volSize)
	check(err)
	state, err := os.MkdirTemp(*dir, "memorybench-")
	check(err)
	if !*keep {
		defer os.RemoveAll(state)
	}
	nbdAddr, metricsAddr := freePort(), freePort()
	cmd := exec.Command(*blockdBin, "serve", "--state-dir", state, "--nbd-listen", nbdAddr,
		"--metrics-listen", metricsAddr, "--probes", "off", "--cache-memory", *budget)
	logf, err := os.Create(filepath.Join(state, "blockd.log"))
	check(err)
	cmd.Stderr = logf
	check(cmd.Start())
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	c := api.NewClient(filepath.Join(state, "blockd.sock"))
	for i := 0; c.Health() != nil; i++ {
		if i > 400 {
			fail("blockd did not start; see %s", logf.Name())
		}
		time.Sleep(25 * time.Millisecond)
	}
	for i := 0; i < *nvol; i++ {
		_, err := c.CreateVolume(api.Spec{Name: fmt.Sprintf("v%03d", i), Size: api.Size(size), Profile: "sequential"})
		check(err)
	}
	time.Sleep(time.Second)
	res := result{Time: time.Now().UTC(), Volumes: *nvol, Budget: *budget}
	res.RSSBefore = rss(cmd.Process.Pid)

	var samples sync.Map // phase -> max rss
	stopSampling := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	phase := "load"
	var phaseMu sync.Mutex
	go func() { // sampler: owned by main, ends on stopSampling
		defer wg.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-t.C:
				phaseMu.Lock()
				p := phase
				phaseMu.Unlock()
				r := rss(cmd.Process.Pid)
				if old, ok := samples.Load(p); !ok || r > old.(int64) {
					samples.Store(p, r)
				}
			}
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), *load)
	var readWG sync.WaitGroup
	var total sync.Map
	start := time.Now()
	for i := 0; i < *nvol; i++ {
		readWG.Add(1)
		go func(i int) { // one sequential reader per volume, ends with ctx
			defer readWG.Done()
			cl, err := nbd.Dial(context.Background(), "tcp", nbdAddr, fmt.Sprintf("v%03d", i))
			check(err)
			defer cl.Close()
			buf := make([]byte, 128<<10)
			var n int64
			for off := int64(0); ctx.Err() == nil; off = (off + int64(len(buf))) % size {
				if _, err := cl.ReadAt(buf, off); err != nil {
					fail("read v%03d: %v", i, err)
				}
				n += int64(len(buf))
			}
			total.Store(i, n)
		}(i)
	}
	readWG.Wait()
	cancel()
	elapsed := time.Since(start)
	total.Range(func(_, v any) bool { res.BytesRead += v.(int64); return true })
	res.ReadMiBPerSec = float64(res.BytesRead) / elapsed.Seconds() / (1 << 20)

	phaseMu.Lock()
	phase = "idle"
	phaseMu.Unlock()
	time.Sleep(3 * time.Second)
	res.RSSIdle3s = rss(cmd.Process.Pid)
	time.Sleep(*idle - 3*time.Second)
	res.RSSIdleEnd = rss(cmd.Process.Pid)
	close(stopSampling)
	wg.Wait()
	if v, ok := samples.Load("load"); ok {
		res.RSSPeak = v.(int64)
	}
	m := scrape(metricsAddr)
	res.BudgetBytes = int64(m[`blockd_cache_memory_bytes{kind="limit"}`])
	res.CacheHigh = int64(m[`blockd_cache_memory_bytes{kind="high_water"}`])
	res.Denials = int64(m[`blockd_cache_memory_denials_total`])

	fmt.Printf("# blockd memory with %d sequential volumes read at once for %s (%s)\n\n", res.Volumes, *load, res.Time.Format(time.RFC3339))
	fmt.Printf("| --cache-memory | RSS before | RSS peak under load | RSS idle 3s | RSS idle %s | cache high water | denials | read MiB/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n", *idle)
	fmt.Printf("| %s (%s) | %s | %s | %s | %s | %s | %d | %.0f |\n", res.Budget, units.HumanSize(res.BudgetBytes),
		units.HumanSize(res.RSSBefore), units.HumanSize(res.RSSPeak), units.HumanSize(res.RSSIdle3s), units.HumanSize(res.RSSIdleEnd),
		units.HumanSize(res.CacheHigh), res.Denials, res.ReadMiBPerSec)
	check(os.MkdirAll(*outDir, 0o755))
	b, _ := json.MarshalIndent(res, "", "  ")
	out := filepath.Join(*outDir, "memory-"+res.Time.Format("20060102T150405Z")+".json")
	check(os.WriteFile(out, append(b, '\n'), 0o644))
	fmt.Printf("\nwritten to %s\n", out)
}

// rss is the VmRSS of pid in bytes.
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	check(err)
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	fail("no VmRSS for pid %d", pid)
	return 0
}

// scrape returns the unlabelled and labelled samples of /metrics.
func scrape(addr string) map[string]float64 {
	resp, err := http.Get("http://" + addr + "/metrics")
	check(err)
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && !strings.HasPrefix(f[0], "#") {
			v, _ := strconv.ParseFloat(f[1], 64)
			out[f[0]] = v
		}
	}
	return out
}

func freePort() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	defer ln.Close()
	return ln.Addr().String()
}

func check(err error) {
	if err != nil {
		fail("%v", err)
	}
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "memorybench: "+format+"\n", a...)
	os.Exit(1)
}
