package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Result is one cell of the matrix: one row against one server.
type Result struct {
	Row    string `json:"row"`
	Server string `json:"server"`
	Job    Job    `json:"job"`
	Metrics
	// Samples are the IOPS of every repetition; Metrics is the median one.
	Samples []float64 `json:"iops_samples,omitempty"`
	// Err is set when the run failed; the metrics are then zero.
	Err string `json:"error,omitempty"`
	// Fio is fio's own JSON output, kept for anything not summarized.
	Fio json.RawMessage `json:"fio,omitempty"`
}

// Report is a whole run, as written to bench/results/<timestamp>.json.
type Report struct {
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Host     Host      `json:"host"`
	// Primary is the server compared against the best of the peers.
	Primary string `json:"primary"`
	// Roles names the servers that are not peers (RoleBlockd,
	// RoleCeiling); the rest are.
	Roles map[string]string `json:"roles,omitempty"`
	// Pairs are the further ratio columns.
	Pairs     []Pair     `json:"pairs,omitempty"`
	Rows      []Row      `json:"rows"`
	Servers   []string   `json:"servers"`
	Instances []Instance `json:"instances"`
	// Skipped maps a server to why it did not run.
	Skipped map[string]string `json:"skipped,omitempty"`
	Results []Result          `json:"results"`
}

// Host describes the machine, because numbers mean little without it.
type Host struct {
	Hostname   string `json:"hostname"`
	CPUs       int    `json:"cpus"`
	Kernel     string `json:"kernel"`
	FioVersion string `json:"fio_version"`
	GoVersion  string `json:"go_version"`
}

// Lookup returns the result for row and server.
func (r *Report) Lookup(row, server string) (Result, bool) {
	for _, res := range r.Results {
		if res.Row == row && res.Server == server {
			return res, true
		}
	}
	return Result{}, false
}

// Pair is a ratio column: A's IOPS over B's.
type Pair struct {
	A string `json:"a"`
	B string `json:"b"`
}

// peer reports whether server is one of the peers blockd is compared with.
func (r *Report) peer(server string) bool {
	role := r.Roles[server]
	return server != r.Primary && (role == "" || role == RolePeer)
}

// BestPeer returns the peer with the highest IOPS on row, and its IOPS;
// ok is false when no peer has a result.
func (r *Report) BestPeer(row string) (server string, iops float64, ok bool) {
	for _, res := range r.Results {
		if res.Row != row || !r.peer(res.Server) || res.Err != "" {
			continue
		}
		if !ok || res.IOPS > iops {
			server, iops, ok = res.Server, res.IOPS, true
		}
	}
	return server, iops, ok
}

// Ratio returns Primary's IOPS on row divided by the best peer's, and
// that peer; ok is false if either side is missing.
func (r *Report) Ratio(row string) (ratio float64, peer string, ok bool) {
	p, found := r.Lookup(row, r.Primary)
	if !found || p.Err != "" {
		return 0, "", false
	}
	peer, best, ok := r.BestPeer(row)
	if !ok || best == 0 {
		return 0, "", false
	}
	return p.IOPS / best, peer, true
}

// CPURatio returns Primary's server CPU time per request on row divided by
// the lowest of the other servers' (below 1 means blockd is leaner), and
// that peer; ok is false if either side is missing.
func (r *Report) CPURatio(row string) (ratio float64, peer string, ok bool) {
	p, found := r.Lookup(row, r.Primary)
	if !found || p.Err != "" || p.ServerCPUPerIO <= 0 {
		return 0, "", false
	}
	var best float64
	for _, res := range r.Results {
		if res.Row != row || !r.peer(res.Server) || res.Err != "" || res.ServerCPUPerIO <= 0 {
			continue
		}
		if !ok || res.ServerCPUPerIO < best {
			peer, best, ok = res.Server, res.ServerCPUPerIO, true
		}
	}
	if !ok {
		return 0, "", false
	}
	return p.ServerCPUPerIO / best, peer, true
}

// PairRatio returns A's IOPS over B's on row: the median of the rounds'
// ratios (each round ran A and B back to back, so a round's ratio is
// fairer on a drifting machine than a ratio of medians) and their range.
// Without per-round samples for both it is the ratio of the two results.
func (r *Report) PairRatio(row string, p Pair) (med, lo, hi float64, ok bool) {
	a, fa := r.Lookup(row, p.A)
	b, fb := r.Lookup(row, p.B)
	if !fa || !fb || a.Err != "" || b.Err != "" || a.IOPS <= 0 || b.IOPS <= 0 {
		return 0, 0, 0, false
	}
	if len(a.Samples) < 2 || len(a.Samples) != len(b.Samples) {
		x := a.IOPS / b.IOPS
		return x, x, x, true
	}
	rs := make([]float64, len(a.Samples))
	for i := range rs {
		if b.Samples[i] <= 0 {
			return 0, 0, 0, false
		}
		rs[i] = a.Samples[i] / b.Samples[i]
	}
	slices.Sort(rs)
	return rs[(len(rs)-1)/2], rs[0], rs[len(rs)-1], true
}

