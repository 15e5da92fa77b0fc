package netlab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain lets the test binary double as a small UDP echo program that
// TestCommandSeesNodeAddress starts inside a node.
func TestMain(m *testing.M) {
	if os.Getenv("NETLAB_HELPER") == "udp-echo" {
		os.Exit(helperEcho())
	}
	os.Exit(m.Run())
}

// helperEcho prints its interface addresses and port, echoes one datagram
// and exits (after 20 s at most).
func helperEcho() int {
	pc, err := net.ListenPacket("udp4", ":0")
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	addrs, _ := net.InterfaceAddrs()
	fmt.Printf("addrs=%v port=%d\n", addrs, pc.LocalAddr().(*net.UDPAddr).Port)
	pc.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 1500)
	n, from, err := pc.ReadFrom(buf)
	if err != nil {
		return 1
	}
	pc.WriteTo(buf[:n], from)
	return 0
}

// udpSocket opens a UDP socket on the node's address (port 0: any) with
// big buffers, closed at the end of the test.
func udpSocket(t *testing.T, n *Node, port int) *net.UDPConn {
	t.Helper()
	pc, err := n.ListenPacket("udp4", net.JoinHostPort(n.IP(), strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	c := pc.(*net.UDPConn)
	forceBuffers(c)
	t.Cleanup(func() { c.Close() })
	return c
}

// counter counts the datagrams a socket receives, in a goroutine that ends
// when the socket is closed.
type counter struct {
	n    atomic.Int64
	done chan struct{}
}

func count(t *testing.T, c *net.UDPConn, echo bool) *counter {
	k := &counter{done: make(chan struct{})}
	go func() {
		defer close(k.done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			k.n.Add(1)
			if echo {
				c.WriteToUDPAddrPort(buf[:n], from)
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-k.done })
	return k
}

// waitFor polls cond every 2 ms until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}

// reach tells whether a datagram from node from arrives at node to: three
// copies of a token 10 ms apart, then at most 250 ms of waiting.
func reach(t *testing.T, from, to *Node) bool {
	t.Helper()
	rx := udpSocket(t, to, 0)
	defer rx.Close()
	tx := udpSocket(t, from, 0)
	defer tx.Close()
	token := make([]byte, 16)
	rand.Read(token)
	for range 3 {
		tx.WriteTo(token, rx.LocalAddr()) // an unreachable network is an answer too
		time.Sleep(10 * time.Millisecond)
	}
	rx.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
	buf := make([]byte, 64)
	for {
		n, _, err := rx.ReadFrom(buf)
		if err != nil {
			return false
		}
		if bytes.Equal(buf[:n], token) {
			return true
		}
	}
}

// checkReach asserts reach for each ordered pair: want[i][j] says whether
// i reaches j.
func checkReach(t *testing.T, lab *Lab, want func(i, j int) bool) {
	t.Helper()
	for i := range lab.N() {
		for j := range lab.N() {
			if i == j {
				continue
			}
			if got := reach(t, lab.Node(i), lab.Node(j)); got != want(i, j) {
				t.Errorf("node %d → node %d: reached %v, want %v", i, j, got, want(i, j))
			}
		}
	}
}

func all(i, j int) bool { return true }

// rtts sends n numbered datagrams one at a time from node from to an echo
// at addr and returns each round-trip time.
func rtts(t *testing.T, from *Node, addr string, n int) []time.Duration {
	t.Helper()
	dst := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr))
	c := udpSocket(t, from, 0)
	defer c.Close()
	out := make([]time.Duration, 0, n)
	buf := make([]byte, 64)
	for seq := range uint64(n) {
		msg := binary.BigEndian.AppendUint64(nil, seq)
		t0 := time.Now()
		if _, err := c.WriteTo(msg, dst); err != nil {
			t.Fatalf("send %d to %s: %v", seq, addr, err)
		}
		c.SetReadDeadline(t0.Add(2 * time.Second))
		for {
			k, _, err := c.ReadFrom(buf)
			if err != nil {
				t.Fatalf("echo %d from %s: %v", seq, addr, err)
			}
			if k == 8 && binary.BigEndian.Uint64(buf) == seq {
				break // an older, late reply is skipped
			}
		}
		out = append(out, time.Since(t0))
	}
	return out
}

func quantile(xs []time.Duration, q float64) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))]
}

