package replication_test

import (
	"context"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/replication"
)

// directNet delivers a call to the peer's handler on the caller's
// goroutine, without copying: the replication layer's own cost, without a
// network's.
type directNet map[string]replication.Handler

func (n directNet) Call(ctx context.Context, peer string, _ time.Duration, req *replication.Msg, payload []byte, resp *replication.Msg, _ []byte) ([]byte, error) {
	return n[peer].ServeMessage(ctx, "a", req, payload, resp)
}

// Send answers at once, into the ticket.
func (n directNet) Send(ctx context.Context, peer string, _ time.Duration, req *replication.Msg, payload []byte, t *replication.Ticket) {
	_, t.Err = n[peer].ServeMessage(ctx, "a", req, payload, &t.Resp)
}

func (n directNet) Receive(t *replication.Ticket, resp *replication.Msg) error {
	*resp = t.Resp
	return t.Err
}

// newDirect is an owner with replicas on directNet: repl = 1 + len(peers).
func newDirect(tb testing.TB, peers ...string) pipeline.Handler {
	net := directNet{}
	state := api.Replication{Role: api.RoleOwner, Owner: "a", Epoch: 1, Generation: 1}
	for _, p := range peers {
		cs := &memCopies{copies: map[string]*memCopy{}}
		if _, err := cs.CreateCopy(api.Spec{Name: "v", Size: testSize}, api.Replication{Role: api.RoleReplica, Owner: "a", Epoch: 1, Generation: 1}); err != nil {
			tb.Fatal(err)
		}
		net[p] = replication.NewService(p, cs, quietLog())
		state.Replicas = append(state.Replicas, api.Replica{Node: p, InSync: true})
	}
	e, _ := ioengine.NewMemory(testSize)
	node := &replication.Node{Name: "a", Net: net, Log: quietLog()}
	rep, err := node.NewReplicator(replication.VolumeConfig{Spec: api.Spec{Name: "v", Size: testSize, Replication: &state},
		Engine: e, Dir: tb.TempDir(), Save: func(api.Replication) error { return nil }})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { rep.Close() })
	return pipeline.Chain(ioengine.Handler(e), rep.Stage())
}

// BenchmarkReplicatedWrite: a 4 KiB write through the replication stage
// to two replicas (repl 3), the local engine and the replicas' in memory.
func BenchmarkReplicatedWrite(b *testing.B) {
	h := newDirect(b, "b", "c")
	buf := make([]byte, 4096)
	r := pipeline.Request{Op: pipeline.OpWrite, Length: 4096, Buf: buf}
	ctx := context.Background()
	b.ReportAllocs()
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		r.Offset = int64(i%1000) * 4096
		if err := h.Handle(ctx, &r); err != nil {
			b.Fatal(err)
		}
	}
}

// TestReplicatedWriteAllocs: in steady state a replicated write allocates
// nothing in the replication layer (owner stage and replica service).
func TestReplicatedWriteAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items under the race detector; make test runs this test without it too")
	}
	h := newDirect(t, "b", "c")
	buf := make([]byte, 4096)
	r := pipeline.Request{Op: pipeline.OpWrite, Length: 4096, Buf: buf}
	ctx := context.Background()
	i := 0
	write := func() {
		r.Offset = int64(i%1000) * 4096
		i++
		if err := h.Handle(ctx, &r); err != nil {
			t.Fatal(err)
		}
	}
	for range 2000 { // warm: the engines' chunks, the op pool
		write()
	}
	if n := testing.AllocsPerRun(2000, write); n > 0 {
		t.Fatalf("%.2f allocations per replicated write", n)
	}
	f := pipeline.Request{Op: pipeline.OpFlush}
	flush := func() {
		if err := h.Handle(ctx, &f); err != nil {
			t.Fatal(err)
		}
	}
	flush()
	if n := testing.AllocsPerRun(500, flush); n > 0 {
		t.Fatalf("%.2f allocations per replicated flush", n)
	}
}
