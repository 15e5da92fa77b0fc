package netlab

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// table is the nftables table (family netdev) the lab owns in each node
// namespace.
const table = "netlab"

// Fault names a kind of drop rule; counters are kept per kind.
type Fault string

const (
	FaultPartition Fault = "partition"
	FaultIsolate   Fault = "isolate"
	FaultLoss      Fault = "loss"
	FaultOneWay    Fault = "oneway"
)

var faultKinds = []Fault{FaultIsolate, FaultPartition, FaultOneWay, FaultLoss}

// Selector narrows DropOneWay to some packets. The zero value matches every
// IPv4 packet.
type Selector struct {
	// Proto is "udp", "tcp" or "" for any protocol (ports then match TCP
	// and UDP).
	Proto string
	// SrcPort and DstPort match the transport ports; 0 matches any.
	SrcPort, DstPort uint16
}

func (s Selector) match() (string, error) {
	var parts []string
	switch s.Proto {
	case "udp", "tcp":
		parts = append(parts, "meta l4proto "+s.Proto)
	case "":
		if s.SrcPort != 0 || s.DstPort != 0 {
			parts = append(parts, "meta l4proto { tcp, udp }")
		}
	default:
		return "", fmt.Errorf("selector protocol %q: want udp, tcp or empty", s.Proto)
	}
	if s.SrcPort != 0 {
		parts = append(parts, fmt.Sprintf("th sport %d", s.SrcPort))
	}
	if s.DstPort != 0 {
		parts = append(parts, fmt.Sprintf("th dport %d", s.DstPort))
	}
	return strings.Join(parts, " "), nil
}

// faults is the lab's fault state; each node's rules are rendered from it.
type faults struct {
	partitions map[[2]int]bool // {i, j} with i < j
	isolated   map[int]bool
	loss       map[int]int // node → basis points (1/100 of a percent)
	oneway     map[[2]int][]Selector
}

func (f *faults) init() {
	f.partitions = map[[2]int]bool{}
	f.isolated = map[int]bool{}
	f.loss = map[int]int{}
	f.oneway = map[[2]int][]Selector{}
}

func pair(i, j int) [2]int {
	if i > j {
		i, j = j, i
	}
	return [2]int{i, j}
}

func counterName(f Fault, from int) string {
	if from < 0 {
		return string(f)
	}
	return fmt.Sprintf("%s_from_%d", f, from)
}

// ruleset renders node i's table: every counter (declared each time: `add`
// keeps an existing counter and its values), the ingress chain, and the
// rules replacing the chain's old ones in the same transaction.
func (l *Lab) ruleset(i int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "add table netdev %s\n", table)
	fmt.Fprintf(&b, "add counter netdev %s %s\n", table, counterName(FaultIsolate, -1))
	fmt.Fprintf(&b, "add counter netdev %s %s\n", table, counterName(FaultLoss, -1))
	for j := range l.nodes {
		if j != i {
			for _, f := range faultKinds {
				fmt.Fprintf(&b, "add counter netdev %s %s\n", table, counterName(f, j))
			}
		}
	}
	fmt.Fprintf(&b, "add chain netdev %s ingress { type filter hook ingress device %q priority 0; policy accept; }\n",
		table, l.nodes[i].ifname)
	fmt.Fprintf(&b, "flush chain netdev %s ingress\n", table)
	// Until the bridge learns where a MAC is, it floods unicast frames to
	// every port; those frames are not this node's (the stack drops them)
	// and must not meet its rules or its counters.
	fmt.Fprintf(&b, "add rule netdev %s ingress meta pkttype other accept\n", table)
	rule := func(match string, f Fault, from int) {
		fmt.Fprintf(&b, "add rule netdev %s ingress %s counter name %q drop\n", table, match, counterName(f, from))
	}
	saddr := func(j int) string { return "ip saddr " + l.nodes[j].IP() }
	random := func(bp int) string {
		if bp >= 10000 {
			return "meta protocol ip" // 100%: every packet (numgen's values stop at 9999)
		}
		return fmt.Sprintf("numgen random mod 10000 < %d", bp)
	}

	fs := &l.faults
	if fs.isolated[i] {
		rule("meta protocol ip", FaultIsolate, -1)
	}
	for j := range l.nodes {
		if j != i && fs.isolated[j] {
			rule(saddr(j), FaultIsolate, j)
		}
	}
	for j := range l.nodes {
		if j != i && fs.partitions[pair(i, j)] {
			rule(saddr(j), FaultPartition, j)
		}
	}
	for j := range l.nodes {
		for _, sel := range fs.oneway[[2]int{j, i}] {
			m, _ := sel.match() // checked by DropOneWay
			rule(strings.TrimSpace(saddr(j)+" "+m), FaultOneWay, j)
		}
	}
	for j := range l.nodes {
		if bp := fs.loss[j]; j != i && bp > 0 {
			rule(saddr(j)+" "+random(bp), FaultLoss, j)
		}
	}
	if bp := fs.loss[i]; bp > 0 {
		rule("meta protocol ip "+random(bp), FaultLoss, -1)
	}
	return b.String()
}