func TestEchoAllPairs(t *testing.T) {
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("%dnodes", n), func(t *testing.T) {
			lab := New(t, n, Options{})
			for i := range n {
				count(t, udpSocket(t, lab.Node(i), 7007), true)
			}
			for i := range n {
				for j := range n {
					if i != j {
						d := rtts(t, lab.Node(i), lab.Node(j).IP()+":7007", 5)
						t.Logf("node %d (%s) → node %d (%s): rtt %v", i, lab.Node(i).IP(), j, lab.Node(j).IP(), quantile(d, 0.5))
					}
				}
			}
		})
	}
}

func TestPartitionHeal(t *testing.T) {
	lab := New(t, 3, Options{})
	checkReach(t, lab, all)

	lab.Partition(0, 1)
	lab.Partition(1, 0) // the same partition: idempotent
	cut := func(i, j int) bool { return !(i+j == 1) }
	checkReach(t, lab, cut)
	st := lab.Stats()
	if st.Packets(FaultPartition, 0, 1) == 0 || st.Packets(FaultPartition, 1, 0) == 0 {
		t.Errorf("partition counters did not count both ways: %+v", st)
	}
	if st.Packets(FaultPartition, 2, -1) != 0 {
		t.Errorf("node 2 dropped packets: %+v", st)
	}

	lab.Heal(0, 1) // one Heal undoes it
	checkReach(t, lab, all)
	lab.Heal(0, 1) // healing a healed pair is a no-op
	checkReach(t, lab, all)
}

func TestIsolateRejoin(t *testing.T) {
	lab := New(t, 3, Options{})
	lab.Isolate(2)
	checkReach(t, lab, func(i, j int) bool { return i != 2 && j != 2 })
	st := lab.Stats()
	if st.Packets(FaultIsolate, 2, -1) == 0 || st.Packets(FaultIsolate, -1, 2) == 0 {
		t.Errorf("isolation counters did not count both ways: %+v", st)
	}

	// Rejoin does not heal a partition made meanwhile, and vice versa.
	lab.Partition(0, 1)
	lab.Rejoin(2)
	checkReach(t, lab, func(i, j int) bool { return i+j != 1 })
	lab.Isolate(0)
	lab.Heal(0, 1)
	checkReach(t, lab, func(i, j int) bool { return i != 0 && j != 0 })

	lab.HealAll()
	checkReach(t, lab, all)
}

// TestTCP: Listen and DialContext make TCP sockets inside nodes; a
// partition stops a dial and Heal lets the next one through.
func TestTCP(t *testing.T) {
	lab := New(t, 2, Options{})
	ln, err := lab.Node(1).Listen("tcp", lab.Node(1).IP()+":0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed at teardown
			}
			c.Write([]byte("hello from " + c.LocalAddr().String()))
			c.Close()
		}
	}()
	dial := func(timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c, err := lab.Node(0).DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(timeout))
		b := make([]byte, 64)
		n, err := c.Read(b)
		return string(b[:n]), err
	}
	if got, err := dial(2 * time.Second); err != nil || got != "hello from "+ln.Addr().String() {
		t.Fatalf("dial: %q, %v", got, err)
	}
	lab.Partition(0, 1)
	if got, err := dial(300 * time.Millisecond); err == nil {
		t.Errorf("dial through a partition answered %q", got)
	}
	lab.Heal(0, 1)
	if _, err := dial(2 * time.Second); err != nil {
		t.Errorf("dial after heal: %v", err)
	}
}

