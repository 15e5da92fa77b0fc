package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/e2e/checker"
	"github.com/blockd/blockd/nbd"
)

// Cluster tests: daemons in network namespaces joined through a real etcd
// (serve --cluster), a volume whose frontend fails over from node to node.

// leaseTTL is the nodes' lease in the failover tests: a takeover takes
// about this long.
const leaseTTL = 5 * time.Second

var clusterFlags = append([]string{"--lease-ttl", leaseTTL.String()}, replFlags...)

// startCluster starts n daemons and an etcd, and creates volume v with
// repl copies through the second node's API (any node can).
func startCluster(t *testing.T, n, repl int, flags ...string) *testCluster {
	t.Helper()
	c := newEtcdCluster(t, n, append(clusterFlags, flags...)...)
	c.startAll()
	if _, err := c.nodes[min(1, n-1)].api().CreateVolume(api.Spec{Name: "v", Size: replVolSize, Repl: repl, Profile: "none"}); err != nil {
		t.Fatal(err)
	}
	return c
}

// failoverDial dials the volume on the node target points at, and records
// when a node other than first first accepted.
type failoverDial struct {
	vol    string
	first  *clusterNode
	target atomic.Pointer[clusterNode]
	took   atomic.Int64 // unix ns of the first connection to another node
}

func newFailoverDial(first *clusterNode, vol string) *failoverDial {
	f := &failoverDial{vol: vol, first: first}
	f.target.Store(first)
	return f
}

func (f *failoverDial) dial(ctx context.Context) (*nbd.Client, error) {
	n := f.target.Load()
	c, err := n.dial(ctx, f.vol)
	if err == nil && n != f.first {
		f.took.CompareAndSwap(0, time.Now().UnixNano())
	}
	return c, err
}

// waitTook waits until another node accepted, and returns when.
func (f *failoverDial) waitTook(t *testing.T, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for f.took.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no other node took %s within %s", f.vol, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Unix(0, f.took.Load())
}

// takeOver dials vol on n until n takes it (bounded), and returns the
// connection and how long it took.
func takeOver(t *testing.T, n *clusterNode, vol string, within time.Duration) (*nbd.Client, time.Duration) {
	t.Helper()
	start := time.Now()
	var last error
	for time.Since(start) < within {
		c, err := n.dial(context.Background(), vol)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c, time.Since(start)
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not take %s within %s: %v", n.name, vol, within, last)
	return nil, 0
}

// withMetrics makes n serve /metrics on its lab address.
func (n *clusterNode) withMetrics() { n.args = append(n.args, "--metrics-listen", n.ip()+":9810") }

// metric returns the value of the sample whose line starts with series
// in n's /metrics ("" if there is none).
func (n *clusterNode) metric(series string) string {
	n.c.t.Helper()
	node := n.c.lab.Node(n.i)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return node.DialContext(ctx, network, addr)
	}}}
	resp, err := hc.Get("http://" + n.ip() + ":9810/metrics")
	if err != nil {
		n.c.t.Fatalf("%s: metrics: %v", n.name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return v
		}
	}
	return ""
}

// placement is the cluster's view of vol, through node n.
func (n *clusterNode) placement(vol string) *api.Placement {
	n.c.t.Helper()
	v := n.volume(vol)
	if v.Placement == nil {
		n.c.t.Fatalf("%s: volume %s has no placement: %+v", n.name, vol, v)
	}
	return v.Placement
}