// WriteMarkdown prints two tables: a summary (IOPS per server per row, the
// primary/best-peer IOPS ratio and CPU-per-request ratio) and the detail
// (IOPS, MiB/s, clat and total-latency p50/p99, server CPU for every
// cell; p99.9 and means are in the JSON).
func (r *Report) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	b.WriteString("| row |")
	for _, s := range r.Servers {
		fmt.Fprintf(&b, " %s IOPS |", s)
	}
	fmt.Fprintf(&b, " %s / best peer | %s CPU/IO ÷ leanest peer |", r.Primary, r.Primary)
	for _, p := range r.Pairs {
		fmt.Fprintf(&b, " %s / %s |", p.A, p.B)
	}
	b.WriteString("\n|---|")
	for range len(r.Servers) + 2 + len(r.Pairs) {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %s |", row.Name)
		for _, s := range r.Servers {
			fmt.Fprintf(&b, " %s |", r.cell(row.Name, s, func(m Result) string { return fmtIOPS(m.IOPS) }))
		}
		if ratio, peer, ok := r.Ratio(row.Name); ok {
			fmt.Fprintf(&b, " %.2f× (%s) |", ratio, peer)
		} else {
			b.WriteString(" – |")
		}
		if ratio, peer, ok := r.CPURatio(row.Name); ok {
			fmt.Fprintf(&b, " %.2f× (%s) |", ratio, peer)
		} else {
			b.WriteString(" – |")
		}
		for _, p := range r.Pairs {
			switch med, lo, hi, ok := r.PairRatio(row.Name, p); {
			case !ok:
				b.WriteString(" – |")
			case lo == hi:
				fmt.Fprintf(&b, " %.2f× |", med)
			default:
				fmt.Fprintf(&b, " %.2f× (%.2f–%.2f) |", med, lo, hi)
			}
		}
		b.WriteString("\n")
	}
	// With repetitions, show their spread: on a shared machine it is often
	// larger than the differences between servers.
	spread := false
	for _, res := range r.Results {
		spread = spread || len(res.Samples) > 1
	}
	b.WriteString("\n| row | server | IOPS | MiB/s | clat p50 µs | clat p99 µs | lat p50 µs | lat p99 µs | server CPU | CPU µs/IO |")
	if spread {
		b.WriteString(" IOPS min–max |")
	}
	b.WriteString("\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
	if spread {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	for _, row := range r.Rows {
		for _, s := range r.Servers {
			res, found := r.Lookup(row.Name, s)
			switch {
			case !found:
				fmt.Fprintf(&b, "| %s | %s | %s | | | | | | | |\n", row.Name, s, mdEscape(r.whyMissing(s)))
			case res.Err != "":
				fmt.Fprintf(&b, "| %s | %s | error: %s | | | | | | | |\n", row.Name, s, mdEscape(firstLine(res.Err)))
			default:
				fmt.Fprintf(&b, "| %s | %s | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.1f |", row.Name, s,
					fmtIOPS(res.IOPS), res.MiBps, res.P50us, res.P99us, res.LatP50us, res.LatP99us, res.ServerCPU, res.ServerCPUPerIO)
				if spread && len(res.Samples) > 0 {
					fmt.Fprintf(&b, " %s–%s |", fmtIOPS(slices.Min(res.Samples)), fmtIOPS(slices.Max(res.Samples)))
				}
				b.WriteString("\n")
			}
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func (r *Report) cell(row, server string, f func(Result) string) string {
	res, found := r.Lookup(row, server)
	switch {
	case !found:
		return "–"
	case res.Err != "":
		return "error"
	}
	return f(res)
}

// fmtIOPS rounds to three significant digits: the noise on a shared
// machine is larger than that.
func fmtIOPS(v float64) string {
	if v <= 0 {
		return "0"
	}
	mag := math.Pow(10, math.Floor(math.Log10(v))-2)
	return fmt.Sprintf("%.0f", math.Round(v/mag)*mag)
}

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// Save writes the report as indented JSON to dir/<started>.json and
// returns the path.
func (r *Report) Save(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("save report: %w", err)
	}
	path := filepath.Join(dir, r.Started.UTC().Format("20060102T150405Z")+".json")
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", fmt.Errorf("save report: %w", err)
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("save report: %w", err)
	}
	return path, nil
}

// whyMissing says why server has no result: skipped (and why), or not run.
func (r *Report) whyMissing(server string) string {
	if why := r.Skipped[server]; why != "" {
		return why
	}
	return "not run"
}