// TestFloodedFramesPass turns the switch into a hub (bridge ageing 0: it
// floods every frame to every port), so node 2 sees the frames between
// nodes 0 and 1: its loss rule must neither drop nor count them.
func TestFloodedFramesPass(t *testing.T) {
	lab := New(t, 3, Options{})
	if err := lab.ip(lab.sw.name, "link set "+lab.prefix+"-br type bridge ageing_time 0"); err != nil {
		t.Fatal(err)
	}
	lab.Loss(2, 100)
	count(t, udpSocket(t, lab.Node(1), 7007), true)
	rtts(t, lab.Node(0), lab.Node(1).IP()+":7007", 100)
	if got := lab.Stats().Packets(FaultLoss, 2, -1); got != 0 {
		t.Errorf("node 2 counted %d flooded frames as its loss", got)
	}
	if reach(t, lab.Node(0), lab.Node(2)) {
		t.Error("node 2 at 100% loss was reached")
	}
}

// TestLoss sends 2000 datagrams each way through Loss(1, 5%) and accepts a
// drop count of 40 to 180 (2% to 9%). The count is Binomial(2000, 0.05):
// mean 100, standard deviation 9.7; P(X < 40) = 1.1e-12 and P(X > 180) =
// 3.9e-14 (exact binomial sums), so a correct lab fails this test about
// once in 10^11 runs. Every datagram is accounted for: received + dropped
// by the loss rules == sent, so no other loss hides in the numbers.
func TestLoss(t *testing.T) {
	const (
		total = 2000
		batch = 100
	)
	lab := New(t, 2, Options{})
	lab.Loss(1, 5)
	for _, dir := range []struct{ from, to int }{{0, 1}, {1, 0}} {
		rx := udpSocket(t, lab.Node(dir.to), 0)
		got := count(t, rx, false)
		tx := udpSocket(t, lab.Node(dir.from), 0)
		dropped := func() int64 { return int64(lab.Stats().Packets(FaultLoss, dir.to, -1)) }
		base := dropped()
		for sent := 0; sent < total; {
			for range batch {
				if _, err := tx.WriteTo(binary.BigEndian.AppendUint64(nil, uint64(sent)), rx.LocalAddr()); err != nil {
					t.Fatalf("send: %v", err)
				}
				sent++
			}
			// Wait until the batch is accounted for, so the receiver's
			// buffer never holds more than one batch.
			var d int64
			if !waitFor(5*time.Second, func() bool { d = dropped() - base; return got.n.Load()+d == int64(sent) }) {
				diag, _ := lab.Node(dir.to).Command(context.Background(), "sh", "-c",
					"cat /proc/net/snmp; ip -s link; "+lab.nft+" list ruleset").CombinedOutput()
				t.Fatalf("%d→%d: sent %d, received %d, dropped by the loss rule %d: some loss is not the lab's\n%s",
					dir.from, dir.to, sent, got.n.Load(), d, diag)
			}
		}
		d := dropped() - base
		t.Logf("node %d → node %d: %d of %d dropped (%.2f%%)", dir.from, dir.to, d, total, 100*float64(d)/total)
		if d < 40 || d > 180 {
			t.Errorf("node %d → node %d: %d of %d dropped, want 40 to 180 (2%% to 9%%)", dir.from, dir.to, d, total)
		}
	}

	lab.ClearLoss(1)
	rx := udpSocket(t, lab.Node(1), 0)
	got := count(t, rx, false)
	tx := udpSocket(t, lab.Node(0), 0)
	for range 200 {
		tx.WriteTo([]byte("x"), rx.LocalAddr())
	}
	if !waitFor(2*time.Second, func() bool { return got.n.Load() == 200 }) {
		t.Errorf("after ClearLoss: received %d of 200", got.n.Load())
	}
}

