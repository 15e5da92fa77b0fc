package qos

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/units"
)

// The scheduler scenarios live in testdata/*.txt in the style of
// etcd-io/raft's datadriven tests: each case is a command, a line "----",
// the expected output, and a blank line. `go test ./qos -run Scenarios
// -rewrite` regenerates the expected outputs (review the diff!).
var rewrite = flag.Bool("rewrite", false, "rewrite expected outputs in qos/testdata")

func TestScenarios(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scenario files: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) { runScenarioFile(t, file) })
	}
}

type scenarioCase struct {
	line     int
	cmd      string
	expected string
}

func parseScenarioFile(t *testing.T, file string) (cases []scenarioCase, lines []string) {
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(strings.NewReader(string(data)))
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	for i := 0; i < len(lines); i++ {
		l := strings.TrimSpace(lines[i])
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		c := scenarioCase{line: i + 1, cmd: l}
		i++
		if i >= len(lines) || lines[i] != "----" {
			t.Fatalf("%s:%d: want ---- after the command", file, c.line)
		}
		var out []string
		for i++; i < len(lines) && lines[i] != ""; i++ {
			out = append(out, lines[i])
		}
		c.expected = strings.Join(out, "\n")
		cases = append(cases, c)
	}
	return cases, lines
}

func runScenarioFile(t *testing.T, file string) {
	cases, lines := parseScenarioFile(t, file)
	h := newHarness()
	var rewritten []string
	if *rewrite {
		// Keep the file's header comments and re-emit every case.
		for _, l := range lines {
			if !strings.HasPrefix(l, "#") && strings.TrimSpace(l) != "" {
				break
			}
			rewritten = append(rewritten, l)
		}
	}
	for _, c := range cases {
		got := strings.TrimRight(h.run(c.cmd), "\n")
		if *rewrite {
			// Carry the comment lines just above the case along.
			var comments []string
			for j := c.line - 2; j >= 0 && strings.HasPrefix(lines[j], "#"); j-- {
				comments = append([]string{lines[j]}, comments...)
			}
			if len(rewritten) > 0 && len(comments) > 0 && rewritten[len(rewritten)-1] == comments[len(comments)-1] {
				comments = nil // header already copied
			}
			rewritten = append(rewritten, comments...)
			rewritten = append(rewritten, c.cmd, "----", got, "")
			continue
		}
		if got != c.expected {
			t.Errorf("%s:%d: %s\n--- got:\n%s\n--- want:\n%s", file, c.line, c.cmd, got, c.expected)
		}
	}
	if *rewrite {
		if err := os.WriteFile(file, []byte(strings.Join(rewritten, "\n")), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// harness drives a Scheduler from scenario commands.
type harness struct {
	s      *Scheduler
	now    time.Duration
	flows  map[string]*Flow
	names  map[*Flow]string
	nextID map[string]uint64
	reqs   []simReq // by id

}

func newHarness() *harness {
	return &harness{
		s:      NewScheduler(Capacity{}),
		flows:  map[string]*Flow{},
		names:  map[*Flow]string{},
		nextID: map[string]uint64{},
		reqs:   []simReq{{}}, // ids start at 1
	}
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "0s"
	case d%time.Millisecond == 0:
		return strconv.FormatInt(int64(d/time.Millisecond), 10) + "ms"
	case d%time.Microsecond == 0:
		return strconv.FormatInt(int64(d/time.Microsecond), 10) + "us"
	}
	return d.String()
}

func (h *harness) run(cmd string) string {
	args := strings.Fields(cmd)
	var b strings.Builder
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(&b, "panic: %v", r)
		}
	}()
	switch args[0] {
	case "node":
		var c Capacity
		for _, kv := range args[1:] {
			k, v, _ := strings.Cut(kv, "=")
			n, err := units.ParseRate(v)
			if err != nil {
				return "error: " + err.Error()
			}
			switch k {
			case "iops":
				c.IOPS = n
			case "bps":
				c.BPS = n
			default:
				return "error: unknown capacity " + k
			}
		}
		h.s.SetCapacity(c, h.now)
		return h.dispatch()
	case "volume", "set":
		name := args[1]
		var l Limits
		if args[0] == "set" {
			l = h.flows[name].Limits()
		}
		prio := -1 // priority=on|off (the journal io_profile), not a Limits flag
		for _, kv := range args[2:] {
			k, v, _ := strings.Cut(kv, "=")
			if k == "priority" {
				prio = map[string]int{"off": 0, "on": 1}[v]
				continue
			}
			if err := l.SetFlag(k, v); err != nil {
				return "error: " + err.Error()
			}
		}
		if err := l.Validate(); err != nil {
			return "error: " + err.Error()
		}
		if args[0] == "volume" {
			f := h.s.AddFlow(l, h.now)
			h.flows[name], h.names[f] = f, name
		} else {
			h.s.SetLimits(h.flows[name], l, h.now)
		}
		if prio >= 0 {
			h.s.SetPriority(h.flows[name], prio == 1)
		}
		return h.dispatch()
	case "submit":
		// submit VOL read|write SIZE [xN]
		f := h.flows[args[1]]
		size, err := units.ParseSize(args[3])
		if err != nil {
			return "error: " + err.Error()
		}
		n := 1
		if len(args) > 4 {
			n, _ = strconv.Atoi(strings.TrimPrefix(args[4], "x"))
		}
		for i := 0; i < n; i++ {
			h.enqueue(args[1], f, args[2] == "write", size)
		}
		return h.dispatch()
	case "cancel":
		for id, r := range h.reqs {
			if r.String() == args[1] {
				ok := h.s.Cancel(r.f, uint64(id), h.now)
				return fmt.Sprintf("cancelled=%v\n", ok) + h.dispatch()
			}
		}
		return "error: no such request"
	case "remove":
		f := h.flows[args[1]]
		ids := h.s.RemoveFlow(f, nil)
		fmt.Fprintf(&b, "failed:%s\n", h.fmtIDs(ids))
		delete(h.flows, args[1])
		b.WriteString(h.dispatch())
		return b.String()
	case "at":
		// at TIME: advance the clock and dispatch.
		h.now = h.parseTime(args[1])
		return h.dispatch()
	case "tick":
		// tick UNTIL: follow NextEvent until UNTIL, printing each dispatch.
		until := h.parseTime(args[1])
		for {
			next, ok := h.s.NextEvent()
			if !ok || next > until {
				break
			}
			h.now = next
			b.WriteString(h.dispatch())
			b.WriteString("\n")
		}
		h.now = until
		return b.String()
	case "stats":
		names := make([]string, 0, len(h.flows))
		for n := range h.flows {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			f := h.flows[n]
			fmt.Fprintf(&b, "%s: waiting=%d dispatched=%d throttled=%s\n", n, f.Waiting(), f.Dispatched(), fmtDur(f.Throttled().Round(time.Microsecond)))
		}
		return b.String()
	case "sim":
		return h.sim(args[1:])
	}
	return "error: unknown command " + args[0]
}

