package qos

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// hangLimit bounds every wait in these tests: reaching it means a request
// that should have been released never was (a hang), not slowness.
const hangLimit = 20 * time.Second

func newNode(t *testing.T, c Capacity) *Node {
	t.Helper()
	before := runtime.NumGoroutine()
	n, err := NewNode(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		// The timer goroutine must be gone once Close returns.
		deadline := time.Now().Add(hangLimit)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if g := runtime.NumGoroutine(); g > before {
			t.Errorf("goroutines: %d before NewNode, %d after Close", before, g)
		}
	})
	return n
}

func newVolume(t *testing.T, n *Node, name string, l Limits) *VolumeQoS {
	t.Helper()
	v, err := n.Volume(name, l)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// waitFor polls cond (bounded by hangLimit): the state it waits for is
// reached by another goroutine.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// async runs f in a goroutine and returns a channel with its result.
func async(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

func result(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(hangLimit):
		t.Fatal("request never returned")
		return nil
	}
}

// oneIOPS is a cap whose bucket holds one request: the first passes, the
// next waits about a second — long enough that the tests below act on it
// while it waits, and they never wait for it to pass on its own.
var oneIOPS = Limits{IOPS: 1}

func TestThrottledRequestsPass(t *testing.T) {
	n := newNode(t, Capacity{})
	v := newVolume(t, n, "a", Limits{IOPS: 2000})
	ctx := context.Background()
	for i := 0; i < 250; i++ {
		if err := v.Wait(ctx, i%2 == 0, 4096); err != nil {
			t.Fatal(err)
		}
	}
	st := v.Stats()
	if st.Passed != 250 || st.Waiting != 0 {
		t.Fatalf("stats %+v: want 250 passed, none waiting", st)
	}
	// 250 requests at 2000 IOPS with 200 of credit (MinBurst): some had
	// to wait.
	if st.Throttled <= 0 {
		t.Fatalf("throttled %v: want > 0", st.Throttled)
	}
}

func TestSetReleasesWaiting(t *testing.T) {
	n := newNode(t, Capacity{})
	v := newVolume(t, n, "a", oneIOPS)
	ctx := context.Background()
	if err := v.Wait(ctx, false, 4096); err != nil {
		t.Fatal(err)
	}
	ch := async(func() error { return v.Wait(ctx, false, 4096) })
	waitFor(t, "a waiting request", func() bool { return v.Stats().Waiting == 1 })
	if err := v.Set(Limits{IOPS: 1, Weight: 5}); err != nil {
		t.Fatal(err)
	}
	if got := v.Stats().Waiting; got != 1 {
		t.Fatalf("after an unrelated change %d waiting, want 1", got)
	}
	if err := v.Set(Limits{}); err != nil { // clear: everything waiting goes
		t.Fatal(err)
	}
	if err := result(t, ch); err != nil {
		t.Fatal(err)
	}
	if st := v.Stats(); st.Waiting != 0 || st.Limits != (Limits{}) {
		t.Fatalf("stats %+v", st)
	}
}

func TestSetRefusesBadLimits(t *testing.T) {
	n := newNode(t, Capacity{IOPS: 10000})
	v := newVolume(t, n, "a", Limits{IOPS: 2000, IOPSReservation: 1000})
	newVolume(t, n, "b", Limits{IOPSReservation: 5000})
	for _, tc := range []struct {
		l    Limits
		want string
	}{
		{Limits{IOPS: 2000, IOPSReservation: 3000}, "iops_reservation 3000 exceeds iops_limit 2000"},
		{Limits{IOPS: -1}, "iops_limit -1 is negative"},
		{Limits{IOPSReservation: 6000}, "iops reservations total 11000 exceed node capacity 10000 iops"},
	} {
		err := v.Set(tc.l)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Set(%+v) = %v, want %q", tc.l, err, tc.want)
		}
	}
	if got := v.Limits(); got != (Limits{IOPS: 2000, IOPSReservation: 1000}) {
		t.Fatalf("limits changed by refused Sets: %+v", got)
	}
	if _, err := n.Volume("c", Limits{IOPSReservation: 4001}); err == nil {
		t.Fatal("Volume accepted a reservation beyond capacity")
	}
	if _, err := n.Volume("a", Limits{}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate Volume: %v, want ErrExists", err)
	}
	if err := n.SetCapacity(Capacity{IOPS: 5999}); err == nil {
		t.Fatal("SetCapacity accepted a capacity below the reservations")
	}
	if err := n.SetCapacity(Capacity{IOPS: 6000}); err != nil {
		t.Fatal(err)
	}
}