// TestDropOneWay: node 0 (port 7001) sends requests to an echo on node 1
// (port 7000), and node 1 runs a second flow from port 7002 to node 0 port
// 7003. Each selector drops replies (node 1 → node 0) and never requests.
func TestDropOneWay(t *testing.T) {
	lab := New(t, 2, Options{})
	n0, n1 := lab.Node(0), lab.Node(1)
	server := count(t, udpSocket(t, n1, 7000), true)
	client := udpSocket(t, n0, 7001)
	replies := count(t, client, false)
	other := udpSocket(t, n1, 7002)
	otherRx := count(t, udpSocket(t, n0, 7003), false)
	serverAddr := &net.UDPAddr{IP: net.ParseIP(n1.IP()), Port: 7000}
	otherAddr := &net.UDPAddr{IP: net.ParseIP(n0.IP()), Port: 7003}

	for _, tc := range []struct {
		name          string
		sel           Selector
		dropReplies   bool // 7000 → 7001
		dropOtherFlow bool // 7002 → 7003
	}{
		{"udp sport 7000", Selector{Proto: "udp", SrcPort: 7000}, true, false},
		{"dport 7001", Selector{DstPort: 7001}, true, false},
		{"udp 7002→7003", Selector{Proto: "udp", SrcPort: 7002, DstPort: 7003}, false, true},
		{"tcp sport 7000", Selector{Proto: "tcp", SrcPort: 7000}, false, false},
		{"any", Selector{}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lab.HealAll()
			lab.DropOneWay(1, 0, tc.sel)
			lab.DropOneWay(1, 0, tc.sel) // idempotent: one rule, one count per packet
			before := lab.Stats().Packets(FaultOneWay, 0, 1)
			s0, r0, o0 := server.n.Load(), replies.n.Load(), otherRx.n.Load()
			const k = 20
			for range k {
				client.WriteTo([]byte("request"), serverAddr)
				other.WriteTo([]byte("other"), otherAddr)
			}
			if !waitFor(2*time.Second, func() bool { return server.n.Load()-s0 == k }) {
				t.Fatalf("the echo received %d of %d requests: requests were dropped", server.n.Load()-s0, k)
			}
			wantReplies, wantOther := int64(k), int64(k)
			if tc.dropReplies {
				wantReplies = 0
			}
			if tc.dropOtherFlow {
				wantOther = 0
			}
			waitFor(2*time.Second, func() bool {
				return replies.n.Load()-r0 == wantReplies && otherRx.n.Load()-o0 == wantOther
			})
			time.Sleep(50 * time.Millisecond) // room for a datagram that should not come
			if got := replies.n.Load() - r0; got != wantReplies {
				t.Errorf("replies received: %d, want %d", got, wantReplies)
			}
			if got := otherRx.n.Load() - o0; got != wantOther {
				t.Errorf("other flow received: %d, want %d", got, wantOther)
			}
			if got, want := int64(lab.Stats().Packets(FaultOneWay, 0, 1)-before), 2*k-wantReplies-wantOther; got != want {
				t.Errorf("one-way counter counted %d drops, want %d", got, want)
			}
			lab.HealOneWay(1, 0)
		})
	}
}

// TestRelay measures round trips node 0 → node 1's echo, directly and
// through a relay in node 1 with delays of 0, 100 µs and 5 ms. Every
// round trip through the relay must take at least 2×delay; the median at
// most 2×delay + 5 ms (a direct round trip takes about 0.1 ms; the bound
// leaves room for a loaded two-core CI machine running -race).
func TestRelay(t *testing.T) {
	lab := New(t, 2, Options{})
	n0, n1 := lab.Node(0), lab.Node(1)
	count(t, udpSocket(t, n1, 7007), true)
	echo := n1.IP() + ":7007"

	direct := rtts(t, n0, echo, 200)
	t.Logf("direct: min %v p50 %v p99 %v", quantile(direct, 0), quantile(direct, 0.5), quantile(direct, 0.99))
	var relay0 time.Duration
	for _, tc := range []struct {
		delay time.Duration
		n     int
	}{{0, 200}, {100 * time.Microsecond, 200}, {5 * time.Millisecond, 50}} {
		addr := lab.Relay(1, ":0", echo, tc.delay)
		d := rtts(t, n0, addr, tc.n)
		st := lab.RelayStats(addr)
		lab.StopRelay(addr)
		p50 := quantile(d, 0.5)
		t.Logf("relay %v: min %v p50 %v p99 %v max %v; late mean %v max %v; %+v",
			tc.delay, quantile(d, 0), p50, quantile(d, 0.99), quantile(d, 1), st.MeanLate, st.MaxLate, st)
		if tc.delay == 0 {
			relay0 = p50
		}
		if min := quantile(d, 0); min < 2*tc.delay {
			t.Errorf("relay %v: fastest round trip %v < 2×delay", tc.delay, min)
		}
		if p50 > 2*tc.delay+5*time.Millisecond {
			t.Errorf("relay %v: median round trip %v > 2×delay + 5ms", tc.delay, p50)
		}
		if st.Requests != uint64(tc.n) || st.Replies != uint64(tc.n) || st.Dropped != 0 || st.Clients != 1 {
			t.Errorf("relay %v: stats %+v, want %d requests and replies, one client, no drops", tc.delay, st, tc.n)
		}
	}
	t.Logf("relay overhead (median, delay 0, vs direct): %v", relay0-quantile(direct, 0.5))
}

