package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func TestCallEcho(t *testing.T) {
	h := &echo{}
	a, _, _, _ := pair(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i, size := range []int{0, 1, 4096, 100_000, 1 << 20} {
		req := Header{Type: 3, Volume: "vol-1", Epoch: 7, Seq: uint64(i), Gen: 9, Offset: -1 << 40,
			Length: uint32(size), Flags: 0xffffffff, Aux: [4]uint64{1, 0, 1 << 63, 0}}
		payload := payloadOf(size, byte(i))
		var resp Header
		respBuf := make([]byte, 4096)
		out, err := a.Call(ctx, "b", &req, payload, &resp, respBuf)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if resp != req {
			t.Errorf("size %d: response header %+v, want %+v", size, resp, req)
		}
		if !bytes.Equal(out, payload) {
			t.Errorf("size %d: response payload differs (%d bytes, want %d)", size, len(out), len(payload))
		}
		if size <= len(respBuf) && size > 0 && &out[0] != &respBuf[0] {
			t.Errorf("size %d: response not read into respBuf", size)
		}
	}
	if got := h.count(); got["a"] != 5 || len(got) != 1 {
		t.Errorf("handler saw calls %v, want 5 from a", got)
	}
	if _, err := a.Ping(ctx, "b"); err != nil {
		t.Errorf("ping: %v", err)
	}
	if got := h.count()["a"]; got != 5 {
		t.Errorf("ping reached the handler: %d calls", got)
	}
}

func TestStatus(t *testing.T) {
	h := HandlerFunc(func(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
		resp.Type = req.Type
		switch req.Type {
		case 1:
			resp.Status = 7
			return []byte("detail"), nil
		case 2:
			return nil, errors.New("disk on fire")
		case 3:
			resp.Status = 9
			return nil, errors.New("stale epoch")
		}
		return nil, nil
	})
	a, _, _, bcfg := pair(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		typ    uint8
		status uint16
		out    string
	}{{1, 7, "detail"}, {2, StatusHandlerError, ""}, {3, 9, ""}, {4, 0, ""}} {
		var resp Header
		out, err := a.Call(ctx, "b", &Header{Type: tc.typ}, nil, &resp, nil)
		var se *StatusError
		if tc.status == 0 {
			if err != nil {
				t.Errorf("type %d: %v", tc.typ, err)
			}
			continue
		}
		if !errors.As(err, &se) || se.Status != tc.status || se.Peer != "b" || se.Type != tc.typ {
			t.Errorf("type %d: error %v, want status %d", tc.typ, err, tc.status)
		}
		if resp.Status != tc.status || string(out) != tc.out {
			t.Errorf("type %d: response %+v %q", tc.typ, resp, out)
		}
	}
	recorderOf(bcfg).waitLog(t, "handler failed", "disk on fire")
}

// TestConcurrentOutOfOrder has 32 calls in flight on one connection,
// answered in the reverse order of their arrival.
func TestConcurrentOutOfOrder(t *testing.T) {
	const n = 32
	var (
		mu      sync.Mutex
		arrived []chan struct{}
		all     = make(chan struct{})
	)
	h := HandlerFunc(func(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
		me := make(chan struct{})
		mu.Lock()
		arrived = append(arrived, me)
		if len(arrived) == n {
			close(all)
		}
		mu.Unlock()
		select {
		case <-me:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		*resp = *req
		return payload, nil
	})
	a, _, _, _ := pair(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	var wg sync.WaitGroup
	errs := make(chan error, n)
	done := make(chan int, n)
	for i := range n {
		wg.Go(func() {
			req := Header{Type: 1, Volume: fmt.Sprintf("v%d", i%3), Seq: uint64(i)}
			payload := payloadOf(1000+i, byte(i))
			var resp Header
			out, err := a.Call(ctx, "b", &req, payload, &resp, nil)
			switch {
			case err != nil:
				errs <- err
			case resp.Seq != req.Seq || resp.Volume != req.Volume || !bytes.Equal(out, payload):
				errs <- fmt.Errorf("call %d got the response of call %d", i, resp.Seq)
			}
			done <- i
		})
	}
	select {
	case <-all:
	case <-ctx.Done():
		t.Fatal("not all calls reached the handler")
	}
	mu.Lock()
	order := arrived
	mu.Unlock()
	for i := len(order) - 1; i >= 0; i-- {
		close(order[i])
		<-done // the call released last arrived completes first
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestStartWait: calls started together are answered each to its own
// caller, and a started call costs no more allocations than Call.
func TestStartWait(t *testing.T) {
	a, _, _, _ := pair(t, &echo{})
	ctx := context.Background()
	var reqs [8]Header
	var resps [8]Header
	var pds [8]Pending
	for i := range pds {
		reqs[i] = Header{Type: 1, Seq: uint64(i + 1)}
		pds[i] = a.Start(ctx, "b", 5*time.Second, &reqs[i], payloadOf(100+i, byte(i)), &resps[i], nil)
	}
	for i := range pds {
		out, err := pds[i].Wait()
		if err != nil || resps[i].Seq != uint64(i+1) || !bytes.Equal(out, payloadOf(100+i, byte(i))) {
			t.Fatalf("call %d: %v, seq %d, %d bytes", i, err, resps[i].Seq, len(out))
		}
	}
	pd := a.Start(ctx, "nobody", time.Second, &reqs[0], nil, &resps[0], nil)
	if _, err := pd.Wait(); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("start to an unknown peer: %v", err)
	}
}
