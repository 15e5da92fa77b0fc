package encryption

import (
	"bytes"
	"context"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
	"github.com/blockd/blockd/pipeline"
)

func newStage(t testing.TB) *Stage {
	s, err := NewStage(NewDataKey())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// through puts a new stage in front of e.
func through(t testing.TB, e ioengine.Engine) (*enginetest.Through, *Stage) {
	s := newStage(t)
	return &enginetest.Through{Engine: e, H: pipeline.Chain(ioengine.Handler(e), s.Wrap)}, s
}

// lent puts a new stage in front of a memory engine of size bytes the way
// the daemon does: writes are encrypted straight into the engine's memory
// (LendWrites) and reads offer to be answered by reference (FlagRef).
func lent(t testing.TB, size int64) (*enginetest.Through, *Stage) {
	m := memory(t, size)
	e, s := through(t, m)
	s.LendWrites(m.(WriteLender))
	e.Ref = true
	return e, s
}

func memory(t testing.TB, size int64) ioengine.Engine {
	e, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func file(t testing.TB, size int64) ioengine.Engine {
	e, err := ioengine.OpenFileWith(filepath.Join(t.TempDir(), "vol.img"), size, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// The shared engine suite (byte-granular writes, trims and zeroing at
// any offset, concurrency, holes in the map) passes through the stage, on
// both engines.
func TestEngineSuite(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
			e, _ := through(t, memory(t, size))
			return e
		})
	})
	t.Run("memory-lent", func(t *testing.T) {
		enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
			e, _ := lent(t, size)
			return e
		})
	})
	t.Run("file", func(t *testing.T) {
		enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
			e, _ := through(t, file(t, size))
			return e
		})
	})
}

// What reaches the engine is ciphertext: a plaintext pattern written
// through the stage appears nowhere in it, and reads back intact.
// The same holds when writes are encrypted into the engine's memory
// (aligned ones, in one chunk and across two) and reads are decrypted
// from it.
func TestEngineHoldsCiphertext(t *testing.T) {
	t.Run("copied", func(t *testing.T) {
		raw := memory(t, 4<<20)
		e, _ := through(t, raw)
		holdsCiphertext(t, raw, e, 12345)
	})
	t.Run("lent", func(t *testing.T) {
		e, _ := lent(t, 4<<20)
		holdsCiphertext(t, e.Engine, e, 1<<20)
		holdsCiphertext(t, e.Engine, e, 2<<20-8192)
	})
}

func holdsCiphertext(t *testing.T, raw, e ioengine.Engine, off int64) {
	const size = 4 << 20
	pat := bytes.Repeat([]byte("PLAINTEXT-PATTERN-"), 4096)
	if _, err := e.WriteAt(pat, off); err != nil {
		t.Fatal(err)
	}
	all := make([]byte, size)
	if _, err := raw.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(all, []byte("PLAINTEXT-PATTERN-")) {
		t.Fatal("the plaintext pattern is in the engine")
	}
	got := make([]byte, len(pat))
	if _, err := e.ReadAt(got, off); err != nil || !bytes.Equal(got, pat) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, pat))
	}
}