// TestRelayOrder sends a burst of numbered datagrams through a 1 ms relay
// to an echo: all come back, in order.
func TestRelayOrder(t *testing.T) {
	const n = 500
	lab := New(t, 2, Options{})
	n0, n1 := lab.Node(0), lab.Node(1)
	count(t, udpSocket(t, n1, 7007), true)
	addr := lab.Relay(1, ":0", n1.IP()+":7007", time.Millisecond)
	c := udpSocket(t, n0, 0)
	dst := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr))
	t0 := time.Now()
	for seq := range uint64(n) {
		if _, err := c.WriteTo(binary.BigEndian.AppendUint64(nil, seq), dst); err != nil {
			t.Fatal(err)
		}
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	for want := range uint64(n) {
		k, _, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatalf("reply %d: %v (relay %+v)", want, err, lab.RelayStats(addr))
		}
		if got := binary.BigEndian.Uint64(buf[:k]); got != want {
			t.Fatalf("reply %d came as number %d: reordered or lost (relay %+v)", want, got, lab.RelayStats(addr))
		}
	}
	t.Logf("%d datagrams through a 1ms relay and back, in order, in %v; relay %+v", n, time.Since(t0), lab.RelayStats(addr))
}

// TestRelayTargetLate: a datagram relayed before the target listens is
// lost (the upstream socket gets ECONNREFUSED); the relay keeps the client
// and works once the target listens.
func TestRelayTargetLate(t *testing.T) {
	lab := New(t, 2, Options{})
	n0, n1 := lab.Node(0), lab.Node(1)
	addr := lab.Relay(1, ":0", n1.IP()+":7009", 0)
	c := udpSocket(t, n0, 0)
	dst := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr))
	for range 3 {
		c.WriteTo([]byte("early"), dst)
	}
	if !waitFor(2*time.Second, func() bool { st := lab.RelayStats(addr); return st.Requests+st.Dropped == 3 }) {
		t.Fatalf("relay %+v", lab.RelayStats(addr))
	}
	t.Logf("before the target listens: relay %+v", lab.RelayStats(addr))
	time.Sleep(20 * time.Millisecond) // the ICMP errors arrive
	count(t, udpSocket(t, n1, 7009), true)
	c.Close()
	rtts(t, n0, addr, 5)
	if st := lab.RelayStats(addr); st.Replies != 5 {
		t.Errorf("relay %+v, want 5 replies", st)
	}
}

