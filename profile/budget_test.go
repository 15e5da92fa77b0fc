package profile

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/pipeline"
)

const tokBlock = 4096

// tokenStore is a volume that keeps one token per 4 KiB block and reads a
// block as its token repeated: 8 bytes of memory per block, so hundreds
// of volumes fit in a test. Requests must be block aligned.
type tokenStore struct {
	mu  sync.RWMutex
	tok []uint64
}

func newTokenStore(size int64) *tokenStore {
	return &tokenStore{tok: make([]uint64, size/tokBlock)}
}

func (ts *tokenStore) size() int64 { return int64(len(ts.tok)) * tokBlock }

func fillToken(b []byte, tok uint64) {
	binary.LittleEndian.PutUint64(b, tok)
	for n := 8; n < len(b); n *= 2 {
		copy(b[n:], b[:n])
	}
}

func (ts *tokenStore) Handle(_ context.Context, r *pipeline.Request) error {
	if r.Offset%tokBlock != 0 || r.Length%tokBlock != 0 {
		return pipeline.ErrMisaligned
	}
	if r.Offset < 0 || r.End() > ts.size() {
		return pipeline.ErrOutOfRange
	}
	first, n := int(r.Offset/tokBlock), int(r.Length/tokBlock)
	switch r.Op {
	case pipeline.OpRead:
		ts.mu.RLock()
		for i := 0; i < n; i++ {
			fillToken(r.Buf[i*tokBlock:(i+1)*tokBlock], ts.tok[first+i])
		}
		ts.mu.RUnlock()
	case pipeline.OpWrite:
		ts.mu.Lock()
		for i := 0; i < n; i++ {
			ts.tok[first+i] = binary.LittleEndian.Uint64(r.Buf[i*tokBlock:])
		}
		ts.mu.Unlock()
	case pipeline.OpTrim, pipeline.OpWriteZeroes:
		ts.mu.Lock()
		clear(ts.tok[first : first+n])
		ts.mu.Unlock()
	}
	return nil
}

// checkTokens reports the first block of buf (read at off) that is not
// model's token repeated.
func checkTokens(buf []byte, off int64, model []uint64) error {
	var want [tokBlock]byte
	for b := 0; b < len(buf)/tokBlock; b++ {
		tok := model[int(off/tokBlock)+b]
		fillToken(want[:], tok)
		if got := buf[b*tokBlock : (b+1)*tokBlock]; string(got) != string(want[:]) {
			return fmt.Errorf("block %d: token %d, want %d", int(off/tokBlock)+b, binary.LittleEndian.Uint64(got), tok)
		}
	}
	return nil
}