// parseTime reads an absolute time ("150ms") or one relative to now
// ("+150ms").
func (h *harness) parseTime(s string) time.Duration {
	d, err := time.ParseDuration(strings.TrimPrefix(s, "+"))
	if err != nil {
		panic(err)
	}
	if strings.HasPrefix(s, "+") {
		return h.now + d
	}
	return d
}

func (h *harness) enqueue(name string, f *Flow, write bool, size int64) uint64 {
	h.nextID[name]++
	id := uint64(len(h.reqs))
	h.reqs = append(h.reqs, simReq{name: name, n: h.nextID[name], f: f, issued: h.now})
	h.s.Enqueue(f, id, write, size, h.now)
	return id
}

// simReq is a request a scenario queued; named "vol#n" in the output.
type simReq struct {
	name   string
	n      uint64
	f      *Flow
	c      *simClient // nil outside sim
	issued time.Duration
}

func (r simReq) String() string { return fmt.Sprintf("%s#%d", r.name, r.n) }

func (h *harness) fmtIDs(ids []uint64) string {
	var b strings.Builder
	for _, id := range ids {
		b.WriteString(" ")
		b.WriteString(h.reqs[id].String())
	}
	return b.String()
}

// dispatch runs Dispatch at h.now and prints what started and the next event.
func (h *harness) dispatch() string {
	ids := h.s.Dispatch(h.now, nil)
	s := fmt.Sprintf("%s:%s", fmtDur(h.now), h.fmtIDs(ids))
	if len(ids) == 0 {
		s += " -"
	}
	if next, ok := h.s.NextEvent(); ok {
		s += " next=" + fmtDur(next)
	}
	return s
}

// simClient is one closed-loop load generator in a sim: it keeps qd
// requests outstanding on a volume; each completes lat after dispatch.
type simClient struct {
	name    string
	f       *Flow
	write   bool
	size    int64
	qd      int
	lat     time.Duration
	start   time.Duration // clients may join late
	stop    time.Duration
	windows []int
	waits   []time.Duration
}