// Holes are not decrypted: never-written, trimmed and zeroed ranges read
// as zeroes, trims punch the engine's holes (the map still shows them),
// and WRITE_ZEROES that keep the range allocated read as zeroes too.
func TestHoles(t *testing.T) {
	const size = 8 << 20
	raw := file(t, size)
	e, _ := through(t, raw)
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	for _, off := range []int64{0, 2 << 20, 4 << 20} {
		if _, err := e.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Trim(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteZeroes(2<<20, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteZeroes(4<<20, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := e.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, size)) {
		t.Fatal("trimmed, zeroed or never-written ranges do not read as zeroes")
	}
	ext, err := e.Map(make([]pipeline.Extent, 0, 8), 0, 1<<20)
	if err != nil || len(ext) != 1 || !ext[0].Hole {
		t.Fatalf("a trimmed MiB maps as %+v, %v; want a hole", ext, err)
	}
	ext, err = e.Map(make([]pipeline.Extent, 0, 8), 6<<20, 2<<20)
	if err != nil || len(ext) != 1 || !ext[0].Hole {
		t.Fatalf("never-written range maps as %+v, %v; want a hole", ext, err)
	}
}

// model is a volume's expected plaintext.
type model struct {
	mu sync.Mutex
	b  []byte
}

// Random reads, writes, trims and write-zeroes at any offset and length
// (unaligned ones included) against a model.
func TestRandomOps(t *testing.T) {
	const size = 2 << 20
	for _, seed := range []uint64{1, 2, 3} {
		e, s := through(t, memory(t, size))
		if seed == 3 {
			e, s = lent(t, size)
		}
		randomOps(t, e, rand.New(rand.NewPCG(seed, 7)), size, 400)
		if s.RMWs() == 0 {
			t.Fatal("no partial block was re-encrypted: the test did not exercise read-modify-write")
		}
	}
}

func randomOps(t testing.TB, e ioengine.Engine, rng *rand.Rand, size int64, ops int) {
	m := make([]byte, size)
	for i := 0; i < ops; i++ {
		var off, n int64
		switch rng.IntN(3) {
		case 0: // aligned
			off = rng.Int64N(size/BlockSize) * BlockSize
			n = (1 + rng.Int64N(16)) * BlockSize
		case 1: // 512-byte sectors
			off = rng.Int64N(size/512) * 512
			n = (1 + rng.Int64N(40)) * 512
		default: // bytes
			off = rng.Int64N(size)
			n = 1 + rng.Int64N(20000)
		}
		n = min(n, size-off)
		if n == 0 {
			continue
		}
		switch rng.IntN(5) {
		case 0, 1:
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			if _, err := e.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(m[off:], p)
		case 2:
			if err := e.Trim(off, n); err != nil {
				t.Fatal(err)
			}
			clear(m[off : off+n])
		case 3:
			if err := e.WriteZeroes(off, n, rng.IntN(2) == 0); err != nil {
				t.Fatal(err)
			}
			clear(m[off : off+n])
		default:
			p := make([]byte, n)
			if _, err := e.ReadAt(p, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, m[off:off+n]) {
				t.Fatalf("op %d: read of %d bytes at %d differs from the model", i, n, off)
			}
		}
	}
	all := make([]byte, size)
	if _, err := e.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(all, m) {
		t.Fatal("the volume differs from the model")
	}
}

// FuzzRoundTrip: a write of any length at any offset reads back, and so
// do the bytes around it that it did not cover.
func FuzzRoundTrip(f *testing.F) {
	f.Add(int64(0), uint32(4096), uint64(1))
	f.Add(int64(511), uint32(1), uint64(2))
	f.Add(int64(4095), uint32(4098), uint64(3))
	f.Add(int64(8192+100), uint32(3*4096), uint64(4))
	f.Add(int64(1<<20-1), uint32(2), uint64(5))
	const size = 1 << 20
	e, _ := through(f, memory(f, size))
	base := bytes.Repeat([]byte{0x5a}, size)
	if _, err := e.WriteAt(base, 0); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, off int64, n uint32, seed uint64) {
		if off < 0 || off >= size || n == 0 {
			return
		}
		n = min(n, uint32(size-off), 64<<10)
		p := make([]byte, n)
		rng := rand.New(rand.NewPCG(seed, seed))
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		lo, hi := alignDown(off)-BlockSize, alignUp(off+int64(n))+BlockSize
		lo, hi = max(lo, 0), min(hi, size)
		before := make([]byte, hi-lo)
		if _, err := e.ReadAt(before, lo); err != nil {
			t.Fatal(err)
		}
		if _, err := e.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		after := make([]byte, hi-lo)
		if _, err := e.ReadAt(after, lo); err != nil {
			t.Fatal(err)
		}
		copy(before[off-lo:], p)
		if !bytes.Equal(before, after) {
			t.Fatalf("write of %d bytes at %d: the range or its neighbours read back wrong", n, off)
		}
	})
}

// Concurrent unaligned writes into the same blocks, each writer owning
// its bytes, and aligned readers: no write is lost to another's
// read-modify-write, and no read sees a torn block.
func TestConcurrentRMW(t *testing.T) {
	const size = 64 << 10
	t.Run("copied", func(t *testing.T) {
		e, _ := through(t, memory(t, size))
		concurrentRMW(t, e, size)
	})
	t.Run("lent", func(t *testing.T) {
		e, _ := lent(t, size)
		concurrentRMW(t, e, size)
	})
}