// applyLocked loads the ruleset of every node whose rules changed (all of
// them when force is set).
func (l *Lab) applyLocked(force bool) error {
	if l.closed {
		return errClosed
	}
	for i, nd := range l.nodes {
		rs := l.ruleset(i)
		if !force && rs == l.applied[i] {
			continue
		}
		out, err := l.runIn(nd.ns, rs, l.nft, "-f", "-")
		if err != nil {
			l.applied[i] = "" // unknown: load it again next time
			return fmt.Errorf("nft -f - in %s: %v: %s\nruleset:\n%s", nd.ns.name, err, strings.TrimSpace(string(out)), rs)
		}
		l.applied[i] = rs
	}
	return nil
}

// change edits the fault state and loads the rules that changed; a failure
// fails the test.
func (l *Lab) change(what string, edit func(f *faults)) {
	l.t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	edit(&l.faults)
	if err := l.applyLocked(false); err != nil {
		l.t.Fatalf("netlab: %s: %v", what, err)
	}
}

func (l *Lab) checkPair(i, j int) {
	l.t.Helper()
	l.checkNode(i)
	l.checkNode(j)
	if i == j {
		l.t.Fatalf("netlab: node %d paired with itself", i)
	}
}

// Partition drops all traffic between nodes i and j, both ways.
func (l *Lab) Partition(i, j int) {
	l.t.Helper()
	l.checkPair(i, j)
	l.change(fmt.Sprintf("partition %d %d", i, j), func(f *faults) { f.partitions[pair(i, j)] = true })
}

// Heal undoes Partition(i, j).
func (l *Lab) Heal(i, j int) {
	l.t.Helper()
	l.checkPair(i, j)
	l.change(fmt.Sprintf("heal %d %d", i, j), func(f *faults) { delete(f.partitions, pair(i, j)) })
}

// Isolate cuts node i off from every other node, both ways.
func (l *Lab) Isolate(i int) {
	l.t.Helper()
	l.checkNode(i)
	l.change(fmt.Sprintf("isolate %d", i), func(f *faults) { f.isolated[i] = true })
}

// Rejoin undoes Isolate(i); partitions of i stay.
func (l *Lab) Rejoin(i int) {
	l.t.Helper()
	l.checkNode(i)
	l.change(fmt.Sprintf("rejoin %d", i), func(f *faults) { delete(f.isolated, i) })
}

