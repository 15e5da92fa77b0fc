package replication_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/replication/repltest"
)

func quietLog() *slog.Logger {
	if os.Getenv("REPL_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// memCopies is a replica node's store of copies.
type memCopies struct {
	mu     sync.Mutex
	copies map[string]*memCopy
}

type memCopy struct {
	e   ioengine.Engine
	mu  sync.Mutex
	rep api.Replication
}

func (c *memCopy) Engine() ioengine.Engine { return c.e }
func (c *memCopy) Replication() api.Replication {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rep
}
func (c *memCopy) SetReplication(r api.Replication) error {
	c.mu.Lock()
	c.rep = r
	c.mu.Unlock()
	return nil
}
func (c *memCopy) StepDown(owner string, epoch uint64) error { return errors.New("not an owner") }

func (s *memCopies) Copy(name string) (replication.Copy, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.copies[name]; c != nil {
		return c, nil
	}
	return nil, api.Errorf(api.CodeNotFound, "no copy")
}

func (s *memCopies) CreateCopy(spec api.Spec, r api.Replication) (replication.Copy, error) {
	e, err := ioengine.NewMemory(int64(spec.Size))
	if err != nil {
		return nil, err
	}
	c := &memCopy{e: e, rep: r}
	s.mu.Lock()
	s.copies[spec.Name] = c
	s.mu.Unlock()
	return c, nil
}

func (s *memCopies) DeleteCopy(name string) error {
	s.mu.Lock()
	delete(s.copies, name)
	s.mu.Unlock()
	return nil
}

func (s *memCopies) FreeBytes() int64 { return 1 << 40 }

func (s *memCopies) engine(name string) ioengine.Engine {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.copies[name]; c != nil {
		return c.e
	}
	return nil
}

// cluster is an owner "a" and replicas "b", "c"... in memory.
type cluster struct {
	t       *testing.T
	net     *repltest.Net
	node    *replication.Node
	copies  map[string]*memCopies
	engine  ioengine.Engine // the owner's
	dir     string
	saves   atomic.Int64
	mu      sync.Mutex
	saved   api.Replication
	rep     *replication.Replicator
	handler pipeline.Handler
	fenced  chan uint64
	lease   replication.Lease // set before start: the owner's lease
}

const testSize = 4 << 20

func newCluster(t *testing.T, replicas ...string) *cluster {
	t.Helper()
	c := &cluster{t: t, net: repltest.NewNet(), copies: map[string]*memCopies{}, dir: t.TempDir(), fenced: make(chan uint64, 1)}
	c.node = &replication.Node{Name: "a", Net: c.net.From("a"), Timeout: 100 * time.Millisecond, LastTimeout: 200 * time.Millisecond,
		RetryInterval: 20 * time.Millisecond, Region: 64 << 10, Log: quietLog()}
	for _, n := range replicas {
		cs := &memCopies{copies: map[string]*memCopy{}}
		c.copies[n] = cs
		c.net.Add(n, replication.NewService(n, cs, quietLog()))
	}
	var err error
	c.engine, err = ioengine.NewMemory(testSize)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// start makes the owner's replicator; created says the volume is new.
func (c *cluster) start(state api.Replication, created bool) {
	c.t.Helper()
	c.saved = state
	spec := api.Spec{Name: "v", Size: testSize, Engine: "memory", Repl: len(state.Replicas) + 1, Replication: &state}
	rep, err := c.node.NewReplicator(replication.VolumeConfig{Spec: spec, Engine: c.engine, Dir: c.dir,
		Save: func(r api.Replication) error {
			c.saves.Add(1)
			c.mu.Lock()
			c.saved = r
			c.mu.Unlock()
			return nil
		},
		OnFenced: func(e uint64) { c.fenced <- e },
		Lease:    c.lease,
	})
	if err != nil {
		c.t.Fatal(err)
	}
	c.rep = rep
	c.handler = pipeline.Chain(ioengine.Handler(c.engine), rep.Stage())
	c.t.Cleanup(func() { rep.Close() })
}

func newVolumeState(replicas ...string) api.Replication {
	s := api.Replication{Role: api.RoleOwner, Owner: "a", Epoch: 1, Generation: 1}
	for _, n := range replicas {
		s.Replicas = append(s.Replicas, api.Replica{Node: n, InSync: true})
	}
	return s
}

func (c *cluster) savedState() api.Replication {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.saved
	s.Replicas = append([]api.Replica(nil), s.Replicas...)
	return s
}

func (c *cluster) do(op pipeline.Op, off int64, data []byte, n uint32) error {
	r := pipeline.Request{Op: op, Offset: off, Length: n, Buf: data}
	if op == pipeline.OpWrite {
		r.Length = uint32(len(data))
	}
	return c.handler.Handle(context.Background(), &r)
}

func (c *cluster) write(off int64, data []byte) {
	c.t.Helper()
	if err := c.do(pipeline.OpWrite, off, data, 0); err != nil {
		c.t.Fatalf("write at %d: %v", off, err)
	}
}

func (c *cluster) flush() {
	c.t.Helper()
	if err := c.do(pipeline.OpFlush, 0, nil, 0); err != nil {
		c.t.Fatalf("flush: %v", err)
	}
}

// same fails unless node's copy equals the owner's.
func (c *cluster) same(node string) {
	c.t.Helper()
	e := c.copies[node].engine("v")
	if e == nil {
		c.t.Fatalf("%s has no copy", node)
	}
	a, b := make([]byte, testSize), make([]byte, testSize)
	c.engine.ReadAt(a, 0)
	e.ReadAt(b, 0)
	if !bytes.Equal(a, b) {
		for i := range a {
			if a[i] != b[i] {
				c.t.Fatalf("%s differs from the owner from byte %d (region %d)", node, i, i/(64<<10))
			}
		}
	}
}

func (c *cluster) waitState(node, state string, within time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, st := range c.rep.Status() {
			if st.Node == node && st.State == state {
				return
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not %s within %s: %+v", node, state, within, c.rep.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func pattern(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

var _ = fmt.Sprint
