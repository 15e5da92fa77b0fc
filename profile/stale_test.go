package profile

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// yieldingReads is a next handler whose reads yield the processor before
// they reach the engine, so that writes land while prefetch reads are in
// flight. It tells loaded (if there is room) where each whole-segment read,
// a prefetch, was done, so that writers can aim at what was just loaded.
type yieldingReads struct {
	next   pipeline.Handler
	loaded chan int64
}

func (y yieldingReads) Handle(ctx context.Context, r *pipeline.Request) error {
	if r.Op != pipeline.OpRead {
		return y.next.Handle(ctx, r)
	}
	runtime.Gosched()
	err := y.next.Handle(ctx, r)
	if r.Length == segSize && r.Offset%segSize == 0 {
		select {
		case y.loaded <- r.Offset:
		default:
		}
	}
	return err
}

// A read never returns data older than a write that completed before the
// read started, while sequential readers keep the prefetcher busy and
// writers change the ranges it loads: small buffered writes (whose drains
// reach the engine later), FUA writes and trims. Every 4 KiB block holds
// one token repeated; tokens grow per block (each block has one writer),
// so "not older" is "not smaller than the token of the newest write to the
// block that completed before the read was issued", or zero after a trim
// issued since.
//
// The cache's handoff hook sleeps after each segment went to a worker, and
// writers mostly aim at the segment just loaded: together they stretch the
// moment between a worker reading a segment and schedule returning, which
// is where a segment handed over before it was visible to writers could
// miss their invalidation (a few instructions wide without the hook).
func TestPrefetchNeverStale(t *testing.T) {
	const (
		size    = 8 << 20
		block   = 4096
		blocks  = size / block
		stripe  = 16 // blocks a writer owns in a row
		writers = 3
		readers = 3
		maxOps  = 4000 // per goroutine
	)
	e, _ := ioengine.NewMemory(size)
	opts := testOptions(e)
	opts.CacheBytes = 4 << 20
	st := New(Sequential, opts)
	// Long enough for a worker to read the segment and a writer to
	// chase it (see yieldingReads) before schedule goes on.
	st.cache.handoff = func() { time.Sleep(200 * time.Microsecond) }
	loaded := make(chan int64, 16)
	h := st.Wrap(yieldingReads{ioengine.Handler(e), loaded})
	defer st.Close()

	var (
		token     atomic.Uint64
		completed [blocks]atomic.Uint64 // newest token acknowledged per block
		trimmed   [blocks]atomic.Uint64 // token of the newest trim issued per block
		failed    atomic.Bool
		wg        sync.WaitGroup
	)
	deadline := time.Now().Add(2 * time.Second)
	done := func() bool { return failed.Load() || time.Now().After(deadline) }
	ctx := context.Background()

	for w := 0; w < writers; w++ {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, stripe*block)
			for i := 0; i < maxOps && !done(); i++ {
				// A run of blocks in one of w's stripes: mostly in the
				// segment just prefetched (the write that must not be
				// lost), else anywhere.
				s := rng.IntN(blocks/stripe/writers)*writers + w
				fua := false
				select {
				case off := <-loaded:
					const perSeg = segSize / block / stripe
					base := int(off) / block / stripe
					s = base + (w-base%writers+writers)%writers + rng.IntN(perSeg/writers)*writers
					fua = true
				case <-time.After(time.Millisecond):
				}
				if s%writers != w {
					panic("a writer strayed out of its stripes")
				}
				first := s*stripe + rng.IntN(stripe)
				n := 1 + rng.IntN(stripe-first%stripe)
				tok := token.Add(1)
				for j := 0; j < n*block; j += 8 {
					binary.LittleEndian.PutUint64(buf[j:], tok)
				}
				r := pipeline.Request{Op: pipeline.OpWrite, Offset: int64(first) * block, Length: uint32(n * block), Buf: buf[:n*block]}
				switch k := rng.IntN(10); {
				case k < 3 || fua:
					r.Flags = pipeline.FlagFUA // written through, after a drain
				case k == 3:
					r.Op, r.Buf = pipeline.OpTrim, nil // reads as zeroes
					for b := first; b < first+n; b++ {
						trimmed[b].Store(tok)
					}
				}
				if err := h.Handle(ctx, &r); err != nil {
					t.Error(err)
					failed.Store(true)
					return
				}
				for b := first; b < first+n; b++ {
					completed[b].Store(tok)
				}
			}
		})
	}
	for rd := 0; rd < readers; rd++ {
		wg.Go(func() {
			const n = 128 << 10
			buf := make([]byte, n)
			floor := make([]uint64, n/block)
			pos := int64(rd) * size / readers &^ (n - 1)
			for i := 0; i < maxOps && !done(); i++ {
				first := int(pos / block)
				for b := range floor {
					floor[b] = completed[first+b].Load()
				}
				r := pipeline.Request{Op: pipeline.OpRead, Offset: pos, Length: n, Buf: buf}
				if err := h.Handle(ctx, &r); err != nil {
					t.Error(err)
					failed.Store(true)
					return
				}
				for b := range floor {
					blk := buf[b*block : (b+1)*block]
					got := binary.LittleEndian.Uint64(blk)
					for j := 8; j < block; j += 8 {
						if v := binary.LittleEndian.Uint64(blk[j:]); v != got {
							t.Errorf("block %d mixes tokens %d and %d", first+b, got, v)
							failed.Store(true)
							return
						}
					}
					// A block reads as zeroes after a trim that was
					// issued no earlier than the newest completed write.
					if got < floor[b] && !(got == 0 && trimmed[first+b].Load() >= floor[b]) {
						t.Errorf("read of block %d returned token %d, older than the completed write of token %d (prefetched %d bytes, hits %d)",
							first+b, got, floor[b], st.cache.prefetched.Load(), st.cache.hits.Load())
						failed.Store(true)
						return
					}
				}
				pos = (pos + n) % size
			}
		})
	}
	wg.Wait()
	if st.Stats().PrefetchHitBytes == 0 {
		t.Error("no read was served from the prefetch cache: the test did not exercise it")
	}
}
