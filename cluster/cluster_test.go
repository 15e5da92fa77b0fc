package cluster_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cluster"
	"github.com/blockd/blockd/cluster/etcdtest"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

type node struct {
	st   *cluster.Store
	ss   *cluster.Session
	dir  string
	lost chan int64
}

func join(t *testing.T, url, name, dir string, ttl time.Duration) *node {
	t.Helper()
	st, err := cluster.Open(context.Background(), cluster.Config{Endpoints: []string{url}, Node: name, Dir: dir, LeaseTTL: ttl, Log: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	n := &node{st: st, dir: dir, lost: make(chan int64, 4)}
	n.ss, err = st.StartSession(context.Background(), func() cluster.NodeInfo {
		return cluster.NodeInfo{Addr: name + ":10810", Labels: map[string]string{"zone": "z-" + name}}
	}, func(l int64) { n.lost <- l })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.close(false) })
	return n
}

func (n *node) close(revoke bool) {
	if n.ss != nil {
		n.ss.Close(revoke)
		n.ss = nil
	}
	if n.st != nil {
		n.st.Close()
		n.st = nil
	}
}

func rawClient(t *testing.T, url string) *clientv3.Client {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func newVolume(name string, nodes ...string) cluster.Volume {
	return cluster.Volume{Spec: api.Spec{Name: name, Size: 1 << 20, Repl: len(nodes)}, Nodes: nodes}
}

var accept = func(cluster.VolumeInfo) error { return nil }

func claim(node string) func(cluster.VolumeInfo) cluster.State {
	return func(vi cluster.VolumeInfo) cluster.State {
		st := vi.State
		st.Owner, st.Clean = node, false
		return st
	}
}

// A node keeps to the cluster it joined: a store that lost its data, or
// that holds another cluster, is refused instead of taken as empty (which
// would delete the node's volumes as unknown).
func TestJoinKeepsItsCluster(t *testing.T) {
	etcd := etcdtest.Start(t)
	dir := t.TempDir()
	a := join(t, etcd.URL, "a", dir, 5*time.Second)
	id := a.st.ID()
	a.close(true)

	again := join(t, etcd.URL, "a", dir, 5*time.Second)
	if again.st.ID() != id {
		t.Fatalf("rejoined cluster %s, want %s", again.st.ID(), id)
	}
	again.close(true)

	cli := rawClient(t, etcd.URL)
	if _, err := cli.Delete(context.Background(), "/blockd/cluster"); err != nil {
		t.Fatal(err)
	}
	_, err := cluster.Open(context.Background(), cluster.Config{Endpoints: []string{etcd.URL}, Node: "a", Dir: dir, Log: quiet()})
	if err == nil || !strings.Contains(err.Error(), "holds no cluster") {
		t.Fatalf("joining a store that lost the cluster: %v", err)
	}
	if _, err := cli.Put(context.Background(), "/blockd/cluster", "another"); err != nil {
		t.Fatal(err)
	}
	_, err = cluster.Open(context.Background(), cluster.Config{Endpoints: []string{etcd.URL}, Node: "a", Dir: dir, Log: quiet()})
	if err == nil || !strings.Contains(err.Error(), "holds cluster another") {
		t.Fatalf("joining another cluster: %v", err)
	}
	_, err = cluster.Open(context.Background(), cluster.Config{Endpoints: []string{etcd.URL}, Node: "b", Dir: dir, Log: quiet()})
	if err == nil || !strings.Contains(err.Error(), "belongs to node a") {
		t.Fatalf("another node name on the state dir: %v", err)
	}
}

// A restarted daemon keeps its lease (and so what it owned) if etcd still
// holds it; a revoked one is replaced.
func TestSessionAdoptsItsLease(t *testing.T) {
	etcd := etcdtest.Start(t)
	dir := t.TempDir()
	a := join(t, etcd.URL, "a", dir, 5*time.Second)
	if err := a.st.CreateVolume(context.Background(), newVolume("v", "a")); err != nil {
		t.Fatal(err)
	}
	o, _, err := a.st.Acquire(context.Background(), a.ss, "v", accept, claim("a"))
	if err != nil {
		t.Fatal(err)
	}
	lease := a.ss.Lease()
	a.close(false) // a crash: the lease stays until it expires

	b := join(t, etcd.URL, "a", dir, 5*time.Second)
	if b.ss.Lease() != lease {
		t.Fatalf("restart took lease %x, want the old %x", b.ss.Lease(), lease)
	}
	o2, _, err := b.st.Acquire(context.Background(), b.ss, "v", accept, claim("a"))
	if err != nil || o2.Epoch != o.Epoch || !o2.Valid() {
		t.Fatalf("after the restart: %+v %v, want the same ownership at epoch %d", o2, err, o.Epoch)
	}
	b.close(true)
	c := join(t, etcd.URL, "a", dir, 5*time.Second)
	if c.ss.Lease() == lease {
		t.Fatal("a revoked lease was adopted")
	}
	vi, err := c.st.Get(context.Background(), "v")
	if err != nil || vi.Owner != "" {
		t.Fatalf("after the revoke the volume is owned by %q (%v)", vi.Owner, err)
	}
}

// Two nodes race to own a free volume: exactly one wins, the other is told
// who owns it.
func TestAcquireRace(t *testing.T) {
	etcd := etcdtest.Start(t)
	a := join(t, etcd.URL, "a", t.TempDir(), 5*time.Second)
	b := join(t, etcd.URL, "b", t.TempDir(), 5*time.Second)
	for i := range 10 {
		name := "race" + string(rune('0'+i))
		if err := a.st.CreateVolume(context.Background(), newVolume(name, "a", "b")); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var oa, ob *cluster.Ownership
		var ea, eb error
		wg.Go(func() { oa, _, ea = a.st.Acquire(context.Background(), a.ss, name, accept, claim("a")) })
		wg.Go(func() { ob, _, eb = b.st.Acquire(context.Background(), b.ss, name, accept, claim("b")) })
		wg.Wait()
		if (ea == nil) == (eb == nil) {
			t.Fatalf("%s: a: %v, b: %v; want exactly one owner", name, ea, eb)
		}
		win, lose, loser := oa, eb, "b"
		if ea != nil {
			win, lose, loser = ob, ea, "a"
		}
		var oe *cluster.OwnedError
		if !errors.As(lose, &oe) || api.CodeOf(lose) != api.CodeConflict || oe.Owner == loser {
			t.Fatalf("%s: the loser's error: %v", name, lose)
		}
		vi, err := a.st.Get(context.Background(), name)
		if err != nil || vi.Owner == loser || vi.Epoch != win.Epoch || vi.State.Owner != vi.Owner {
			t.Fatalf("%s: store says %+v (%v), winner epoch %d", name, vi, err, win.Epoch)
		}
	}
}

// The owner's lease runs out at the owner before etcd frees the volume: a
// node cut off stops serving before another can take over, and the new
// owner's epoch is higher. The old owner can no longer change the state.
func TestLeaseExpiryHandsOver(t *testing.T) {
	etcd := etcdtest.Start(t)
	ttl := 2 * time.Second
	a := join(t, etcd.URL, "a", t.TempDir(), ttl)
	b := join(t, etcd.URL, "b", t.TempDir(), ttl)
	if err := a.st.CreateVolume(context.Background(), newVolume("v", "a", "b")); err != nil {
		t.Fatal(err)
	}
	oa, _, err := a.st.Acquire(context.Background(), a.ss, "v", accept, claim("a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.st.Acquire(context.Background(), b.ss, "v", accept, claim("b")); api.CodeOf(err) != api.CodeConflict {
		t.Fatalf("b took a volume a owns: %v", err)
	}
	a.ss.Close(false) // a is cut off: no more renewals
	a.ss = nil
	var invalidAt time.Time
	var ob *cluster.Ownership
	deadline := time.Now().Add(4 * ttl)
	for ob == nil && time.Now().Before(deadline) {
		if invalidAt.IsZero() && !oa.Valid() {
			invalidAt = time.Now()
		}
		o, _, err := b.st.Acquire(context.Background(), b.ss, "v", accept, claim("b"))
		if err == nil {
			ob = o
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ob == nil {
		t.Fatal("b never took the volume over")
	}
	took := time.Now()
	if invalidAt.IsZero() || !invalidAt.Before(took) {
		t.Fatalf("a's lease counted valid until %v; b took over at %v", invalidAt, took)
	}
	t.Logf("a stopped counting its lease valid %s before b took over", took.Sub(invalidAt).Round(time.Millisecond))
	if ob.Epoch <= oa.Epoch {
		t.Fatalf("new epoch %d, old %d", ob.Epoch, oa.Epoch)
	}
	if err := a.st.SaveState(context.Background(), oa, cluster.State{Generation: 9}); !errors.Is(err, cluster.ErrNotOwner) {
		t.Fatalf("the old owner saved state: %v", err)
	}
	if err := b.st.SaveState(context.Background(), ob, cluster.State{Owner: "b", Generation: 3, InSync: []string{"b"}}); err != nil {
		t.Fatal(err)
	}
	vi, _ := b.st.Get(context.Background(), "v")
	if vi.State.Generation != 3 || vi.Owner != "b" {
		t.Fatalf("state %+v", vi)
	}
}

// A lease etcd expired (here: revoked behind the node's back) is lost for
// good with every ownership under it; the session takes a new one and
// re-registers the node.
func TestSessionLosesLease(t *testing.T) {
	etcd := etcdtest.Start(t)
	a := join(t, etcd.URL, "a", t.TempDir(), 2*time.Second)
	if err := a.st.CreateVolume(context.Background(), newVolume("v", "a")); err != nil {
		t.Fatal(err)
	}
	o, _, err := a.st.Acquire(context.Background(), a.ss, "v", accept, claim("a"))
	if err != nil {
		t.Fatal(err)
	}
	old := a.ss.Lease()
	if _, err := rawClient(t, etcd.URL).Revoke(context.Background(), clientv3.LeaseID(old)); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-a.lost:
		if l != old {
			t.Fatalf("lost lease %x, want %x", l, old)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the session did not notice its lease was gone")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := o.Wait(ctx); !errors.Is(err, cluster.ErrNotOwner) || !o.Lost() {
		t.Fatalf("ownership under the lost lease: Wait %v, lost %v", err, o.Lost())
	}
	if a.ss.Lease() == old || a.ss.Lease() == 0 {
		t.Fatal("no new lease")
	}
	_, alive, err := a.st.Nodes(context.Background())
	if err != nil || alive["a"].Addr != "a:10810" {
		t.Fatalf("node not registered again: %+v %v", alive, err)
	}
	if _, _, err := a.st.Acquire(context.Background(), a.ss, "v", accept, claim("a")); err != nil {
		t.Fatalf("taking the volume again under the new lease: %v", err)
	}
}

// Deleting a volume goes through check (an attached volume is refused);
// creating one of an existing name is refused.
func TestCreateDelete(t *testing.T) {
	etcd := etcdtest.Start(t)
	a := join(t, etcd.URL, "a", t.TempDir(), 5*time.Second)
	ctx := context.Background()
	if err := a.st.CreateVolume(ctx, newVolume("v", "a")); err != nil {
		t.Fatal(err)
	}
	if err := a.st.CreateVolume(ctx, newVolume("v", "a")); api.CodeOf(err) != api.CodeExists {
		t.Fatalf("second create: %v", err)
	}
	vi, err := a.st.Get(ctx, "v")
	if err != nil || vi.State.Generation != 1 || !vi.InSync("a") || !vi.State.Clean {
		t.Fatalf("new volume: %+v %v", vi, err)
	}
	if err := a.st.SetCopy(ctx, "v", "ok"); err != nil {
		t.Fatal(err)
	}
	refuse := errors.New("attached")
	if err := a.st.DeleteVolume(ctx, "v", func(cluster.VolumeInfo) error { return refuse }); err != refuse {
		t.Fatalf("delete with a refusing check: %v", err)
	}
	vis, _, err := a.st.List(ctx)
	if err != nil || len(vis) != 1 || len(vis[0].Copies) != 1 || vis[0].Copies["a"] != "ok" {
		t.Fatalf("list: %+v %v", vis, err)
	}
	if err := a.st.DeleteVolume(ctx, "v", accept); err != nil {
		t.Fatal(err)
	}
	if _, err := a.st.Get(ctx, "v"); api.CodeOf(err) != api.CodeNotFound {
		t.Fatalf("get after delete: %v", err)
	}
}

// Watch signals every change of the cluster's keys.
func TestWatchSignals(t *testing.T) {
	etcd := etcdtest.Start(t)
	a := join(t, etcd.URL, "a", t.TempDir(), 5*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() { defer close(done); a.st.Watch(ctx, ch) }()
	defer func() { cancel(); <-done }()
	<-ch // the first signal
	time.Sleep(200 * time.Millisecond)
	select {
	case <-ch:
	default:
	}
	if err := a.st.CreateVolume(context.Background(), newVolume("w", "a")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("no signal for a new volume")
	}
}