// TestParallelLabs builds two labs at once from parallel subtests: each
// works, and they got different prefixes and subnets.
func TestParallelLabs(t *testing.T) {
	var mu sync.Mutex
	subnets := map[string]netip.Prefix{}
	t.Run("group", func(t *testing.T) {
		for _, name := range []string{"a", "b"} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				lab := New(t, 2, Options{})
				count(t, udpSocket(t, lab.Node(1), 7007), true)
				rtts(t, lab.Node(0), lab.Node(1).IP()+":7007", 50)
				mu.Lock()
				subnets[lab.Prefix()] = lab.Subnet()
				mu.Unlock()
			})
		}
	})
	if t.Failed() {
		return
	}
	if len(subnets) != 2 {
		t.Fatalf("two labs got prefixes %v", subnets)
	}
	var ps []netip.Prefix
	for _, p := range subnets {
		ps = append(ps, p)
	}
	if ps[0] == ps[1] {
		t.Errorf("two labs got one subnet %v", ps[0])
	}
	t.Logf("labs: %v", subnets)
}

// TestLabsDoNotMeet: two labs alive at once have different names and
// subnets, and a node of one cannot reach a node of the other.
func TestLabsDoNotMeet(t *testing.T) {
	a, b := New(t, 2, Options{}), New(t, 2, Options{})
	if a.Prefix() == b.Prefix() || a.Subnet() == b.Subnet() || a.Node(0).Name() == b.Node(0).Name() {
		t.Fatalf("labs collide: %s %v, %s %v", a.Prefix(), a.Subnet(), b.Prefix(), b.Subnet())
	}
	if reach(t, a.Node(0), b.Node(1)) || reach(t, b.Node(0), a.Node(1)) {
		t.Error("a node reached a node of another lab")
	}
	if !reach(t, a.Node(0), a.Node(1)) || !reach(t, b.Node(0), b.Node(1)) {
		t.Error("a lab does not work beside another")
	}
}

// TestCommandSeesNodeAddress runs programs inside a node: ip sees the
// node's address only, and a Go echo started from the test binary is
// reachable from another node at the node's address.
func TestCommandSeesNodeAddress(t *testing.T) {
	lab := New(t, 2, Options{})
	n0, n1 := lab.Node(0), lab.Node(1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	out, err := n1.Command(ctx, "sh", "-c", "ip -4 -o addr show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr in node 1: %v\n%s", err, out)
	}
	s := string(out)
	if !strings.Contains(s, n1.IP()+"/24") || !strings.Contains(s, "127.0.0.1/8") || strings.Contains(s, n0.IP()+"/") {
		t.Errorf("node 1 (%s) sees:\n%s", n1.IP(), s)
	}

	cmd := n1.Command(ctx, os.Args[0])
	cmd.Env = append(os.Environ(), "NETLAB_HELPER=udp-echo")
	line, _ := startFind(t, cmd, "addrs=")
	t.Logf("helper in node 1: %s", line)
	if !strings.Contains(line, n1.IP()+"/24") || strings.Contains(line, n0.IP()+"/") {
		t.Errorf("helper sees the wrong addresses: %s", line)
	}
	_, port, _ := strings.Cut(line, "port=")
	rtts(t, n0, net.JoinHostPort(n1.IP(), port), 1)
	if err := cmd.Wait(); err != nil {
		t.Errorf("helper: %v", err)
	}
}

// ipTool is the path of ip (tests may have no sbin in PATH).
func ipTool(t *testing.T) string { return lookTool(t, "ip", "iproute2") }

// startFind starts cmd and reads its output up to the first line that
// begins with prefix; it returns the rest of that line and the reader of
// the output still to come.
func startFind(t *testing.T, cmd *exec.Cmd, prefix string) (string, *bufio.Reader) {
	t.Helper()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(stdout)
	for {
		line, err := r.ReadString('\n') // ends at the latest when cmd exits
		if rest, ok := strings.CutPrefix(line, prefix); ok && err == nil {
			return strings.TrimSpace(rest), r
		}
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("%v: no line starting %q: %v", cmd.Args, prefix, err)
		}
	}
}

