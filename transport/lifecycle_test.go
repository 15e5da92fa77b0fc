package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/leakcheck"

	"github.com/quic-go/quic-go"
)

// TestNotQUIC: TCP, TLS over TCP and datagrams that are not QUIC reach no
// handler, and the node keeps serving.
func TestNotQUIC(t *testing.T) {
	h := &echo{}
	a, b, _, bcfg := pair(t, h)
	addr := b.Addr().String()

	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("a TCP connection to the QUIC port was accepted")
	}
	if c, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, &tls.Config{ServerName: "b", RootCAs: mustCA(t).Pool()}); err == nil {
		c.Close()
		t.Error("a TLS-over-TCP connection to the QUIC port was accepted")
	}

	u, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for _, dgram := range [][]byte{
		{0x16, 0x03, 0x01, 0x00, 0x05, 'h', 'e', 'l', 'l', 'o'}, // a TLS record
		[]byte("GET / HTTP/1.0\r\n\r\n"),
		append([]byte{0xc0, 0, 0, 0, 1}, make([]byte, 1200)...), // a long header of garbage
		{0x40},
	} {
		if _, err := u.Write(dgram); err != nil {
			t.Fatal(err)
		}
	}
	recorderOf(bcfg).waitLog(t, "not QUIC", "16030100")

	if _, _, err := call(a, &Header{Type: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if n := h.count(); len(n) != 1 || n["a"] != 1 {
		t.Errorf("handler saw %v, want one call from a", n)
	}
}

// TestPeerRestart: after the peer closes and a new transport takes its
// port, the next call connects again; after a crash (no CONNECTION_CLOSE)
// the stateless reset ends the old connection at its first packet, well
// before the idle timeout.
func TestPeerRestart(t *testing.T) {
	for _, crash := range []bool{false, true} {
		name := "close"
		if crash {
			name = "crash"
		}
		t.Run(name, func(t *testing.T) {
			h := &echo{}
			a, b, acfg, bcfg := pair(t, h)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var resp Header
			if _, err := a.Call(ctx, "b", &Header{Type: 1}, nil, &resp, nil); err != nil {
				t.Fatal(err)
			}
			if err := b.close(!crash); err != nil {
				t.Fatal(err)
			}
			if !crash {
				// CONNECTION_CLOSE is on its way; a call racing it
				// could be sent on the closing connection.
				recorderOf(acfg).waitLog(t, "connection lost", "node shutting down")
			}
			bcfg.Listen = b.Addr().String()
			start(t, bcfg)

			begin := time.Now()
			_, err := a.Call(ctx, "b", &Header{Type: 1}, nil, &resp, nil)
			if crash && err != nil {
				// The request went out on the old connection; the reset
				// killed it: ErrConnLost, and the next call reconnects.
				var sr *quic.StatelessResetError
				if !errors.Is(err, ErrConnLost) || !errors.As(err, &sr) {
					t.Fatalf("first call after the crash: %v, want ErrConnLost by a stateless reset", err)
				}
				_, err = a.Call(ctx, "b", &Header{Type: 1}, nil, &resp, nil)
			}
			if err != nil {
				t.Fatalf("call after the restart: %v", err)
			}
			if d := time.Since(begin); d > 5*time.Second {
				t.Errorf("reconnecting took %v", d)
			}
			if n := h.count()["a"]; n != 2 {
				t.Errorf("handler saw %d calls, want 2", n)
			}
		})
	}
}

// blocker is a handler that holds every call until its context ends or
// release is closed, and says when calls have arrived.
type blocker struct {
	arrived chan struct{}
	release chan struct{}
}

func newBlocker() *blocker {
	return &blocker{arrived: make(chan struct{}, 100), release: make(chan struct{})}
}

func (bl *blocker) ServeMessage(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
	select {
	case bl.arrived <- struct{}{}:
	default:
	}
	select {
	case <-bl.release:
		*resp = *req
		return payload, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// TestCloseInFlight: closing either end with calls in flight returns
// promptly, fails the calls, and leaves no goroutine and no fd behind.
func TestCloseInFlight(t *testing.T) {
	for _, side := range []string{"caller", "callee"} {
		t.Run(side, func(t *testing.T) {
			goroutines, fds := runtime.NumGoroutine(), leakcheck.FDs(t)
			func() {
				bl := newBlocker()
				a, b, _, _ := pair(t, bl)
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				const n = 8
				errs := make(chan error, n)
				for range n {
					go func() {
						var resp Header
						_, err := a.Call(ctx, "b", &Header{Type: 1}, make([]byte, 4096), &resp, nil)
						errs <- err
					}()
				}
				for range n {
					<-bl.arrived
				}
				closing := a
				want := ErrClosed
				if side == "callee" {
					closing, want = b, ErrConnLost
				}
				begin := time.Now()
				if err := closing.Close(); err != nil {
					t.Fatal(err)
				}
				for range n {
					if err := <-errs; !errors.Is(err, want) {
						t.Errorf("call in flight: %v, want %v", err, want)
					}
				}
				if d := time.Since(begin); d > 2*time.Second {
					t.Errorf("Close and the failing calls took %v", d)
				}
				a.Close()
				b.Close()
			}()
			leakcheck.Goroutines(t, goroutines)
			if n := leakcheck.FDs(t); n > fds {
				t.Errorf("%d fds open, %d before", n, fds)
			}
		})
	}
}

// TestUnreachable: a call to a peer that does not answer fails within its
// context's deadline, or within DialTimeout when that is shorter.
func TestUnreachable(t *testing.T) {
	// a UDP port nobody listens on
	u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	dead := u.LocalAddr().String()
	u.Close()

	cfg := testConfig(t, "a", map[string]string{"b": dead}, nil)
	cfg.Listen = ""
	cfg.DialTimeout = 700 * time.Millisecond
	a := start(t, cfg)
	for _, tc := range []struct {
		name     string
		deadline time.Duration
		within   time.Duration
	}{{"caller deadline", 200 * time.Millisecond, 600 * time.Millisecond}, {"dial timeout", 10 * time.Second, 2 * time.Second}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), tc.deadline)
			defer cancel()
			begin := time.Now()
			var resp Header
			_, err := a.Call(ctx, "b", &Header{Type: 1}, nil, &resp, nil)
			if d := time.Since(begin); d > tc.within {
				t.Errorf("call failed after %v", d)
			}
			if !errors.Is(err, ErrUnreachable) {
				t.Errorf("call: %v, want ErrUnreachable", err)
			}
		})
	}
	var resp Header
	if _, err := a.Call(context.Background(), "nobody", &Header{}, nil, &resp, nil); !errors.Is(err, ErrUnknownPeer) {
		t.Errorf("call to an unconfigured peer: %v", err)
	}
}