func TestCancelReleasesPlace(t *testing.T) {
	n := newNode(t, Capacity{})
	v := newVolume(t, n, "a", oneIOPS)
	if err := v.Wait(context.Background(), true, 4096); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch := async(func() error { return v.Wait(ctx, true, 4096) })
	waitFor(t, "a waiting request", func() bool { return v.Stats().Waiting == 1 })
	cancel()
	if err := result(t, ch); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait returned %v, want context.Canceled", err)
	}
	st := v.Stats()
	if st.Waiting != 0 || st.Passed != 1 || st.Throttled <= 0 {
		t.Fatalf("stats after cancel %+v: want 0 waiting, 1 passed, some throttled time", st)
	}
	// The slot is clean for reuse: the next request waits again rather than
	// seeing a stale wake-up.
	ctx2, cancel2 := context.WithCancel(context.Background())
	ch = async(func() error { return v.Wait(ctx2, true, 4096) })
	waitFor(t, "a second waiting request", func() bool { return v.Stats().Waiting == 1 })
	cancel2()
	if err := result(t, ch); !errors.Is(err, context.Canceled) {
		t.Fatalf("second cancelled wait returned %v", err)
	}
}

func TestCloseFailsWaiting(t *testing.T) {
	for _, what := range []string{"volume", "node"} {
		t.Run(what, func(t *testing.T) {
			n := newNode(t, Capacity{})
			v := newVolume(t, n, "a", oneIOPS)
			other := newVolume(t, n, "b", oneIOPS)
			ctx := context.Background()
			v.Wait(ctx, false, 0)
			other.Wait(ctx, false, 0)
			var chs []<-chan error
			for i := 0; i < 3; i++ {
				chs = append(chs, async(func() error { return v.Wait(ctx, false, 4096) }))
			}
			waitFor(t, "3 waiting requests", func() bool { return v.Stats().Waiting == 3 })
			if what == "volume" {
				v.Close()
			} else {
				n.Close()
			}
			for _, ch := range chs {
				if err := result(t, ch); !errors.Is(err, pipeline.ErrShutdown) {
					t.Fatalf("waiting request got %v, want ErrShutdown", err)
				}
			}
			if err := v.Wait(ctx, false, 4096); !errors.Is(err, pipeline.ErrShutdown) {
				t.Fatalf("request after close got %v, want ErrShutdown", err)
			}
			if what == "volume" {
				if got := len(n.Stats()); got != 1 {
					t.Fatalf("%d volumes after closing one of two", got)
				}
				// The name is free again.
				newVolume(t, n, "a", Limits{})
			}
		})
	}
}

func TestStage(t *testing.T) {
	n := newNode(t, Capacity{})
	v := newVolume(t, n, "a", oneIOPS)
	e, err := ioengine.NewMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	h := pipeline.Chain(ioengine.Handler(e), v.Stage())
	ctx := context.Background()
	buf := []byte("hello qos")
	if err := h.Handle(ctx, &pipeline.Request{Op: pipeline.OpWrite, Offset: 4096, Length: uint32(len(buf)), Buf: buf}); err != nil {
		t.Fatal(err)
	}
	// The bucket is empty now: a read waits ...
	got := make([]byte, len(buf))
	ch := async(func() error {
		return h.Handle(ctx, &pipeline.Request{Op: pipeline.OpRead, Offset: 4096, Length: uint32(len(got)), Buf: got})
	})
	waitFor(t, "the read to wait", func() bool { return v.Stats().Waiting == 1 })
	// ... but a flush passes: it is not throttled.
	if err := h.Handle(ctx, &pipeline.Request{Op: pipeline.OpFlush}); err != nil {
		t.Fatal(err)
	}
	v.Set(Limits{})
	if err := result(t, ch); err != nil {
		t.Fatal(err)
	}
	if string(got) != string(buf) {
		t.Fatalf("read %q through the stage, want %q", got, buf)
	}
	if st := v.Stats(); st.Passed != 2 {
		t.Fatalf("passed %d, want 2 (write and read; flush is not counted)", st.Passed)
	}
}