// Loss drops percent of the IPv4 packets to and from node i, at random
// (resolution 0.01%). Loss(i, 0) is ClearLoss(i).
func (l *Lab) Loss(i int, percent float64) {
	l.t.Helper()
	l.checkNode(i)
	if !(percent >= 0 && percent <= 100) {
		l.t.Fatalf("netlab: loss %v%%: want 0 to 100", percent)
	}
	bp := int(math.Round(percent * 100))
	l.change(fmt.Sprintf("loss %d %v%%", i, percent), func(f *faults) {
		if bp == 0 {
			delete(f.loss, i)
		} else {
			f.loss[i] = bp
		}
	})
}

// ClearLoss undoes Loss(i, …).
func (l *Lab) ClearLoss(i int) {
	l.t.Helper()
	l.Loss(i, 0)
}

// DropOneWay drops the packets from node from to node to that match sel;
// packets from to to from pass. Several selectors for one pair add up.
func (l *Lab) DropOneWay(from, to int, sel Selector) {
	l.t.Helper()
	l.checkPair(from, to)
	if _, err := sel.match(); err != nil {
		l.t.Fatalf("netlab: drop one way %d→%d: %v", from, to, err)
	}
	l.change(fmt.Sprintf("drop one way %d→%d %+v", from, to, sel), func(f *faults) {
		k := [2]int{from, to}
		if !slices.Contains(f.oneway[k], sel) {
			f.oneway[k] = append(f.oneway[k], sel)
		}
	})
}

// HealOneWay removes every DropOneWay(from, to, …).
func (l *Lab) HealOneWay(from, to int) {
	l.t.Helper()
	l.checkPair(from, to)
	l.change(fmt.Sprintf("heal one way %d→%d", from, to), func(f *faults) { delete(f.oneway, [2]int{from, to}) })
}

// HealAll removes every fault (relays keep running: see StopRelay).
func (l *Lab) HealAll() {
	l.t.Helper()
	l.change("heal all", func(f *faults) { f.init() })
}

// Counter is one drop counter of one node's table.
type Counter struct {
	Node  int   // the node whose ingress dropped the packets
	From  int   // the sender the rule matches, or -1 for any sender
	Fault Fault // the kind of rule
	// Packets and Bytes dropped since the lab was built.
	Packets, Bytes uint64
}

// Stats holds every drop counter of a lab.
type Stats []Counter

// Packets sums the packets dropped by rules of kind f at node (any node when
// node < 0) from sender from (any rule when from < 0).
func (s Stats) Packets(f Fault, node, from int) uint64 {
	var sum uint64
	for _, c := range s {
		if c.Fault == f && (node < 0 || c.Node == node) && (from < 0 || c.From == from) {
			sum += c.Packets
		}
	}
	return sum
}

// Stats reads the drop counters of every node (nft -j list counters).
func (l *Lab) Stats() Stats {
	l.t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var all Stats
	for i, nd := range l.nodes {
		out, err := l.runIn(nd.ns, "", l.nft, "-j", "list", "counters", "table", "netdev", table)
		if err != nil {
			l.t.Fatalf("netlab: list counters of %s: %v: %s", nd.ns.name, err, out)
		}
		cs, err := parseCounters(i, out)
		if err != nil {
			l.t.Fatalf("netlab: counters of %s: %v", nd.ns.name, err)
		}
		all = append(all, cs...)
	}
	return all
}

func parseCounters(node int, js []byte) (Stats, error) {
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Name    string `json:"name"`
				Packets uint64 `json:"packets"`
				Bytes   uint64 `json:"bytes"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		return nil, fmt.Errorf("decode nft json: %w", err)
	}
	var s Stats
	for _, o := range doc.Nftables {
		if o.Counter == nil {
			continue
		}
		kind, from, ok := strings.Cut(o.Counter.Name, "_from_")
		c := Counter{Node: node, From: -1, Fault: Fault(kind), Packets: o.Counter.Packets, Bytes: o.Counter.Bytes}
		if ok {
			n, err := strconv.Atoi(from)
			if err != nil {
				return nil, fmt.Errorf("counter %q: %w", o.Counter.Name, err)
			}
			c.From = n
		}
		s = append(s, c)
	}
	return s, nil
}