// 200 sequential stages share a 64 MiB budget (each alone would hold up to
// 32 MiB of prefetch and 8 MiB of write-back) under sequential reads and
// small writes at once: the stages together never hold more than the
// budget, though it runs out, and every read returns the data last written.
// Once the load stops, every stage gives its memory back within seconds
// (the idle release, at its real 2 s), and the data is still right.
func TestBudgetSharedByStages(t *testing.T) {
	const (
		stages = 200
		size   = 16 << 20
		limit  = 64 << 20
		ops    = 400 // per stage
		rd     = 128 << 10
	)
	budget := NewBudget(limit)
	type vol struct {
		st    *Stage
		h     pipeline.Handler
		model []uint64
	}
	vols := make([]vol, stages)
	for i := range vols {
		ts := newTokenStore(size)
		st := New(Sequential, Options{Size: ts.size, Budget: budget})
		vols[i] = vol{st: st, h: st.Wrap(ts), model: make([]uint64, size/tokBlock)}
		defer st.Close()
	}
	ctx := context.Background()
	deadline := time.Now().Add(3 * time.Second)
	var (
		wg     sync.WaitGroup
		failed atomic.Bool
	)
	for i := range vols {
		wg.Go(func() {
			v := &vols[i]
			rng := rand.New(rand.NewPCG(uint64(i), 3))
			buf := make([]byte, rd)
			pos := rng.Int64N(size/rd) * rd
			for op := 0; op < ops && !failed.Load() && time.Now().Before(deadline); op++ {
				var err error
				switch k := rng.IntN(16); {
				case k < 4: // a small write, now and then FUA
					n := int64(1+rng.IntN(4)) * tokBlock
					off := rng.Int64N((size-n)/tokBlock) * tokBlock
					tok := uint64(i+1)<<32 | uint64(op+1)
					fillToken(buf[:n], tok)
					r := pipeline.Request{Op: pipeline.OpWrite, Offset: off, Length: uint32(n), Buf: buf[:n]}
					if k == 0 {
						r.Flags = pipeline.FlagFUA
					}
					if err = v.h.Handle(ctx, &r); err == nil {
						for b := off / tokBlock; b < (off+n)/tokBlock; b++ {
							v.model[b] = tok
						}
					}
				case k == 4:
					err = v.h.Handle(ctx, &pipeline.Request{Op: pipeline.OpFlush})
				default: // the stream
					r := pipeline.Request{Op: pipeline.OpRead, Offset: pos, Length: rd, Buf: buf}
					if err = v.h.Handle(ctx, &r); err == nil {
						err = checkTokens(buf, pos, v.model)
					}
					pos = (pos + rd) % size
				}
				if err != nil {
					t.Errorf("stage %d op %d: %v", i, op, err)
					failed.Store(true)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	var hits, buffered uint64
	for _, v := range vols {
		s := v.st.Stats()
		hits += s.PrefetchHitBytes
		buffered += s.BufferedWrites
	}
	bs := budget.Stats()
	t.Logf("budget %+v; prefetch hits %d MiB, buffered writes %d", bs, hits>>20, buffered)
	if bs.HighWater > limit {
		t.Errorf("the stages held %d bytes at once, over the budget of %d", bs.HighWater, limit)
	}
	if bs.Denials == 0 || hits == 0 || buffered == 0 {
		t.Errorf("the budget was never short, or the cache or buffer never used: the test proves nothing (denials %d, hits %d, buffered writes %d)", bs.Denials, hits, buffered)
	}

	// Idle: everything goes back, within about idleRelease.
	start := time.Now()
	for {
		held := int64(0)
		for _, v := range vols {
			held += v.st.Stats().MemoryBytes
		}
		if in := budget.Stats().InUse; in == 0 && held == 0 {
			break
		} else if time.Since(start) > 5*time.Second {
			t.Fatalf("5s after the load stopped the stages still hold %d bytes (budget in use %d)", held, in)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("all memory returned %v after the load stopped", time.Since(start).Round(10*time.Millisecond))
	buf := make([]byte, rd)
	rng := rand.New(rand.NewPCG(1, 2))
	for i, v := range vols {
		for range 4 {
			off := rng.Int64N(size/rd) * rd
			r := pipeline.Request{Op: pipeline.OpRead, Offset: off, Length: rd, Buf: buf}
			if err := v.h.Handle(ctx, &r); err != nil {
				t.Fatal(err)
			}
			if err := checkTokens(buf, off, v.model); err != nil {
				t.Fatalf("stage %d after the release: %v", i, err)
			}
		}
	}
}

// Writes of every size the write-back buffer takes, at every alignment,
// over a buffer full of extents of every length, with a budget that runs
// out: each write is buffered whole or written through whole, reads see
// the data last written, and the buffer never takes more than the budget
// (put secures the one new slab a write can need before it starts).
func TestWriteBackWithinBudget(t *testing.T) {
	const size = 4 << 20
	limit := int64(drainMax + 12*slabSize)
	budget := NewBudget(limit)
	mem := newByteStore(size)
	opts := Options{Size: func() int64 { return size }, Budget: budget, WriteBackAge: time.Hour}
	st := New(Sequential, opts)
	h := st.Wrap(mem)
	defer st.Close()
	ctx := context.Background()
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(4, 5))
	buf := make([]byte, maxBuffered)
	const ops = 3000
	for i := 0; i < ops; i++ {
		n := 1 + rng.IntN(maxBuffered)
		if rng.IntN(3) == 0 {
			n = 1 + rng.IntN(8192)
		}
		off := rng.Int64N(size - int64(n))
		if rng.IntN(2) == 0 {
			off = rng.Int64N(size/slabSize) * slabSize / 2 // near slab edges
			off = min(off, size-int64(n))
		}
		if rng.IntN(4) == 0 {
			r := pipeline.Request{Op: pipeline.OpRead, Offset: off, Length: uint32(n), Buf: buf[:n]}
			if err := h.Handle(ctx, &r); err != nil {
				t.Fatal(err)
			}
			if string(buf[:n]) != string(model[off:off+int64(n)]) {
				t.Fatalf("op %d: read of %d bytes at %d differs from the model", i, n, off)
			}
			continue
		}
		for j := range buf[:min(n, 512)] {
			buf[j] = byte(rng.Uint32())
		}
		for k := 512; k < n; k *= 2 {
			copy(buf[k:n], buf[:k])
		}
		r := pipeline.Request{Op: pipeline.OpWrite, Offset: off, Length: uint32(n), Buf: buf[:n]}
		if err := h.Handle(ctx, &r); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], buf[:n])
		if rng.IntN(50) == 0 {
			if err := h.Handle(ctx, &pipeline.Request{Op: pipeline.OpFlush}); err != nil {
				t.Fatal(err)
			}
		}
	}
	bs := budget.Stats()
	t.Logf("budget %+v, buffered writes %d of %d ops", bs, st.Stats().BufferedWrites, ops)
	if bs.HighWater > limit {
		t.Errorf("the write-back buffer held %d bytes, over its budget of %d", bs.HighWater, limit)
	}
	if st.Stats().BufferedWrites == 0 || bs.Denials == 0 {
		t.Errorf("buffered %d writes, %d denials: want both", st.Stats().BufferedWrites, bs.Denials)
	}
	got := make([]byte, size)
	for off := int64(0); off < size; off += maxBuffered {
		r := pipeline.Request{Op: pipeline.OpRead, Offset: off, Length: maxBuffered, Buf: got[off : off+maxBuffered]}
		if err := h.Handle(ctx, &r); err != nil {
			t.Fatal(err)
		}
	}
	if string(got) != string(model) {
		t.Fatal("the volume differs from the model")
	}
}

// byteStore is a plain in-memory volume for any alignment.
type byteStore struct {
	mu   sync.RWMutex
	data []byte
}

func newByteStore(size int64) *byteStore { return &byteStore{data: make([]byte, size)} }

func (b *byteStore) Handle(_ context.Context, r *pipeline.Request) error {
	if r.Offset < 0 || r.End() > int64(len(b.data)) {
		return pipeline.ErrOutOfRange
	}
	switch r.Op {
	case pipeline.OpRead:
		b.mu.RLock()
		copy(r.Buf[:r.Length], b.data[r.Offset:])
		b.mu.RUnlock()
	case pipeline.OpWrite:
		b.mu.Lock()
		copy(b.data[r.Offset:r.End()], r.Buf[:r.Length])
		b.mu.Unlock()
	case pipeline.OpTrim, pipeline.OpWriteZeroes:
		b.mu.Lock()
		clear(b.data[r.Offset:r.End()])
		b.mu.Unlock()
	}
	return nil
}