// sim DUR window=W VOL=OP:SIZE:QD[:LAT[:FROM[:UNTIL]]] ... runs closed-loop
// clients on a simulated clock and prints each volume's request rate per
// window and the 50th/99th percentile wait in QoS.
func (h *harness) sim(args []string) string {
	dur, _ := time.ParseDuration(args[0])
	window := time.Second
	var clients []*simClient
	for _, a := range args[1:] {
		k, v, _ := strings.Cut(a, "=")
		if k == "window" {
			window, _ = time.ParseDuration(v)
			continue
		}
		p := strings.Split(v, ":")
		size, _ := units.ParseSize(p[1])
		qd, _ := strconv.Atoi(p[2])
		vol, _, _ := strings.Cut(k, "/") // "vol/tag" runs a second client on vol
		c := &simClient{name: k, f: h.flows[vol], write: p[0] == "write", size: size, qd: qd, stop: dur}
		if len(p) > 3 {
			c.lat, _ = time.ParseDuration(p[3])
		}
		if len(p) > 4 {
			c.start, _ = time.ParseDuration(p[4])
		}
		if len(p) > 5 {
			c.stop, _ = time.ParseDuration(p[5])
		}
		c.windows = make([]int, int((dur+window-1)/window))
		clients = append(clients, c)
	}
	t0 := h.now
	type completion struct {
		at time.Duration
		c  *simClient
	}
	var pending []completion // small; kept sorted by time
	waiting := map[uint64]bool{}
	submit := func(c *simClient) {
		if h.now-t0 < c.start || h.now-t0 >= c.stop {
			return
		}
		id := h.enqueue(c.name, c.f, c.write, c.size)
		h.reqs[id].c = c
		waiting[id] = true
	}
	started := map[*simClient]bool{}
	var out []uint64
	for steps := 0; steps < 10_000_000; steps++ {
		for _, c := range clients {
			if !started[c] && h.now-t0 >= c.start {
				started[c] = true
				for i := 0; i < c.qd; i++ {
					submit(c)
				}
			}
		}
		// Completions due now resubmit at once.
		for len(pending) > 0 && pending[0].at <= h.now {
			c := pending[0].c
			pending = pending[1:]
			submit(c)
		}
		out = h.s.Dispatch(h.now, out[:0])
		for _, id := range out {
			c := h.reqs[id].c
			delete(waiting, id)
			c.waits = append(c.waits, h.now-h.reqs[id].issued)
			if w := int((h.now - t0) / window); w < len(c.windows) {
				c.windows[w]++
			}
			at := h.now + c.lat
			i := sort.Search(len(pending), func(i int) bool { return pending[i].at > at })
			pending = append(pending, completion{})
			copy(pending[i+1:], pending[i:])
			pending[i] = completion{at, c}
		}
		if len(pending) > 0 && pending[0].at <= h.now {
			continue // zero-latency completions resubmit at this instant
		}
		next := t0 + dur
		if n, ok := h.s.NextEvent(); ok && n < next {
			next = n
		}
		if len(pending) > 0 && pending[0].at < next {
			next = pending[0].at
		}
		for _, c := range clients {
			if !started[c] && t0+c.start > h.now && t0+c.start < next {
				next = t0 + c.start
			}
		}
		if next >= t0+dur {
			break
		}
		h.now = max(h.now, next)
	}
	h.now = t0 + dur
	// Fail what is still queued so the next scenario starts clean.
	for id := range waiting {
		h.s.Cancel(h.reqs[id].f, id, h.now)
	}
	h.s.Dispatch(h.now, nil)
	var b strings.Builder
	for _, c := range clients {
		total := 0
		for _, n := range c.windows {
			total += n
		}
		fmt.Fprintf(&b, "%s: %d/s %.1fMiB/s windows=%v", c.name, int(float64(total)/dur.Seconds()+0.5),
			float64(total)*float64(c.size)/dur.Seconds()/(1<<20), c.windows)
		if len(c.waits) > 0 {
			sort.Slice(c.waits, func(i, j int) bool { return c.waits[i] < c.waits[j] })
			p := func(q float64) time.Duration { return c.waits[int(q*float64(len(c.waits)-1))].Round(time.Microsecond) }
			fmt.Fprintf(&b, " wait p50=%s p99=%s", fmtDur(p(0.5)), fmtDur(p(0.99)))
		}
		b.WriteString("\n")
	}
	return b.String()
}