// ours lists what a lab of the prefix has left: namespaces, links in the
// root namespace, the lock file.
func ours(t *testing.T, prefix string) []string {
	t.Helper()
	var left []string
	out, err := exec.Command(ipTool(t), "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, prefix) {
			left = append(left, "netns "+l)
		}
	}
	out, err = exec.Command(ipTool(t), "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link: %v: %s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, prefix) {
			left = append(left, "root link "+l)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(netnsDir, prefix+"*")); len(m) > 0 {
		left = append(left, m...)
	}
	if _, err := os.Stat(lockPath(prefix)); err == nil {
		left = append(left, lockPath(prefix))
	}
	return left
}

// inNetns waits (at most 2 s) until pid's network namespace is the named
// one: `ip netns exec` enters it a moment after it starts.
func inNetns(t *testing.T, pid int, name string) {
	t.Helper()
	var ns unix.Stat_t
	if err := unix.Stat(filepath.Join(netnsDir, name), &ns); err != nil {
		t.Fatal(err)
	}
	if !waitFor(2*time.Second, func() bool {
		var st unix.Stat_t
		return unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && st.Dev == ns.Dev && st.Ino == ns.Ino
	}) {
		t.Fatalf("pid %d did not enter netns %s", pid, name)
	}
}

// gone waits (at most 3 s) until pid has exited (a zombie counts: it holds
// no namespace).
func gone(pid int) bool {
	return waitFor(3*time.Second, func() bool {
		_, err := os.Stat(fmt.Sprintf("/proc/%d/ns/net", pid))
		return err != nil
	})
}

// TestTeardownLeavesNothing builds a lab with faults, a relay, an open
// socket and processes left running, lets its cleanup run, and then finds
// nothing of it: no namespace, link or lock, and the processes were killed
// (the one Command started, found by its pid, and its child, found by its
// namespace). While the lab lives, the root namespace has no link and no
// nftables table of it.
func TestTeardownLeavesNothing(t *testing.T) {
	var prefix string
	var shell *exec.Cmd
	child := -1
	t.Run("lab", func(t *testing.T) {
		lab := New(t, 3, Options{})
		prefix = lab.Prefix()
		if len(ours(t, prefix)) == 0 {
			t.Fatal("ours finds nothing of a live lab")
		}
		lab.Partition(0, 1)
		lab.Loss(2, 10)
		lab.DropOneWay(2, 0, Selector{Proto: "udp", DstPort: 9})
		lab.Relay(1, ":0", lab.Node(2).IP()+":9", time.Millisecond)
		if _, err := lab.Node(2).ListenPacket("udp", ":9"); err != nil { // left open on purpose
			t.Fatal(err)
		}
		out, err := exec.Command(lab.nft, "list", "tables").CombinedOutput()
		if err != nil || strings.Contains(string(out), table) {
			t.Errorf("root namespace nft tables: %v\n%s", err, out)
		}
		out, err = exec.Command(ipTool(t), "-o", "link", "show").CombinedOutput()
		if err != nil || strings.Contains(string(out), prefix) {
			t.Errorf("root namespace links: %v\n%s", err, out)
		}
		out, err = lab.Node(0).Command(context.Background(), lab.nft, "list", "table", "netdev", table).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "partition_from_1") {
			t.Errorf("node 0 has no fault table: %v\n%s", err, out)
		}

		shell = lab.Node(1).Command(context.Background(), "sh", "-c", "sleep 60 & echo $!; wait")
		line, _ := startFind(t, shell, "")
		if child, err = strconv.Atoi(line); err != nil {
			t.Fatalf("child pid %q: %v", line, err)
		}
		inNetns(t, child, lab.Node(1).Name())
	})
	if prefix == "" || shell == nil {
		t.Fatal("the lab was not built")
	}
	exited := make(chan error, 1)
	go func() { exited <- shell.Wait() }()
	select {
	case err := <-exited:
		t.Logf("command left in a node: %v", err)
	case <-time.After(5 * time.Second):
		shell.Process.Kill()
		t.Error("teardown did not kill the command left in a node")
	}
	if !gone(child) {
		syscall.Kill(child, syscall.SIGKILL)
		t.Errorf("teardown did not kill pid %d, a child left in a node", child)
	}
	if left := ours(t, prefix); len(left) > 0 {
		t.Errorf("left after teardown: %v", left)
	}
}

