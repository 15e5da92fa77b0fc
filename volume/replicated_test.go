package volume

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/replication/repltest"
)

// node is one daemon's registry on an in-process network.
type node struct {
	name string
	reg  *Registry
	dir  string
}

func startNodes(t *testing.T, net *repltest.Net, names ...string) map[string]*node {
	t.Helper()
	return startNodesWith(t, net, Options{}, names...)
}

// startNodesWith starts nodes whose registries have opts (Dir, Log and
// Replication set per node).
func startNodesWith(t *testing.T, net *repltest.Net, opts Options, names ...string) map[string]*node {
	t.Helper()
	out := map[string]*node{}
	for _, n := range names {
		var peers []string
		for _, p := range names {
			if p != n {
				peers = append(peers, p)
			}
		}
		out[n] = openNodeWith(t, net, n, t.TempDir(), peers, opts)
	}
	return out
}

func openNode(t *testing.T, net *repltest.Net, name, dir string, peers []string) *node {
	t.Helper()
	return openNodeWith(t, net, name, dir, peers, Options{})
}

func openNodeWith(t *testing.T, net *repltest.Net, name, dir string, peers []string, opts Options) *node {
	t.Helper()
	rn := &replication.Node{Name: name, Net: net.From(name), PeerNames: peers, Timeout: 100 * time.Millisecond,
		LastTimeout: 200 * time.Millisecond, RetryInterval: 20 * time.Millisecond, Log: quietLog()}
	nd := &node{name: name, dir: dir}
	opts.Dir, opts.Log, opts.Replication = dir, quietLog(), rn
	reg, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	nd.reg = reg
	net.Add(name, replication.NewService(name, reg, quietLog()))
	t.Cleanup(func() { reg.Close() })
	return nd
}

func rw(t *testing.T, v *Volume, op pipeline.Op, off int64, data []byte) error {
	t.Helper()
	r := pipeline.Request{Op: op, Offset: off, Length: uint32(len(data)), Buf: data}
	return v.Handle(context.Background(), &r)
}

func readCopy(t *testing.T, v *Volume, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := v.engine.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// A repl-2 volume through two registries: the replica is made at create,
// writes land on both, the replica serves no frontend, delete removes
// both copies.
func TestReplicatedVolumeLifecycle(t *testing.T) {
	net := repltest.NewNet()
	ns := startNodes(t, net, "a", "b")
	a, b := ns["a"], ns["b"]
	s, err := a.reg.Create(api.Spec{Name: "v", Size: 4 << 20, Engine: "memory", Repl: 2})
	if err != nil {
		t.Fatal(err)
	}
	if s.Replication == nil || s.Replication.Role != api.RoleOwner || len(s.Replication.Replicas) != 1 || s.Replication.Replicas[0].Node != "b" {
		t.Fatalf("owner state: %+v", s.Replication)
	}
	v, err := a.reg.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("replicated"), 410)[:4096]
	if err := rw(t, v, pipeline.OpWrite, 8192, data); err != nil {
		t.Fatal(err)
	}
	rv, err := b.reg.Volume("v")
	if err != nil {
		t.Fatalf("no replica on b: %v", err)
	}
	if rv.Role() != api.RoleReplica || !bytes.Equal(readCopy(t, rv, 8192, 4096), data) {
		t.Fatalf("replica on b: role %q, data differs", rv.Role())
	}
	if _, err := b.reg.Get("v"); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("frontend lookup of a replica: %v, want a conflict", err)
	}
	if len(b.reg.Names()) != 0 {
		t.Fatalf("b exports its replica: %v", b.reg.Names())
	}
	if err := b.reg.Delete("v"); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("deleting a replica on its node: %v, want a conflict", err)
	}
	if err := a.reg.Delete("v"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.reg.Volume("v"); !api.IsCode(err, api.CodeNotFound) {
		t.Fatalf("replica after delete: %v", err)
	}
	if _, err := a.reg.Create(api.Spec{Name: "w", Size: 4 << 20, Repl: 2, Nodes: []string{"zz"}}); !api.IsCode(err, api.CodeInvalid) {
		t.Fatalf("create on an unknown node: %v", err)
	}
	net.SetDown("b", true)
	if _, err := a.reg.Create(api.Spec{Name: "w", Size: 4 << 20, Engine: "memory", Repl: 2, Nodes: []string{"b"}}); err == nil {
		t.Fatal("create succeeded while its replica node was down")
	}
	if _, err := a.reg.Volume("w"); err == nil {
		t.Fatal("a failed create left the volume behind")
	}
}