// TestConcurrentChurn hammers one node from many goroutines with caps,
// cancellations and live changes; run with -race. Every request must end,
// either passed or cancelled.
func TestConcurrentChurn(t *testing.T) {
	n := newNode(t, Capacity{IOPS: 200000})
	vols := []*VolumeQoS{
		newVolume(t, n, "a", Limits{IOPS: 50000, Burst: 0.001}),
		newVolume(t, n, "b", Limits{ReadBPS: 100 << 20, IOPSReservation: 1000}),
		newVolume(t, n, "c", Limits{Weight: 10}),
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := vols[g%len(vols)]
			for i := 0; i < 300; i++ {
				ctx, cancel := context.WithCancel(context.Background())
				if i%7 == 0 {
					cancel()
				}
				err := v.Wait(ctx, i%3 == 0, 4096)
				cancel()
				if err != nil && !errors.Is(err, context.Canceled) {
					t.Error(err)
					return
				}
				if g == 0 && i%50 == 0 {
					vols[1].Set(Limits{ReadBPS: int64(50+i) << 20, IOPSReservation: 1000})
				}
			}
		}()
	}
	wg.Wait()
	for _, st := range n.Stats() {
		if st.Waiting != 0 {
			t.Errorf("%s: %d still waiting", st.Volume, st.Waiting)
		}
	}
}

// TestNoAllocs checks the steady-state paths allocate nothing per request:
// the fast path (no caps, unlimited node) and the scheduled path.
func TestNoAllocs(t *testing.T) {
	ctx := context.Background()
	n := newNode(t, Capacity{})
	fast := newVolume(t, n, "fast", Limits{})
	capped := newVolume(t, n, "capped", Limits{IOPS: 1 << 40}) // never waits, still scheduled
	for _, v := range []*VolumeQoS{fast, capped} {
		v.Wait(ctx, false, 4096) // warm up the slot pool
		if a := testing.AllocsPerRun(1000, func() { v.Wait(ctx, false, 4096) }); a != 0 {
			t.Errorf("%s: %v allocations per request, want 0", v.Name(), a)
		}
	}
}

func benchStage(b *testing.B, c Capacity, l Limits, useQoS bool) {
	n, err := NewNode(c)
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	v, err := n.Volume("v", l)
	if err != nil {
		b.Fatal(err)
	}
	var h pipeline.Handler = pipeline.HandlerFunc(func(context.Context, *pipeline.Request) error { return nil })
	if useQoS {
		h = pipeline.Chain(h, v.Stage())
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		r := &pipeline.Request{Op: pipeline.OpRead, Length: 4096}
		ctx := context.Background()
		for pb.Next() {
			if err := h.Handle(ctx, r); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// The overhead benchmarks: QoS off, QoS on without limits (fast path), and
// a volume that goes through the scheduler without ever waiting.
func BenchmarkStageOff(b *testing.B) { benchStage(b, Capacity{}, Limits{}, false) }
func BenchmarkStageNoLimits(b *testing.B) {
	benchStage(b, Capacity{}, Limits{}, true)
}
func BenchmarkStageScheduled(b *testing.B) {
	benchStage(b, Capacity{IOPS: 1 << 40}, Limits{IOPS: 1 << 40}, true)
}

// BenchmarkStageThrottled measures a volume held at its cap: each request
// parks on a slot and is woken by the timer goroutine.
func BenchmarkStageThrottled(b *testing.B) {
	benchStage(b, Capacity{}, Limits{IOPS: 200000}, true)
}

// TryAdmit takes what is there at once and nothing more: a refused try
// leaves no request behind and no credit taken, and it never overtakes a
// request already waiting.
func TestTryAdmit(t *testing.T) {
	n := newNode(t, Capacity{})
	v := newVolume(t, n, "a", oneIOPS)
	if !v.TryAdmit(true, 4096) {
		t.Fatal("TryAdmit refused the first request of a full bucket")
	}
	if v.TryAdmit(true, 4096) {
		t.Fatal("TryAdmit admitted a second request at 1 IOPS")
	}
	if st := v.Stats(); st.Waiting != 0 || st.Passed != 1 {
		t.Fatalf("stats after one admitted and one refused try %+v: want 0 waiting, 1 passed", st)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := async(func() error { return v.Wait(ctx, false, 4096) })
	waitFor(t, "a waiting request", func() bool { return v.Stats().Waiting == 1 })
	if v.TryAdmit(false, 4096) {
		t.Fatal("TryAdmit overtook a waiting request")
	}
	cancel()
	if err := result(t, ch); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait returned %v", err)
	}
	u := newVolume(t, n, "free", Limits{})
	for i := 0; i < 3; i++ {
		if !u.TryAdmit(false, 1<<20) {
			t.Fatal("TryAdmit refused a request on a volume without caps on an unlimited node")
		}
	}
}
