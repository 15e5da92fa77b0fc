package replication_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/replication"
)

// testLease is a lease the test renews and loses at will.
type testLease struct {
	valid, lost atomic.Bool
	mu          sync.Mutex
	changed     chan struct{}
}

func newTestLease() *testLease {
	l := &testLease{changed: make(chan struct{})}
	l.valid.Store(true)
	return l
}

func (l *testLease) Valid() bool { return l.valid.Load() && !l.lost.Load() }

func (l *testLease) Wait(ctx context.Context) error {
	for {
		l.mu.Lock()
		ch := l.changed
		l.mu.Unlock()
		switch {
		case l.lost.Load():
			return errors.New("lease lost")
		case l.valid.Load():
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (l *testLease) set(valid, lost bool) {
	l.valid.Store(valid)
	l.lost.Store(lost)
	l.mu.Lock()
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

// An owner whose lease runs out starts no request and acknowledges none:
// a write waits while the lease is being renewed and goes on once it is;
// once the lease is lost, the write fails, never reached a replica, and
// the volume is fenced for good.
func TestLeaseGatesRequests(t *testing.T) {
	c := newCluster(t, "b")
	c.lease = newTestLease()
	c.start(newVolumeState("b"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(4096, 1))

	c.lease.(*testLease).set(false, false)
	done := make(chan error, 1)
	go func() { done <- c.do(pipeline.OpWrite, 8192, pattern(4096, 2), 0) }()
	select {
	case err := <-done:
		t.Fatalf("a write completed while the lease was not valid: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if got := readCopy(t, c, "b", 8192, 4096); !isZero(got) {
		t.Fatal("a write reached the replica while the owner's lease was not valid")
	}
	c.lease.(*testLease).set(true, false)
	if err := <-done; err != nil {
		t.Fatalf("the write after the lease was renewed: %v", err)
	}
	c.same("b")

	c.lease.(*testLease).set(false, false)
	go func() { done <- c.do(pipeline.OpWrite, 16384, pattern(4096, 3), 0) }()
	time.Sleep(50 * time.Millisecond)
	c.lease.(*testLease).set(false, true)
	if err := <-done; !errors.Is(err, replication.ErrFenced) {
		t.Fatalf("write once the lease was lost: %v, want ErrFenced", err)
	}
	if got := readCopy(t, c, "b", 16384, 4096); !isZero(got) {
		t.Fatal("a write of an owner that lost its lease reached the replica")
	}
	select {
	case e := <-c.fenced:
		if e != 0 {
			t.Fatalf("fenced at epoch %d, want 0 (lease lost)", e)
		}
	case <-time.After(time.Second):
		t.Fatal("OnFenced was not called")
	}
	c.lease.(*testLease).set(true, false) // a fenced volume stays fenced
	if err := c.do(pipeline.OpRead, 0, make([]byte, 4096), 4096); !errors.Is(err, replication.ErrFenced) {
		t.Fatalf("read after the lease was lost: %v, want ErrFenced", err)
	}
}

// A new owner tells every in-sync replica its epoch before it serves:
// from then on they refuse the old owner's messages. A replica that does
// not answer leaves the in-sync set first.
func TestOpenSessionsRaiseEpoch(t *testing.T) {
	c := newCluster(t, "b", "c")
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(64<<10, 1))
	c.flush()
	c.rep.Close()

	// The same node takes the volume again at a new epoch (a cluster's
	// owner re-acquiring it), with c cut off.
	st := c.savedState()
	st.Epoch = 7
	c.net.SetDown("c", true)
	c.start(st, false)
	if err := c.rep.OpenSessions(); err != nil {
		t.Fatal(err)
	}
	if e := c.copies["b"].copies["v"].Replication().Epoch; e != 7 {
		t.Fatalf("b is at epoch %d after OpenSessions, want 7", e)
	}
	s := c.savedState()
	if !s.Replicas[0].InSync || s.Replicas[1].InSync || s.Generation != st.Generation+1 {
		t.Fatalf("after OpenSessions with c unreachable: %+v", s)
	}
	// The old epoch is refused at b.
	m := replication.Msg{Type: replication.MsgWrite, Volume: "v", Epoch: 1, Offset: 0, Length: 4096}
	var resp replication.Msg
	if _, err := c.net.From("a").Call(context.Background(), "b", time.Second, &m, make([]byte, 4096), &resp, nil); err != nil || resp.Status != replication.StatusStaleEpoch {
		t.Fatalf("a write at the old epoch: status %d, %v; want stale epoch", resp.Status, err)
	}
	c.write(4096, pattern(4096, 2))
	c.same("b")
}

// A replica gone for good is replaced by a new one on another node, built
// by a full resync; the replica set with the new node is persisted, and a
// replica in sync is never replaced.
func TestReplacePeer(t *testing.T) {
	c := newCluster(t, "b", "c")
	d := &memCopies{copies: map[string]*memCopy{}}
	c.copies["d"] = d
	c.net.Add("d", replication.NewService("d", d, quietLog()))
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(1<<20, 1))
	if err := c.rep.ReplacePeer("c", "d"); err == nil {
		t.Fatal("an in-sync replica was replaced")
	}
	c.net.SetDown("b", true)
	c.write(2<<20, pattern(1<<20, 2)) // b misses it
	c.waitState("b", api.ReplicaUnreachable, 5*time.Second)
	var down time.Time
	for _, st := range c.rep.Status() {
		if st.Node == "b" {
			down = st.DownSince
		}
	}
	if down.IsZero() || time.Since(down) > 5*time.Second {
		t.Fatalf("b's DownSince is %v", down)
	}
	if err := c.rep.ReplacePeer("b", "c"); err == nil {
		t.Fatal("a replica was replaced by a node that already holds one")
	}
	if err := c.rep.ReplacePeer("b", "d"); err != nil {
		t.Fatal(err)
	}
	s := c.savedState()
	if s.Replicas[0].Node != "d" || s.Replicas[0].InSync || !s.Replicas[0].Compare {
		t.Fatalf("saved state after the replacement: %+v", s)
	}
	c.write(3<<20, pattern(4096, 3)) // writes go on meanwhile
	c.waitState("d", api.ReplicaInSync, 10*time.Second)
	c.flush()
	c.same("d")
	c.same("c")
	if s := c.savedState(); s.Replicas[0].Node != "d" || !s.Replicas[0].InSync {
		t.Fatalf("saved state once d is in sync: %+v", s)
	}
	for _, st := range c.rep.Status() {
		if st.Node == "b" {
			t.Fatalf("b is still a replica: %+v", c.rep.Status())
		}
	}
}

func readCopy(t *testing.T, c *cluster, node string, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := c.copies[node].engine("v").ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}
