package podio

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
	"unicode/utf8"
)

// DefaultTopRows is how many rows Top shows.
const DefaultTopRows = 20

// maxWho caps the NAMESPACE/POD column; longer names keep their tail.
const maxWho = 48

// clearScreen homes the cursor and clears the terminal (ANSI), so each
// refresh redraws the table in place.
const clearScreen = "\x1b[H\x1b[2J"

// Top draws a refreshing table of the busiest pods and containers to w
// every interval until ctx is done, from snapshots that source returns
// (the daemon's API in `blockd top`). Rates are differences between
// consecutive snapshots. It returns nil when ctx ends and the first
// source or write error otherwise. Top runs on the caller's goroutine.
func Top(ctx context.Context, w io.Writer, source func() (Snapshot, error), interval time.Duration) error {
	if interval <= 0 {
		interval = time.Second
	}
	prev, err := source()
	if err != nil {
		return fmt.Errorf("top: %w", err)
	}
	if _, err := fmt.Fprintf(w, "%sblockd top: collecting for %v...\n", clearScreen, interval); err != nil {
		return fmt.Errorf("top: %w", err)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cur, err := source()
		if err != nil {
			return fmt.Errorf("top: %w", err)
		}
		var b strings.Builder
		b.WriteString(clearScreen)
		RenderTop(&b, prev, cur, DefaultTopRows)
		if _, err := io.WriteString(w, b.String()); err != nil {
			return fmt.Errorf("top: %w", err)
		}
		prev = cur
	}
}

// topRow is one (cgroup, device) over one interval.
type topRow struct {
	who, container, device string
	reads, writes          float64 // per second
	rbw, wbw               float64 // bytes per second
	p99                    time.Duration
}

func (r *topRow) iops() float64 { return r.reads + r.writes }

// RenderTop writes one frame of the top table: the rows busiest by IOPS
// (then bandwidth) between snapshots prev and cur, at most rows of them
// (rows <= 0 means all). A cgroup absent from prev counts from zero.
// Cgroups outside pods are listed by their cgroup path.
func RenderTop(w io.Writer, prev, cur Snapshot, rows int) error {
	dt := cur.Time.Sub(prev.Time).Seconds()
	if dt <= 0 {
		dt = 1
	}
	type key struct {
		cg  uint64
		dev uint32
	}
	old := make(map[key]*Entry, len(prev.Entries))
	for i := range prev.Entries {
		e := &prev.Entries[i]
		old[key{e.CgroupID, e.Dev}] = e
	}
	var out []topRow
	for i := range cur.Entries {
		e := &cur.Entries[i]
		o := old[key{e.CgroupID, e.Dev}]
		if o == nil {
			o = &Entry{}
		}
		reads, writes := delta(e.Reads, o.Reads), delta(e.Writes, o.Writes)
		if reads == 0 && writes == 0 && delta(e.Ops(), o.Ops()) == 0 {
			continue
		}
		hist := make([]uint64, len(e.Latency))
		for s := range e.Latency {
			if s < len(o.Latency) {
				hist[s] = delta(e.Latency[s], o.Latency[s])
			} else {
				hist[s] = e.Latency[s]
			}
		}
		r := topRow{
			who:       who(e),
			container: shortID(e.Container),
			device:    e.Device,
			reads:     float64(reads) / dt,
			writes:    float64(writes) / dt,
			rbw:       float64(delta(e.ReadBytes, o.ReadBytes)) / dt,
			wbw:       float64(delta(e.WriteBytes, o.WriteBytes)) / dt,
			p99:       Quantile(hist, 0.99),
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := &out[i], &out[j]
		if a.iops() != b.iops() {
			return a.iops() > b.iops()
		}
		if a.rbw+a.wbw != b.rbw+b.wbw {
			return a.rbw+a.wbw > b.rbw+b.wbw
		}
		if a.who != b.who {
			return a.who < b.who
		}
		if a.container != b.container {
			return a.container < b.container
		}
		return a.device < b.device
	})
	active := len(out)
	if rows > 0 && len(out) > rows {
		out = out[:rows]
	}
	var tot topRow
	for _, r := range out {
		tot.reads += r.reads
		tot.writes += r.writes
		tot.rbw += r.rbw
		tot.wbw += r.wbw
	}
	fmt.Fprintf(w, "blockd top  %s  interval %.1fs  %d active of %d cgroup/device pairs\n",
		cur.Time.UTC().Format("2006-01-02 15:04:05 UTC"), dt, active, len(cur.Entries))
	fmt.Fprintf(w, "total: %.0f IOPS (%.0f r/s, %.0f w/s), read %s, write %s\n\n",
		tot.iops(), tot.reads, tot.writes, bw(tot.rbw), bw(tot.wbw))
	wWho, wDev := len("NAMESPACE/POD"), len("DEVICE")
	for _, r := range out {
		wWho = max(wWho, min(len(r.who), maxWho))
		wDev = max(wDev, len(r.device))
	}
	fmt.Fprintf(w, "%-*s  %-12s  %-*s %8s %8s %8s %11s %11s %8s\n",
		wWho, "NAMESPACE/POD", "CONTAINER", wDev, "DEVICE", "IOPS", "R/s", "W/s", "READ", "WRITE", "P99")
	for _, r := range out {
		name := r.who
		if len(name) > maxWho {
			name = "..." + name[len(name)-maxWho+3:]
		}
		if _, err := fmt.Fprintf(w, "%-*s  %-12s  %-*s %8.0f %8.0f %8.0f %11s %11s %s\n",
			wWho, name, r.container, wDev, r.device, r.iops(), r.reads, r.writes, bw(r.rbw), bw(r.wbw), padLeft(lat(r.p99), 8)); err != nil {
			return fmt.Errorf("render top: %w", err)
		}
	}
	if cur.StatsFull > prev.StatsFull {
		fmt.Fprintf(w, "warning: %d completions lost (stats map full)\n", cur.StatsFull-prev.StatsFull)
	}
	return nil
}

// padLeft right-aligns s in n columns, counting runes (µ is two bytes).
func padLeft(s string, n int) string {
	if c := utf8.RuneCountInString(s); c < n {
		return strings.Repeat(" ", n-c) + s
	}
	return s
}

func delta(cur, prev uint64) uint64 {
	if cur < prev {
		return cur
	}
	return cur - prev
}

func who(e *Entry) string {
	switch {
	case e.Pod != "":
		return e.Namespace + "/" + e.Pod
	case e.PodUID != "":
		return "pod " + e.PodUID
	default:
		return "[host] " + e.Cgroup
	}
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	if id == "" {
		return "-"
	}
	return id
}

func bw(bps float64) string {
	switch {
	case bps >= 1<<30:
		return fmt.Sprintf("%.1fGiB/s", bps/(1<<30))
	case bps >= 1<<20:
		return fmt.Sprintf("%.1fMiB/s", bps/(1<<20))
	case bps >= 1<<10:
		return fmt.Sprintf("%.1fKiB/s", bps/(1<<10))
	default:
		return fmt.Sprintf("%.0fB/s", bps)
	}
}

func lat(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.2fs", d.Seconds())
	}
}
