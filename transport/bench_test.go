package transport

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// smallReply answers with its request's Seq and an 8-byte payload it keeps
// for good (constant, so no ownership question), like a replica's write
// acknowledgement.
var smallReply = HandlerFunc(func(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
	resp.Type, resp.Seq, resp.Volume = req.Type, req.Seq, req.Volume
	return ackPayload, nil
})

var ackPayload = []byte("ack-ack!")

// callLoop makes calls from one goroutine with its own buffers, as the
// replication layer would per in-flight request.
type callLoop struct {
	tr      *Transport
	req     Header
	resp    Header
	payload []byte
	respBuf []byte
}

func newCallLoop(tr *Transport, size int) *callLoop {
	return &callLoop{
		tr:      tr,
		req:     Header{Type: 1, Volume: "vol-1", Epoch: 3, Length: uint32(size)},
		payload: payloadOf(size, 1),
		respBuf: make([]byte, 64),
	}
}

func (c *callLoop) call(ctx context.Context) error {
	c.req.Seq++
	c.req.Offset += int64(len(c.payload))
	// Started, then waited for, with a timeout, as replication calls:
	// neither may cost an allocation.
	pd := c.tr.Start(ctx, "b", 10*time.Second, &c.req, c.payload, &c.resp, c.respBuf)
	_, err := pd.Wait()
	return err
}

// TestCallAllocs: in steady state a 4 KiB call with a small response
// allocates nothing in the transport's code (msgpack included), on either
// side: every allocation the memory profile attributes to it is counted,
// and there must be none. What remains is quic-go's (per datagram sent and
// received, per STREAM frame; see the package documentation), bounded
// here as a whole.
func TestCallAllocs(t *testing.T) {
	if testing.Short() {
		t.Skip("measures allocations over many calls")
	}
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1
	a, _, _, _ := pair(t, smallReply)
	ctx := context.Background()
	c := newCallLoop(a, 4096)
	call := func() {
		if err := c.call(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Warm up: flow-control windows, free lists, and workers enough that a
	// request arriving while the last one's worker is still finishing
	// finds another idle (8 callers at once start 8).
	var wg sync.WaitGroup
	for range 8 {
		l := newCallLoop(a, 4096)
		wg.Go(func() {
			for range 200 {
				if err := l.call(ctx); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	for range 1000 {
		call()
	}
	const runs = 2000
	before := ownAllocs()
	allocs := testing.AllocsPerRun(runs, call)
	own := ownAllocs()
	t.Logf("%.1f allocations per call on both sides, quic-go included", allocs)
	for site, n := range own {
		if n -= before[site]; n > 0 {
			t.Errorf("transport code allocated %d times in %d calls at:\n%s", n, runs+1, site)
		}
	}
	if allocs > maxAllocsPerCall && !raceEnabled {
		t.Errorf("%.1f allocations per call, want at most %v", allocs, maxAllocsPerCall)
	}
}

// maxAllocsPerCall bounds all allocations of a call in TestCallAllocs,
// both sides in one process: what quic-go v0.65 needs (measured: 25), plus
// a margin for retransmissions and acknowledgements that land differently.
const maxAllocsPerCall = 35.0

// ownAllocs returns, per allocation site in the transport's own code (or
// in msgpack called from it), the number of allocations made there so far
// according to the memory profile. A site is the stack from the first
// frame outside the runtime and the standard library, so that fmt.Errorf
// in the transport counts as the transport's and quic-go's own count as
// quic-go's.
func ownAllocs() map[string]int64 {
	runtime.GC() // the profile is as of the last completed cycle
	runtime.GC()
	var recs []runtime.MemProfileRecord
	for n, ok := runtime.MemProfile(nil, true); !ok; n, ok = runtime.MemProfile(recs, true) {
		recs = make([]runtime.MemProfileRecord, n+100)
	}
	sites := map[string]int64{}
	for _, r := range recs {
		frames := runtime.CallersFrames(r.Stack())
		var site strings.Builder
		owner, ownerFile := "", ""
		for {
			f, more := frames.Next()
			// the first element of the import path: "runtime", "net",
			// "github.com"; only modules have a dot in it
			first, _, slash := strings.Cut(f.Function, "/")
			if !slash {
				first, _, _ = strings.Cut(first, ".")
			}
			if owner == "" && strings.Contains(first, ".") {
				owner, ownerFile = f.Function, f.File
			}
			if owner != "" {
				fmt.Fprintf(&site, "%s:%d\n", f.Function, f.Line)
			}
			if !more {
				break
			}
		}
		if strings.HasPrefix(owner, "github.com/blockd/blockd/transport.") && !strings.HasSuffix(ownerFile, "_test.go") ||
			strings.HasPrefix(owner, "github.com/vmihailenco/msgpack") {
			sites[site.String()] += r.AllocObjects
		}
	}
	return sites
}

// BenchmarkCall measures calls on loopback, both ends in this process:
// calls/s, MB/s of request payload, allocations and CPU time (user +
// system, both ends) per call.
func BenchmarkCall(b *testing.B) {
	for _, tc := range []struct {
		name        string
		size, procs int
	}{{"4KiB-c1", 4096, 1}, {"4KiB-c32", 4096, 32}, {"1MiB-c8", 1 << 20, 8}} {
		b.Run(tc.name, func(b *testing.B) { benchCalls(b, tc.size, tc.procs) })
	}
}

func benchCalls(b *testing.B, size, procs int) {
	a, srv, _, _ := pair(b, smallReply)
	defer srv.Close() // now, not after every round of b.N
	defer a.Close()
	ctx := context.Background()
	loops := make([]*callLoop, procs)
	for i := range loops {
		loops[i] = newCallLoop(a, size)
		for range 20 {
			if err := loops[i].call(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	var left atomic.Int64
	left.Store(int64(b.N))
	cpu0 := cpuTime(b)
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for _, l := range loops {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				if err := l.call(ctx); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "calls/s")
	b.ReportMetric(float64((cpuTime(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/call")
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