// TestCallTimeout: a call whose context ends while its response is awaited
// fails with ErrTimeout; the connection stays usable, and the late
// response is dropped.
func TestCallTimeout(t *testing.T) {
	for _, how := range []string{"context", "CallTimeout"} {
		t.Run(how, func(t *testing.T) { testCallTimeout(t, how == "CallTimeout") })
	}
}

func testCallTimeout(t *testing.T, callTimeout bool) {
	bl := newBlocker()
	a, _, _, _ := pair(t, bl)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var resp Header
	begin := time.Now()
	var err error
	if callTimeout {
		_, err = a.CallTimeout(context.Background(), "b", 200*time.Millisecond, &Header{Type: 1, Seq: 1}, []byte("slow"), &resp, nil)
	} else {
		_, err = a.Call(ctx, "b", &Header{Type: 1, Seq: 1}, []byte("slow"), &resp, nil)
	}
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call: %v, want ErrTimeout", err)
	}
	if d := time.Since(begin); d > time.Second {
		t.Errorf("timed out after %v", d)
	}
	<-bl.arrived
	close(bl.release) // the late response arrives now

	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	var wg sync.WaitGroup
	for i := range 2 * callsPerStream {
		wg.Go(func() {
			var resp Header
			out, err := a.Call(ctx2, "b", &Header{Type: 1, Seq: uint64(100 + i)}, []byte("fast"), &resp, nil)
			if err != nil || resp.Seq != uint64(100+i) || string(out) != "fast" {
				t.Errorf("call %d after the timeout: %v, seq %d, %q", i, err, resp.Seq, out)
			}
		})
	}
	wg.Wait()
}