// The owner is killed with -9 under the checker; the checker's client
// moves to another node, which takes the volume over once the dead
// owner's lease expires (not before), from its in-sync copy: every
// acknowledged write is there. The old owner returns as a replica and is
// resynced; the copies are identical.
func TestClusterOwnerKill9(t *testing.T) {
	c := newEtcdCluster(t, 3, clusterFlags...)
	a, b, third := c.nodes[0], c.nodes[1], c.nodes[2]
	b.withMetrics()
	c.startAll()
	if _, err := b.api().CreateVolume(api.Spec{Name: "v", Size: replVolSize, Repl: 3, Profile: "none"}); err != nil {
		t.Fatal(err)
	}
	ck := checker.New(0, 2048, 4)
	fd := newFailoverDial(a, "v")
	ctx, cancel := context.WithCancel(context.Background())
	done := runChecker(ctx, ck, fd.dial)
	waitFlushes(t, ck, 8)
	if p := b.placement("v"); p.Owner != a.name {
		t.Fatalf("before the kill the owner is %q, want %s", p.Owner, a.name)
	}
	killed := time.Now()
	fd.target.Store(b)
	a.kill9()
	took := fd.waitTook(t, 6*leaseTTL).Sub(killed)
	flushed := ck.Flushes.Load()
	waitFlushes(t, ck, flushed+8) // writes go on at b
	cancel()
	<-done
	t.Logf("take-over after kill -9 of the owner: %s (lease TTL %s)", took.Round(time.Millisecond), leaseTTL)
	if took < leaseTTL*8/10 {
		t.Fatalf("%s took the volume %s after the owner died, before its %s lease could expire", b.name, took, leaseTTL)
	}
	verifyChecker(t, ck, b, "v")
	b.waitState("v", third.name, api.ReplicaInSync, 60*time.Second)
	p := b.placement("v")
	f := p.LastFailover
	if p.Owner != b.name || f == nil || f.From != a.name || f.To != b.name || f.Clean || f.Epoch != p.Epoch || time.Duration(f.Waited) <= 0 {
		t.Fatalf("after the take-over: owner %q, last failover %+v", p.Owner, f)
	}
	if v := b.metric(`blockd_cluster_owner_changes_total{kind="failover",volume="v"}`); v != "1" {
		t.Fatalf("%s counts %q fail-overs of v, want 1", b.name, v)
	}
	a.start()
	b.waitInSync("v", 60*time.Second)
	if r := a.volume("v").Replication; r == nil || r.Role != api.RoleReplica || r.Owner != b.name {
		t.Fatalf("the old owner after its return: %+v", r)
	}
	b.verify("v")
	verifyChecker(t, ck, b, "v")
}

// The owner is cut off from etcd and the other nodes while a client
// writes to it: it stops acknowledging writes before its lease can
// expire at etcd; another node takes over once it has; the old owner's
// writes are refused (fenced) and, healed, it resyncs as a replica.
func TestClusterOwnerPartitioned(t *testing.T) {
	c := startCluster(t, 3, 3)
	a, b := c.nodes[0], c.nodes[1]
	cl := a.mustDial("v")
	block := bytes.Repeat([]byte{0x5a}, 4096)
	var lastAck atomic.Int64
	var acks, fails atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { // writes to a until the test ends or a fails them
		for i := int64(0); ctx.Err() == nil; i++ {
			if _, err := cl.WriteAt(block, (i%1024)*4096); err != nil {
				fails.Add(1)
				return
			}
			lastAck.Store(time.Now().UnixNano())
			acks.Add(1)
		}
	})
	time.Sleep(500 * time.Millisecond)
	isolated := time.Now()
	c.lab.Isolate(a.i)
	nb, took := takeOver(t, b, "v", 6*leaseTTL)
	tookAt := time.Now()
	t.Logf("take-over of a partitioned owner: %s after the partition; its last acknowledged write %s after it",
		tookAt.Sub(isolated).Round(time.Millisecond), (time.Duration(lastAck.Load()) - time.Duration(isolated.UnixNano())).Round(time.Millisecond))
	_ = took
	if last := time.Unix(0, lastAck.Load()); !last.Before(isolated.Add(leaseTTL)) || !last.Before(tookAt) {
		t.Fatalf("the partitioned owner acknowledged a write at +%s, its lease (%s) could have expired and another node took over at +%s",
			last.Sub(isolated), leaseTTL, tookAt.Sub(isolated))
	}
	fresh := bytes.Repeat([]byte{0x77}, 4096)
	if _, err := nb.WriteAt(fresh, 0); err != nil {
		t.Fatal(err)
	}
	if err := nb.Flush(); err != nil {
		t.Fatal(err)
	}
	c.lab.Rejoin(a.i)
	cancel()
	cl.Close()
	wg.Wait()
	b.waitInSync("v", 60*time.Second)
	b.verify("v")
	if r := a.volume("v").Replication; r == nil || r.Role != api.RoleReplica {
		t.Fatalf("the healed old owner: %+v", r)
	}
	got := make([]byte, 4096)
	if _, err := nb.ReadAt(got, 0); err != nil || !bytes.Equal(got, fresh) {
		t.Fatalf("block 0 after the old owner healed: %x..., %v", got[:4], err)
	}
	t.Logf("the partitioned owner acknowledged %d writes, then failed %d", acks.Load(), fails.Load())
}

