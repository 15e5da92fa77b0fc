// Package repltest has an in-process network of replication nodes for
// tests: every node's Handler is reached by name, each call carries the
// caller's name, and links can be cut to play unreachable nodes.
package repltest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/replication"
)

// Net is an in-process network of nodes.
type Net struct {
	mu    sync.Mutex
	nodes map[string]replication.Handler
	down  map[string]bool
	calls atomic.Int64
	// Hook, if set before calls start, runs before each delivered call
	// (from, to, message) and may refuse it with an error.
	Hook func(from, to string, m *replication.Msg) error
}

// NewNet returns an empty network.
func NewNet() *Net {
	return &Net{nodes: map[string]replication.Handler{}, down: map[string]bool{}}
}

// ErrUnreachable is what a call to a cut-off node fails with, after its
// timeout.
var ErrUnreachable = errors.New("repltest: peer unreachable (timed out)")

// Add registers node's handler.
func (n *Net) Add(node string, h replication.Handler) {
	n.mu.Lock()
	n.nodes[node] = h
	n.mu.Unlock()
}

// SetDown cuts node off (calls to it and from it time out) or restores it.
func (n *Net) SetDown(node string, down bool) {
	n.mu.Lock()
	n.down[node] = down
	n.mu.Unlock()
}

// Calls counts the calls made.
func (n *Net) Calls() int64 { return n.calls.Load() }

// From returns the network as node sees it: its calls carry its name.
func (n *Net) From(node string) replication.Network { return endpoint{n, node} }

type endpoint struct {
	n    *Net
	from string
}

func (e endpoint) Call(ctx context.Context, peer string, timeout time.Duration, req *replication.Msg, payload []byte, resp *replication.Msg, respBuf []byte) ([]byte, error) {
	n := e.n
	n.calls.Add(1)
	n.mu.Lock()
	h := n.nodes[peer]
	cut := n.down[peer] || n.down[e.from]
	hook := n.Hook
	n.mu.Unlock()
	if h == nil || cut {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-t.C:
			return nil, ErrUnreachable
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if hook != nil {
		if err := hook(e.from, peer, req); err != nil {
			return nil, err
		}
	}
	r := *req
	p := append([]byte(nil), payload...) // a wire copies
	out, err := h.ServeMessage(ctx, e.from, &r, p, resp)
	return append(respBuf[:0], out...), err
}

type answer struct {
	resp replication.Msg
	err  error
}

// Send runs the call on a goroutine of its own; Receive waits for it.
func (e endpoint) Send(ctx context.Context, peer string, timeout time.Duration, req *replication.Msg, payload []byte, t *replication.Ticket) {
	ch := make(chan answer, 1)
	t.State = ch
	go func() { // ends when the call does (bounded by timeout)
		var a answer
		_, a.err = e.Call(ctx, peer, timeout, req, payload, &a.resp, nil)
		ch <- a
	}()
}

// Receive implements replication.Network.
func (e endpoint) Receive(t *replication.Ticket, resp *replication.Msg) error {
	a := <-t.State.(chan answer)
	*resp = a.resp
	return a.err
}