// TestHelperKilledLab is run by TestSweepKilledRun as a child process that
// builds a lab, starts a process in it and waits to be killed.
func TestHelperKilledLab(t *testing.T) {
	if os.Getenv("NETLAB_HELPER") != "killed-lab" {
		t.Skip("a helper process of TestSweepKilledRun")
	}
	lab := New(t, 2, Options{})
	lab.Partition(0, 1)
	if err := lab.Node(1).Command(context.Background(), "sleep", "60").Start(); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("NETLAB_PREFIX=%s\n", lab.Prefix())
	time.Sleep(30 * time.Second)
}

// TestSweepKilledRun kills -9 a test process that has a lab, so its cleanup
// never runs, and sweeps as a later process would: the lab and the process
// left in it are gone.
func TestSweepKilledRun(t *testing.T) {
	live := New(t, 1, Options{}) // for the preflight and ip's path
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperKilledLab$", "-test.v")
	cmd.Env = append(os.Environ(), "NETLAB_HELPER=killed-lab")
	prefix, rest := startFind(t, cmd, "NETLAB_PREFIX=")
	exited := make(chan struct{})
	go func() { io.Copy(io.Discard, rest); cmd.Wait(); close(exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	left := ours(t, prefix)
	var sleeper unix.Stat_t
	if err := unix.Stat(filepath.Join(netnsDir, prefix+"-1"), &sleeper); err != nil {
		t.Fatal(err)
	}
	if len(procsIn(sleeper)) != 1 {
		t.Fatalf("the helper's lab has processes %v in node 1", procsIn(sleeper))
	}
	cmd.Process.Kill()
	<-exited
	if got := ours(t, prefix); len(got) != len(left) {
		t.Fatalf("the killed helper left %v, then %v", left, got)
	}

	sweep(t.Logf, live.ipPath, time.Now())
	if left := ours(t, prefix); len(left) > 0 {
		t.Errorf("left after the sweep: %v", left)
	}
	if procs := procsIn(sleeper); len(procs) > 0 {
		t.Errorf("processes left in the swept namespace: %v", procs)
	}
}

// TestSweepStale fakes the leftovers of a killed run (a lock nobody holds,
// two namespaces, a process in one) and sweeps: they go, a live lab stays.
func TestSweepStale(t *testing.T) {
	live := New(t, 2, Options{})
	var prefix string
	for try := 0; prefix == "" || len(ours(t, prefix)) > 0; try++ {
		if try == 64 {
			t.Fatal("no free prefix in 64 tries")
		}
		var b [2]byte
		rand.Read(b[:])
		prefix = fmt.Sprintf("%s%02x%02x", namePrefix, b[0], b[1])
	}
	if err := os.WriteFile(lockPath(prefix), []byte("pid 1 (fake)\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := runIP(live.ipPath, "", false, "netns add "+prefix+"-sw", "netns add "+prefix+"-0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		runIP(live.ipPath, "", true, "netns del "+prefix+"-sw", "netns del "+prefix+"-0")
		os.Remove(lockPath(prefix))
	})
	sleeper := exec.Command(live.ipPath, "netns", "exec", prefix+"-0", "sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { sleeper.Wait(); close(exited) }()
	t.Cleanup(func() { sleeper.Process.Kill(); <-exited })
	inNetns(t, sleeper.Process.Pid, prefix+"-0")

	// Everything made so far counts as older than "this process".
	sweep(t.Logf, live.ipPath, time.Now().Add(time.Second))

	if left := ours(t, prefix); len(left) > 0 {
		t.Errorf("left after the sweep: %v", left)
	}
	select {
	case <-exited:
	case <-time.After(3 * time.Second):
		t.Error("the sweep did not kill the process in the stale namespace")
	}
	if len(ours(t, live.Prefix())) == 0 || !reach(t, live.Node(0), live.Node(1)) {
		t.Errorf("the sweep broke a live lab %s", live.Prefix())
	}
}