func concurrentRMW(t *testing.T, e ioengine.Engine, size int64) {
	const writers = 8
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 300 {
				// Writer w owns bytes [w*512, w*512+512) of every block.
				blk := int64(i) % (size / BlockSize)
				p := bytes.Repeat([]byte{byte(w + 1)}, 512)
				if _, err := e.WriteAt(p, blk*BlockSize+int64(w)*512); err != nil {
					t.Error(err)
					return
				}
				q := make([]byte, 512)
				if _, err := e.ReadAt(q, blk*BlockSize+int64(w)*512); err != nil || !bytes.Equal(p, q) {
					t.Errorf("writer %d lost its write at block %d: %v", w, blk, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	all := make([]byte, size)
	if _, err := e.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	for off := range all {
		if want := byte(off%BlockSize/512 + 1); all[off] != want {
			t.Fatalf("byte %d = %d, want %d", off, all[off], want)
		}
	}
}

// The frontend's buffer is never changed by a write, and a read asking
// for a reference gets its data in Buf.
func TestBuffers(t *testing.T) {
	e, s := through(t, memory(t, 1<<20))
	_ = e
	p := bytes.Repeat([]byte{3}, 8192)
	r := pipeline.Request{Op: pipeline.OpWrite, Offset: 4096, Length: 8192, Buf: p}
	h := pipeline.Chain(ioengine.Handler(e.Engine), s.Wrap)
	if err := h.Handle(context.Background(), &r); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, bytes.Repeat([]byte{3}, 8192)) {
		t.Fatal("the write's buffer was changed")
	}
	got := make([]byte, 8192)
	r = pipeline.Request{Op: pipeline.OpRead, Flags: pipeline.FlagRef, Offset: 4096, Length: 8192, Buf: got, Ref: make([][]byte, 0, 4)}
	if err := h.Handle(context.Background(), &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Ref) != 0 || !bytes.Equal(got, p) {
		t.Fatalf("read by reference: %d refs, data equal %v", len(r.Ref), bytes.Equal(got, p))
	}
}

// The db profile's page-cache writes pass the stage too: aligned ones
// encrypted into the page cache, unaligned ones by read-modify-write; the
// engine holds ciphertext and everything reads back through the stage.
func TestCached(t *testing.T) {
	raw := file(t, 1<<20)
	e, s := through(t, raw)
	cw, ok := raw.(CachedWriter)
	if !ok {
		t.Skip("the file engine has no page-cache write path")
	}
	c := s.Cached(cw)
	pat := bytes.Repeat([]byte("CACHED-PLAINTEXT"), 1024)
	if _, err := c.WriteAtCached(pat, 8192); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAtCached(pat[:1000], 100); err != nil {
		t.Fatal(err)
	}
	if err := c.DropCache(); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 1<<20)
	copy(want[8192:], pat)
	copy(want[100:], pat[:1000])
	got := make([]byte, 1<<20)
	if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back through the stage: %v, equal %v", err, bytes.Equal(got, want))
	}
	if _, err := raw.ReadAt(got, 0); err != nil || bytes.Contains(got, []byte("CACHED-PLAINTEXT")) {
		t.Fatalf("plaintext in the engine (%v)", err)
	}
}

// A read answered by reference is decrypted from the lent pieces into
// Buf, and Ref comes back empty, whether the pieces are whole blocks or
// not (another engine may split them anywhere).
func TestReadRefPieces(t *testing.T) {
	raw := memory(t, 1<<20)
	key := NewDataKey()
	w, err := NewStage(key)
	if err != nil {
		t.Fatal(err)
	}
	pat := bytes.Repeat([]byte("REF-PIECES-"), 3*BlockSize/11+1)[:3*BlockSize]
	wh := pipeline.Chain(ioengine.Handler(raw), w.Wrap)
	if err := wh.Handle(context.Background(), &pipeline.Request{Op: pipeline.OpWrite, Offset: 8192, Length: 3 * BlockSize, Buf: pat}); err != nil {
		t.Fatal(err)
	}
	for _, cuts := range [][]int{{BlockSize, 2 * BlockSize}, {100, 8092, 4096}, {3 * BlockSize}} {
		// The next handler lends the ciphertext in pieces of these sizes.
		lender := pipeline.HandlerFunc(func(_ context.Context, r *pipeline.Request) error {
			ct := make([]byte, r.Length)
			if _, err := raw.ReadAt(ct, r.Offset); err != nil {
				return err
			}
			for _, c := range cuts {
				r.Ref, ct = append(r.Ref, ct[:c]), ct[c:]
			}
			return nil
		})
		s, err := NewStage(key)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 3*BlockSize)
		r := pipeline.Request{Op: pipeline.OpRead, Flags: pipeline.FlagRef, Offset: 8192, Length: 3 * BlockSize, Buf: got, Ref: make([][]byte, 0, 4)}
		if err := pipeline.Chain(lender, s.Wrap).Handle(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
		if len(r.Ref) != 0 || !bytes.Equal(got, pat) {
			t.Fatalf("pieces %v: %d refs left, data equal %v", cuts, len(r.Ref), bytes.Equal(got, pat))
		}
	}
}
