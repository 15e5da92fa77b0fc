package netlab

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// TestRuleset renders node rules from fault state without a kernel (it
// runs unprivileged): each fault gives the rule the package doc promises,
// in the node whose ingress sees the packets.
func TestRuleset(t *testing.T) {
	l := &Lab{prefix: "nlab0000"}
	for i := range 3 {
		l.nodes = append(l.nodes, &Node{lab: l, index: i, ifname: fmt.Sprintf("nlab0000-n%d", i),
			ip: netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)})})
	}
	l.faults.init()
	const head = "add rule netdev netlab ingress "
	for _, tc := range []struct {
		name  string
		edit  func(f *faults)
		node  int
		rules []string
	}{
		{"none", func(f *faults) {}, 0, nil},
		{"partition 0 1 at 0", func(f *faults) { f.partitions[pair(1, 0)] = true }, 0,
			[]string{`ip saddr 10.0.0.2 counter name "partition_from_1" drop`}},
		{"partition 0 1 at 2", func(f *faults) { f.partitions[pair(1, 0)] = true }, 2, nil},
		{"isolate 1 at 1", func(f *faults) { f.isolated[1] = true }, 1,
			[]string{`meta protocol ip counter name "isolate" drop`}},
		{"isolate 1 at 2", func(f *faults) { f.isolated[1] = true }, 2,
			[]string{`ip saddr 10.0.0.2 counter name "isolate_from_1" drop`}},
		{"loss 2 5% at 2", func(f *faults) { f.loss[2] = 500 }, 2,
			[]string{`meta protocol ip numgen random mod 10000 < 500 counter name "loss" drop`}},
		{"loss 2 100% at 0", func(f *faults) { f.loss[2] = 10000 }, 0,
			[]string{`ip saddr 10.0.0.3 meta protocol ip counter name "loss_from_2" drop`}},
		{"one way 1→0 at 0", func(f *faults) {
			f.oneway[[2]int{1, 0}] = []Selector{{Proto: "udp", SrcPort: 7000}, {DstPort: 9}}
		}, 0, []string{
			`ip saddr 10.0.0.2 meta l4proto udp th sport 7000 counter name "oneway_from_1" drop`,
			`ip saddr 10.0.0.2 meta l4proto { tcp, udp } th dport 9 counter name "oneway_from_1" drop`,
		}},
		{"one way 1→0 at 1", func(f *faults) { f.oneway[[2]int{1, 0}] = []Selector{{}} }, 1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l.faults.init()
			tc.edit(&l.faults)
			var got []string
			for _, line := range strings.Split(l.ruleset(tc.node), "\n") {
				if r, ok := strings.CutPrefix(line, head); ok && r != "meta pkttype other accept" {
					got = append(got, r)
				}
			}
			if strings.Join(got, "\n") != strings.Join(tc.rules, "\n") {
				t.Errorf("rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.rules, "\n"))
			}
		})
	}
	if _, err := (Selector{Proto: "icmp"}).match(); err == nil {
		t.Error("selector protocol icmp accepted")
	}
}