// The owner dies; promote on the replica: it owns the volume at a higher
// epoch with every acknowledged write. The old owner, back, learns of
// the new owner when it tries to write: it is fenced and steps down to
// a replica, which the new owner resyncs.
func TestPromoteAndFenceOldOwner(t *testing.T) {
	net := repltest.NewNet()
	ns := startNodes(t, net, "a", "b")
	a, b := ns["a"], ns["b"]
	if _, err := a.reg.Create(api.Spec{Name: "v", Size: 4 << 20, Engine: "memory", Repl: 2}); err != nil {
		t.Fatal(err)
	}
	va, _ := a.reg.Get("v")
	acked := bytes.Repeat([]byte{0xac}, 4096)
	if err := rw(t, va, pipeline.OpWrite, 0, acked); err != nil {
		t.Fatal(err)
	}
	// a goes silent (paused, partitioned).
	net.SetDown("a", true)
	if _, err := b.reg.Promote("v", false); err != nil {
		t.Fatalf("promote with the owner unreachable: %v", err)
	}
	vb, err := b.reg.Get("v")
	if err != nil {
		t.Fatalf("b does not serve the volume after promotion: %v", err)
	}
	got := make([]byte, 4096)
	if err := rw(t, vb, pipeline.OpRead, 0, got); err != nil || !bytes.Equal(got, acked) {
		t.Fatalf("acknowledged write after promotion: %v", err)
	}
	st := vb.Spec().Replication
	if st.Role != api.RoleOwner || st.Owner != "b" || st.Epoch != 2 {
		t.Fatalf("b's state after promotion: %+v", st)
	}
	// a comes back and writes: b's higher epoch fences it.
	net.SetDown("a", false)
	stale := bytes.Repeat([]byte{0x5a}, 4096)
	err = rw(t, va, pipeline.OpWrite, 4096, stale)
	if !errors.Is(err, replication.ErrFenced) {
		t.Fatalf("the old owner's write after a promotion: %v, want ErrFenced", err)
	}
	if got := readCopy(t, vb, 4096, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("the fenced owner's write landed on the new owner")
	}
	// The new owner reaches a, which steps down, and resyncs it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		rv, err := a.reg.Volume("v")
		if err == nil && rv.Role() == api.RoleReplica {
			if st := vb.ReplicaStatus(); len(st) == 1 && st[0].State == api.ReplicaInSync {
				if !bytes.Equal(readCopy(t, rv, 0, 8192), readCopy(t, vb, 0, 8192)) {
					t.Fatal("the old owner differs from the new one after its resync")
				}
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("a not a resynced replica within 10s: %v %+v", err, vb.ReplicaStatus())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Promote refuses while the owner answers.
	if _, err := a.reg.Promote("v", false); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("promote while the owner answers: %v, want a conflict", err)
	}
}

// Every profile's writes reach the replicas. db writes a non-replicated
// file volume's data through the page cache, straight to the engine: for
// a replicated volume that would pass the replication stage by.
func TestReplicatedWritesEveryProfile(t *testing.T) {
	net := repltest.NewNet()
	ns := startNodes(t, net, "a", "b")
	a, b := ns["a"], ns["b"]
	for _, p := range []string{"db", "sequential", "journal", "none", "random", "auto"} {
		name := "v-" + p
		if _, err := a.reg.Create(api.Spec{Name: name, Size: 4 << 20, Repl: 2, Profile: p}); err != nil {
			t.Fatal(err)
		}
		v, _ := a.reg.Get(name)
		data := bytes.Repeat([]byte(p[:1]), 4096)
		if err := rw(t, v, pipeline.OpWrite, 0, data); err != nil {
			t.Fatal(err)
		}
		if err := rw(t, v, pipeline.OpFlush, 0, nil); err != nil {
			t.Fatal(err)
		}
		rv, err := b.reg.Volume(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := readCopy(t, rv, 0, 4096); !bytes.Equal(got, data) {
			t.Errorf("profile %s: a flushed write did not reach the replica", p)
		}
	}
}
