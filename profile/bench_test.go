package profile

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// The data path of none, db and random allocates nothing per request in
// steady state (b.ReportAllocs shows 0 allocs/op); sequential is measured
// for comparison.
func BenchmarkStage(b *testing.B) {
	for _, p := range []Profile{None, DB, Random, Journal, Sequential, Auto} {
		for _, op := range []string{"read4k", "write4k", "write4k+flush", "fua4k"} {
			b.Run(p.String()+"/"+op, func(b *testing.B) {
				e, _ := ioengine.NewMemory(64 << 20)
				st := New(p, Options{Size: e.Size})
				h := st.Wrap(ioengine.Handler(e))
				defer st.Close()
				buf := make([]byte, 4096)
				ctx := context.Background()
				r := &pipeline.Request{}
				flush := &pipeline.Request{Op: pipeline.OpFlush}
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					off := int64(i*7919%16384) * 4096
					switch op {
					case "read4k":
						*r = pipeline.Request{Op: pipeline.OpRead, Offset: off, Length: 4096, Buf: buf}
					case "write4k", "write4k+flush":
						*r = pipeline.Request{Op: pipeline.OpWrite, Offset: off, Length: 4096, Buf: buf}
					case "fua4k":
						*r = pipeline.Request{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Offset: off, Length: 4096, Buf: buf}
					}
					if err := h.Handle(ctx, r); err != nil {
						b.Fatal(err)
					}
					if op == "write4k+flush" {
						if err := h.Handle(ctx, flush); err != nil {
							b.Fatal(err)
						}
					}
				}
			})
		}
	}
}

// Parallel flushers share engine flushes under db.
func BenchmarkGroupCommitParallel(b *testing.B) {
	e, _ := ioengine.NewMemory(64 << 20)
	st := New(DB, Options{Size: e.Size})
	h := st.Wrap(ioengine.Handler(e))
	defer st.Close()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		r := &pipeline.Request{Op: pipeline.OpFlush}
		for pb.Next() {
			if err := h.Handle(context.Background(), r); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestZeroAllocs asserts what the benchmark shows, so a regression fails
// make test: no allocation per request on the none, db and random paths.
func TestZeroAllocs(t *testing.T) {
	type tc struct {
		p    Profile
		file bool // db on the file engine: its page-cache write path
	}
	for _, c := range []tc{{None, false}, {DB, false}, {DBRemote, false}, {Random, false}, {Journal, false}, {DB, true}} {
		p := c.p
		var e ioengine.Engine
		e, _ = ioengine.NewMemory(16 << 20)
		opts := Options{Size: e.Size}
		if c.file {
			e = openFile(t, 16<<20)
			opts = Options{Size: e.Size, Cached: e.(CachedWriter)}
		}
		st := New(p, opts)
		h := st.Wrap(ioengine.Handler(e))
		buf := make([]byte, 4096)
		ctx := context.Background()
		reqs := []*pipeline.Request{
			{Op: pipeline.OpWrite, Offset: 8192, Length: 4096, Buf: buf},
			{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Offset: 8192, Length: 4096, Buf: buf},
			{Op: pipeline.OpRead, Offset: 8192, Length: 4096, Buf: buf},
			{Op: pipeline.OpFlush},
			{Op: pipeline.OpTrim, Offset: 8192, Length: 4096},
		}
		for _, r := range reqs {
			h.Handle(ctx, r) // warm up
			if n := testing.AllocsPerRun(200, func() {
				if err := h.Handle(ctx, r); err != nil {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("%s %s: %v allocs per request, want 0", p, r.Op, n)
			}
		}
		st.Close()
		e.Close()
	}
}

// slowFlush is a next handler whose engine flushes take d (a device with a
// slow cache flush); other requests succeed at once.
type slowFlush struct{ d time.Duration }

func (s slowFlush) Handle(_ context.Context, r *pipeline.Request) error {
	if r.Op == pipeline.OpFlush {
		time.Sleep(s.d)
	}
	return nil
}

// Eight committers (write, then FLUSH, then a pause for the round trip to
// the client) on a device whose flush takes 2 ms: with gathering the
// committers share one engine flush per round; without it they split into
// two halves that take turns. Reports committed FLUSHes per second and
// engine flushes per FLUSH.
func BenchmarkGroupCommitGather(b *testing.B) {
	for _, gather := range []bool{true, false} {
		name := "gather"
		if !gather {
			name = "nogather"
		}
		b.Run(name, func(b *testing.B) {
			st := New(DB, Options{Size: func() int64 { return 1 << 20 }})
			h := st.Wrap(slowFlush{2 * time.Millisecond})
			defer st.Close()
			if !gather {
				st.gc.gatherMin = time.Hour
			}
			st.gc.gatherMax = 5 * time.Millisecond
			var next atomic.Int64
			start := time.Now()
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						if err := handle(h, pipeline.OpWrite); err != nil {
							b.Error(err)
							return
						}
						if err := handle(h, pipeline.OpFlush); err != nil {
							b.Error(err)
							return
						}
						time.Sleep(500 * time.Microsecond)
					}
				})
			}
			wg.Wait()
			s := st.Stats()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "flushes/s")
			b.ReportMetric(float64(s.EngineFlushes)/float64(max(1, s.Flushes)), "engine/FLUSH")
		})
	}
}