// etcd is cut off from every node for 20s: the volume keeps serving I/O
// that needs no membership change; a replica that dies during the outage
// blocks writes (dropping it needs the in-sync set persisted first), and
// they complete when etcd returns. No acknowledged write is lost.
func TestClusterEtcdOutage(t *testing.T) {
	// Replicas get 3s to answer: on a loaded machine a shorter timeout
	// drops a slow replica, a membership change that waits for etcd.
	c := startCluster(t, 3, 3, "--lease-ttl", "30s", "--repl-timeout", "3s", "--repl-last-timeout", "6s")
	a, third := c.nodes[0], c.nodes[2]
	ck := checker.New(0, 2048, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := runChecker(ctx, ck, ownerDial(a, "v"))
	waitFlushes(t, ck, 8)
	outage := time.Now()
	c.lab.Isolate(etcdLabNode)
	time.Sleep(2 * time.Second)
	before := ck.Acks.Load()
	time.Sleep(4 * time.Second)
	if ck.Acks.Load() == before || ck.Errors.Load() != 0 {
		t.Fatalf("with etcd cut off, the volume stopped serving: acks %d -> %d, errors %d (%v)", before, ck.Acks.Load(), ck.Errors.Load(), ck.FirstError())
	}
	third.kill9()
	time.Sleep(4 * time.Second) // the replica's timeout passes: its drop waits for etcd
	stalled := ck.Acks.Load()
	time.Sleep(4 * time.Second)
	if n := ck.Acks.Load() - stalled; n != 0 {
		t.Fatalf("%d writes were acknowledged while a replica was gone and etcd could not record it", n)
	}
	if left := 20*time.Second - time.Since(outage); left > 0 {
		time.Sleep(left)
	}
	c.lab.Rejoin(etcdLabNode)
	rejoined := time.Now()
	deadline := time.Now().Add(30 * time.Second)
	for ck.Acks.Load() == stalled {
		if time.Now().After(deadline) {
			t.Fatalf("writes did not resume within 30s of etcd's return")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("etcd outage of %s; writes resumed %s after etcd returned", rejoined.Sub(outage).Round(time.Millisecond), time.Since(rejoined).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	cancel()
	<-done
	if ck.Errors.Load() != 0 {
		t.Fatalf("%d writes failed (first: %v)", ck.Errors.Load(), ck.FirstError())
	}
	if p := a.placement("v"); p.Owner != a.name || strings.Contains(strings.Join(p.InSync, ","), third.name) {
		t.Fatalf("after the outage: %+v; want %s still owner, %s out of the in-sync set", p, a.name, third.name)
	}
	verifyChecker(t, ck, a, "v")
	third.start()
	a.waitInSync("v", 60*time.Second)
	a.verify("v")
}

// The owner is stopped (SIGSTOP) for longer than its lease with a write
// queued; another node takes the volume over and writes; the old owner
// resumes: its write fails, and none of it lands anywhere.
func TestClusterPausedOwner(t *testing.T) {
	c := startCluster(t, 3, 3)
	a, b := c.nodes[0], c.nodes[1]
	old := a.mustDial("v")
	orig := bytes.Repeat([]byte{0x11}, 4096)
	if _, err := old.WriteAt(orig, 0); err != nil {
		t.Fatal(err)
	}
	if err := old.Flush(); err != nil {
		t.Fatal(err)
	}
	a.signal(syscall.SIGSTOP)
	stale := bytes.Repeat([]byte{0xee}, 4096)
	res := make(chan error, 1)
	go func() { _, err := old.WriteAt(stale, 0); res <- err }() // waits in a's socket
	nb, took := takeOver(t, b, "v", 6*leaseTTL)
	t.Logf("take-over of a stopped owner: %s", took.Round(time.Millisecond))
	fresh := bytes.Repeat([]byte{0x22}, 4096)
	if _, err := nb.WriteAt(fresh, 4096); err != nil {
		t.Fatal(err)
	}
	if err := nb.Flush(); err != nil {
		t.Fatal(err)
	}
	a.signal(syscall.SIGCONT)
	select {
	case err := <-res:
		if err == nil {
			t.Fatal("the stopped owner acknowledged a write after another node took over")
		}
		t.Logf("the old owner's write after SIGCONT: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the old owner's write neither completed nor failed within 30s")
	}
	b.waitInSync("v", 60*time.Second)
	got := make([]byte, 4096)
	if _, err := nb.ReadAt(got, 0); err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("block 0 on the new owner: %x..., %v; the stopped owner's write must not land", got[:4], err)
	}
	b.verify("v") // and on no replica either
}

// A replica gone for longer than --replica-replace-after is replaced by a
// new copy on the third node, built by a full resync: the volume is back
// to its repl. The old copy is removed when its node returns.
func TestClusterReplicaReplaced(t *testing.T) {
	c := newEtcdCluster(t, 3, append(clusterFlags, "--replica-replace-after", "3s")...)
	a, b, third := c.nodes[0], c.nodes[1], c.nodes[2]
	a.withMetrics()
	c.startAll()
	if _, err := a.api().CreateVolume(api.Spec{Name: "v", Size: replVolSize, Repl: 2, Nodes: []string{a.name, b.name}, Profile: "none"}); err != nil {
		t.Fatal(err)
	}
	ck := checker.New(0, 2048, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := runChecker(ctx, ck, ownerDial(a, "v"))
	waitFlushes(t, ck, 8)
	b.kill9()
	gone := time.Now()
	deadline := time.Now().Add(60 * time.Second)
	for {
		p := a.placement("v")
		if strings.Join(p.Nodes, ",") == a.name+","+third.name && len(p.InSync) == 2 {
			t.Logf("replaced and in sync %s after the replica died (replace-after 3s): %+v", time.Since(gone).Round(time.Millisecond), p)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no replacement in sync within 60s: %+v", p)
		}
		time.Sleep(100 * time.Millisecond)
	}
	cancel()
	<-done
	if ck.Errors.Load() != 0 {
		t.Fatalf("%d writes failed (first: %v)", ck.Errors.Load(), ck.FirstError())
	}
	a.waitInSync("v", 30*time.Second)
	a.verify("v")
	verifyChecker(t, ck, a, "v")
	if v := a.metric(`blockd_cluster_replicas_replaced_total{volume="v"}`); v != "1" {
		t.Fatalf("%s counts %q replaced replicas of v, want 1", a.name, v)
	}
	b.start()
	deadline = time.Now().Add(30 * time.Second)
	for logCount(b, "removed this node's copy") == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the replaced node kept its copy:\n%s", b.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := b.api().Verify("v"); err == nil {
		t.Fatal("the replaced node still serves the volume")
	}
}

// Nodes race to own a free volume: exactly one wins; the others are
// refused with the winner's name.
func TestClusterRaceToOwn(t *testing.T) {
	c := newEtcdCluster(t, 3, clusterFlags...)
	c.startAll()
	for i := range 4 {
		vol := fmt.Sprintf("race%d", i)
		if _, err := c.nodes[i%3].api().CreateVolume(api.Spec{Name: vol, Size: 16 << 20, Repl: 3, Profile: "none"}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make([]error, 3)
		for j, n := range c.nodes {
			wg.Go(func() {
				cl, err := n.dial(context.Background(), vol)
				if err == nil {
					cl.Close()
				}
				errs[j] = err
			})
		}
		wg.Wait()
		var winners []string
		for j, err := range errs {
			if err == nil {
				winners = append(winners, c.nodes[j].name)
			}
		}
		if len(winners) != 1 {
			t.Fatalf("%s: %d nodes took it (%v): %v", vol, len(winners), winners, errs)
		}
		for j, err := range errs {
			if err != nil && !strings.Contains(err.Error(), "owned by node "+winners[0]) {
				t.Fatalf("%s: %s's refusal does not name the owner %s: %v", vol, c.nodes[j].name, winners[0], err)
			}
		}
		if p := c.nodes[(i+1)%3].placement(vol); p.Owner != winners[0] {
			t.Fatalf("%s: the store says %q owns it, the race says %s", vol, p.Owner, winners[0])
		}
	}
}

// What an operator sees: three ready nodes with their zones; a repl-3
// volume on all three; a clean move hands it over without comparing.
func TestClusterNodesAndMove(t *testing.T) {
	c := startCluster(t, 3, 3)
	a, b, third := c.nodes[0], c.nodes[1], c.nodes[2]
	ns, err := b.api().Nodes()
	if err != nil || len(ns) != 3 {
		t.Fatalf("nodes: %+v %v", ns, err)
	}
	for _, n := range ns {
		if n.State != api.NodeReady || n.Labels["zone"] == "" || n.Volumes != 1 || n.Free <= 0 {
			t.Fatalf("node %+v", n)
		}
	}
	if p := a.placement("v"); len(p.Nodes) != 3 || len(p.InSync) != 3 || p.Owner != "" {
		t.Fatalf("new volume: %+v", p)
	}
	cl := a.mustDial("v")
	data := bytes.Repeat([]byte{0x42}, 64<<10)
	if _, err := cl.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	cl.Flush()
	v, err := b.api().Move("v", third.name)
	if err != nil || v.Placement == nil || v.Placement.Owner != third.name {
		t.Fatalf("move: %+v %v", v.Placement, err)
	}
	if f := v.Placement.LastFailover; f == nil || !f.Clean || f.From != a.name || f.By != "move" {
		t.Fatalf("after the move: %+v", f)
	}
	if _, err := cl.ReadAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("the old owner's client still works after the move")
	}
	nc := third.mustDial("v")
	got := make([]byte, len(data))
	if _, err := nc.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after the move: %v", err)
	}
	for _, st := range third.volume("v").Replicas {
		if st.State != api.ReplicaInSync || st.ComparedBytes != 0 {
			t.Fatalf("after a clean move: %+v (nothing to compare)", st)
		}
	}
	if _, err := a.dial(context.Background(), "v"); err == nil || !strings.Contains(err.Error(), "owned by node "+third.name) {
		t.Fatalf("dial on the old owner after the move: %v", err)
	}
	third.verify("v")
}

// A node without a copy is refused with where the copies are; deleting a
// volume on any node removes every copy, a down node's when it returns.
func TestClusterDelete(t *testing.T) {
	c := newEtcdCluster(t, 3, clusterFlags...)
	c.startAll()
	a, b, third := c.nodes[0], c.nodes[1], c.nodes[2]
	if _, err := third.api().CreateVolume(api.Spec{Name: "v", Size: 16 << 20, Repl: 2, Nodes: []string{a.name, b.name}}); err != nil {
		t.Fatal(err)
	}
	if _, err := third.dial(context.Background(), "v"); err == nil || !strings.Contains(err.Error(), "no copy on node "+third.name) {
		t.Fatalf("dial on a node without a copy: %v", err)
	}
	a.mustDial("v").Close()
	b.kill9()
	if err := third.api().DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.api().GetVolume("v"); !api.IsCode(err, api.CodeNotFound) {
		t.Fatalf("get after the delete: %v", err)
	}
	for _, n := range []*clusterNode{a, b} {
		if n == b {
			b.start()
		}
		deadline := time.Now().Add(20 * time.Second)
		for logCount(n, "removed this node's copy") == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%s kept its copy of the deleted volume:\n%s", n.name, n.log)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if _, err := os.Stat(filepath.Join(n.dir, "volumes", "v.json")); !os.IsNotExist(err) {
			t.Fatalf("%s: metadata of the deleted volume: %v", n.name, err)
		}
	}
	if _, err := a.api().CreateVolume(api.Spec{Name: "v", Size: 16 << 20, Repl: 3}); err != nil {
		t.Fatalf("a new volume of the same name: %v", err)
	}
}