// TestPayloadLimits: an oversized request fails before it is sent; a
// peer's oversized or malformed frame resets its stream, is logged, and
// the connection lives on.
func TestPayloadLimits(t *testing.T) {
	h := &echo{}
	bcfg := testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
	bcfg.MaxPayload = 64 << 10
	b := start(t, bcfg)
	acfg := testConfig(t, "a", map[string]string{"b": b.Addr().String()}, nil)
	acfg.Listen, acfg.MaxPayload = "", 64<<10
	a := start(t, acfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var resp Header
	if _, err := a.Call(ctx, "b", &Header{Type: 1}, make([]byte, 64<<10+1), &resp, nil); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized call: %v, want ErrTooLarge", err)
	}

	// a raw node "a" that sends what a blockd node never would
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	tr := &quic.Transport{Conn: udp}
	defer tr.Close()
	qc, err := tr.Dial(ctx, b.Addr(), &tls.Config{RootCAs: mustCA(t).Pool(), ServerName: "b", NextProtos: []string{ALPN},
		Certificates: []tls.Certificate{nodeCert(t, "a")}}, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer qc.CloseWithError(0, "")
	codec := newFrameCodec()
	for _, bad := range []struct {
		frame []byte
		log   string
	}{
		{[]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, "header length 0"},
		{[]byte{0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, "header length 4096"},
		{[]byte{0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0x90}, "payload of 65537 bytes"},
		{[]byte{0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xc1}, "malformed header"},
		{append([]byte{0, 0, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 0x9a, 1, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0x90), "call id 0"},
		{append([]byte{0, 0, 0, 11, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1}, 0x9a, 1, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0x90, 'x'), "unexpected EOF"},
	} {
		s, err := qc.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write(bad.frame); err != nil {
			t.Fatal(err)
		}
		s.Close() // a truncated frame ends here
		var h Header
		_, _, err = codec.readHeader(s, &h, 1<<20)
		var se *quic.StreamError
		if !errors.As(err, &se) || se.ErrorCode != codeProtocol {
			t.Errorf("frame %x: read %v, want a reset with codeProtocol", bad.frame, err)
		}
		recorderOf(bcfg).waitLog(t, "malformed request", bad.log)
	}
	s, err := qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFrame(s, codec, 1, &Header{Type: 1, Seq: 5}, []byte("ok")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, n, err := codec.readHeader(s, &resp, 1<<20); err != nil || resp.Seq != 5 || n != 2 {
		t.Errorf("good frame after the bad ones: %v, seq %d, %d bytes", err, resp.Seq, n)
	}
	if n := h.count(); n["a"] != 1 {
		t.Errorf("handler saw %v, want the one good call", n)
	}
}

// releaser counts the response buffers given back.
type releaser struct {
	echo
	mu       sync.Mutex
	released int
}

func (r *releaser) ReleaseResponse(p []byte) {
	r.mu.Lock()
	r.released++
	r.mu.Unlock()
}

func TestResponseReleaser(t *testing.T) {
	h := &releaser{}
	a, _, _, _ := pair(t, h)
	for i := range 5 {
		if _, _, err := call(a, &Header{Type: 1}, make([]byte, i)); err != nil {
			t.Fatal(err)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released != 4 { // the empty response has nothing to give back
		t.Errorf("%d responses released, want 4", h.released)
	}
}

// TestCancelMidWrite: a call whose context ends while its request is held
// up by flow control (the peer has stopped reading) returns promptly with
// ErrTimeout; its stream is reset, so the peer never sees that request,
// and the connection carries the next calls on a new stream.
func TestCancelMidWrite(t *testing.T) {
	var (
		mu   sync.Mutex
		seen = map[uint8]int{}
	)
	release := make(chan struct{})
	h := HandlerFunc(func(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
		mu.Lock()
		seen[req.Type]++
		mu.Unlock()
		if req.Type == 1 {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil, nil
	})
	bcfg := testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
	bcfg.MaxInFlight = 1 // one worker: the stream's reader stops at the second request
	b := start(t, bcfg)
	acfg := testConfig(t, "a", map[string]string{"b": b.Addr().String()}, nil)
	acfg.Listen, acfg.Streams = "", 1
	a := start(t, acfg)

	errs := make(chan error, 2)
	for i, typ := range []uint8{1, 2} { // 1 holds the worker, 2 holds the reader
		go func() {
			_, _, err := call(a, &Header{Type: typ}, nil)
			errs <- err
		}()
		waitSent(t, a, "b", i+1) // in order, whatever the machine's load
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		mu.Lock()
		n := seen[1]
		mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first call never reached the handler")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	begin := time.Now()
	var resp Header
	_, err := a.Call(ctx, "b", &Header{Type: 3}, make([]byte, 32<<20), &resp, nil)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("call held up by flow control: %v, want ErrTimeout", err)
	}
	if d := time.Since(begin); d > 2*time.Second {
		t.Errorf("it returned after %v", d)
	}
	close(release)
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrConnLost) {
			t.Errorf("call on the reset stream: %v, want ErrConnLost", err)
		}
	}
	if _, _, err := call(a, &Header{Type: 4}, []byte("next")); err != nil {
		t.Fatalf("call after the reset: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if seen[3] != 0 || seen[4] != 1 {
		t.Errorf("handler saw %v: the half-written request must never arrive", seen)
	}
}

// TestSilentPeer: a peer that vanishes without a word (its process gone,
// nothing answering on its port) fails the calls in flight with
// ErrConnLost after the idle timeout, not before, and not never.
func TestSilentPeer(t *testing.T) {
	h := &echo{}
	bcfg := testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
	b := start(t, bcfg)
	acfg := testConfig(t, "a", map[string]string{"b": b.Addr().String()}, nil)
	acfg.Listen, acfg.IdleTimeout = "", time.Second
	a := start(t, acfg)
	if _, _, err := call(a, &Header{Type: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.close(false); err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	_, _, err := call(a, &Header{Type: 1}, nil)
	d := time.Since(begin)
	var idle *quic.IdleTimeoutError
	if !errors.Is(err, ErrConnLost) || !errors.As(err, &idle) {
		t.Errorf("call to a vanished peer: %v, want ErrConnLost by the idle timeout", err)
	}
	if d < 500*time.Millisecond || d > 5*time.Second {
		t.Errorf("it failed after %v, want about the idle timeout (1s)", d)
	}
}

// TestSetPeer: a cluster learns its nodes as they join. A peer added later
// is called and may call in; a changed address reaches the node at its new
// address; a removed peer can be neither called nor call in.
func TestSetPeer(t *testing.T) {
	hb := &echo{}
	bcfg := testConfig(t, "b", nil, hb)
	b := start(t, bcfg)
	acfg := testConfig(t, "a", nil, &echo{})
	a := start(t, acfg)
	if _, _, err := call(a, &Header{Type: 1}, nil); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("call before SetPeer: %v, want ErrUnknownPeer", err)
	}
	if err := a.SetPeer("b", b.Addr().String()); err != nil {
		t.Fatal(err)
	}
	// b does not know a yet: it refuses the connection.
	if _, _, err := call(a, &Header{Type: 1}, nil); !errors.Is(err, ErrRefused) {
		t.Fatalf("call to a node that does not know us: %v, want ErrRefused", err)
	}
	if err := b.SetPeer("a", a.Addr().String()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := call(a, &Header{Type: 1}, nil); err != nil {
		t.Fatalf("call once both know each other: %v", err)
	}
	if got := hb.count()["a"]; got != 1 {
		t.Fatalf("b served %d calls of a, want 1", got)
	}

	// b moves: a restarted b2 under the same name at another address.
	hb2 := &echo{}
	b2 := start(t, testConfig(t, "b", map[string]string{"a": a.Addr().String()}, hb2))
	if err := a.SetPeer("b", b2.Addr().String()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := call(a, &Header{Type: 1}, nil); err != nil {
		t.Fatalf("call after the address changed: %v", err)
	}
	if hb2.count()["a"] != 1 || hb.count()["a"] != 1 {
		t.Fatalf("calls: old b %v, new b %v; want the new address to get the call", hb.count(), hb2.count())
	}
	if got := a.PeerNames(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("PeerNames %v", got)
	}

	a.RemovePeer("b")
	if _, _, err := call(a, &Header{Type: 1}, nil); !errors.Is(err, ErrUnknownPeer) {
		t.Fatalf("call after RemovePeer: %v, want ErrUnknownPeer", err)
	}
	if err := a.SetPeer("a", "127.0.0.1:1"); err == nil {
		t.Fatal("a node became its own peer")
	}
	if err := a.SetPeer("c", "no port"); err == nil {
		t.Fatal("SetPeer took an address without a port")
	}
}

// waitSent waits (at most 10s) until tr's connection to peer has n calls
// written and awaiting their answers.
func waitSent(t *testing.T, tr *Transport, peer string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		sent := 0
		if p := tr.peer(peer); p != nil {
			p.mu.Lock()
			cc := p.cur
			p.mu.Unlock()
			if cc != nil {
				for i := range cc.streams {
					if ms := cc.streams[i].Load(); ms != nil {
						ms.mu.Lock()
						for j := range ms.calls {
							if ms.calls[j].state == slotSent && ms.writing != &ms.calls[j] {
								sent++
							}
						}
						ms.mu.Unlock()
					}
				}
			}
		}
		if sent >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d calls sent to %s within 10s, want %d", sent, peer, n)
		}
		time.Sleep(time.Millisecond)
	}
}
