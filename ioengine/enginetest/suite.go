// Package enginetest is the suite every ioengine.Engine must pass. An
// engine's own tests call Run with a constructor.
package enginetest

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// New makes a fresh, zero-filled engine of size bytes for one subtest.
type New func(t *testing.T, size int64) ioengine.Engine

const size = 8 << 20

// Run runs the suite against engines made by newEngine.
func Run(t *testing.T, newEngine New) {
	t.Run("ZeroFilled", func(t *testing.T) {
		e := newEngine(t, size)
		buf := bytes.Repeat([]byte{0xff}, 64<<10)
		mustRead(t, e, buf, size-int64(len(buf)))
		if !allZero(buf) {
			t.Fatal("a new engine does not read back zeroes")
		}
	})
	t.Run("WriteReadBack", func(t *testing.T) {
		e := newEngine(t, size)
		rng := rand.New(rand.NewPCG(1, 2))
		model := make([]byte, size)
		for i := 0; i < 200; i++ {
			n := 1 + rng.IntN(300<<10)
			off := rng.Int64N(size - int64(n))
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			if w, err := e.WriteAt(p, off); err != nil || w != n {
				t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", n, off, w, err)
			}
			copy(model[off:], p)
		}
		got := make([]byte, size)
		mustRead(t, e, got, 0)
		if !bytes.Equal(got, model) {
			t.Fatal("data read back differs from data written")
		}
	})
	t.Run("OutOfRange", func(t *testing.T) {
		e := newEngine(t, size)
		p := make([]byte, 4096)
		for _, off := range []int64{-1, size - 4095, size, size + 4096} {
			if _, err := e.WriteAt(p, off); !errors.Is(err, pipeline.ErrOutOfRange) {
				t.Errorf("WriteAt at %d: err = %v, want ErrOutOfRange", off, err)
			}
			if _, err := e.ReadAt(p, off); !errors.Is(err, pipeline.ErrOutOfRange) {
				t.Errorf("ReadAt at %d: err = %v, want ErrOutOfRange", off, err)
			}
		}
		if err := e.Trim(size-4096, 8192); !errors.Is(err, pipeline.ErrOutOfRange) {
			t.Errorf("Trim past end: err = %v, want ErrOutOfRange", err)
		}
		if err := e.WriteZeroes(size, 1, false); !errors.Is(err, pipeline.ErrOutOfRange) {
			t.Errorf("WriteZeroes past end: err = %v, want ErrOutOfRange", err)
		}
		if e.Size() != size {
			t.Errorf("Size after refused I/O = %d, want %d", e.Size(), size)
		}
	})
	for _, tc := range []struct {
		name string
		op   func(e ioengine.Engine, off, n int64) error
	}{
		{"Trim", func(e ioengine.Engine, off, n int64) error { return e.Trim(off, n) }},
		{"WriteZeroesHole", func(e ioengine.Engine, off, n int64) error { return e.WriteZeroes(off, n, false) }},
		{"WriteZeroesNoHole", func(e ioengine.Engine, off, n int64) error { return e.WriteZeroes(off, n, true) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEngine(t, size)
			data := bytes.Repeat([]byte{0xa5}, 4<<20)
			if _, err := e.WriteAt(data, 1<<20); err != nil {
				t.Fatal(err)
			}
			// An unaligned range inside, and a chunk-aligned one.
			for _, r := range [][2]int64{{1<<20 + 100, 5000}, {2 << 20, 2 << 20}} {
				if err := tc.op(e, r[0], r[1]); err != nil {
					t.Fatalf("%s(%d, %d): %v", tc.name, r[0], r[1], err)
				}
			}
			got := make([]byte, len(data))
			mustRead(t, e, got, 1<<20)
			for i, b := range got {
				off := int64(i) + 1<<20
				zeroed := (off >= 1<<20+100 && off < 1<<20+5100) || (off >= 2<<20 && off < 4<<20)
				if zeroed && b != 0 || !zeroed && b != 0xa5 {
					t.Fatalf("byte at %d = %#x after %s (zeroed range: %v)", off, b, tc.name, zeroed)
				}
			}
		})
	}
	t.Run("Flush", func(t *testing.T) {
		e := newEngine(t, size)
		if _, err := e.WriteAt([]byte("durable"), 0); err != nil {
			t.Fatal(err)
		}
		if err := e.Flush(); err != nil {
			t.Fatalf("Flush: %v", err)
		}
	})
	t.Run("Grow", func(t *testing.T) {
		e := newEngine(t, size)
		if _, err := e.WriteAt([]byte("keep"), size-4); err != nil {
			t.Fatal(err)
		}
		if err := e.Resize(2 * size); err != nil {
			t.Fatalf("Resize: %v", err)
		}
		if e.Size() != 2*size {
			t.Fatalf("Size after grow = %d", e.Size())
		}
		p := make([]byte, 8)
		mustRead(t, e, p, size-4)
		if string(p) != "keep\x00\x00\x00\x00" {
			t.Fatalf("after grow read %q", p)
		}
		if _, err := e.WriteAt([]byte("tail"), 2*size-4); err != nil {
			t.Fatalf("write in grown space: %v", err)
		}
	})
	t.Run("Concurrent", func(t *testing.T) {
		e := newEngine(t, size)
		const workers, per = 8, 200
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Each worker owns a disjoint stripe, so the end state is known.
				p := bytes.Repeat([]byte{byte(w + 1)}, 4096)
				q := make([]byte, 4096)
				for i := 0; i < per; i++ {
					off := int64((i*workers+w)%(size/4096)) * 4096
					if _, err := e.WriteAt(p, off); err != nil {
						t.Error(err)
						return
					}
					if _, err := e.ReadAt(q, off); err != nil || !bytes.Equal(p, q) {
						t.Errorf("worker %d: read back mismatch at %d: %v", w, off, err)
						return
					}
				}
			}()
		}
		wg.Wait()
	})
	t.Run("HandlerOps", func(t *testing.T) {
		e := newEngine(t, size)
		h := ioengine.Handler(e)
		buf := bytes.Repeat([]byte{7}, 8192)
		do := func(r pipeline.Request) error { return h.Handle(t.Context(), &r) }
		if err := do(pipeline.Request{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Offset: 4096, Length: 8192, Buf: buf}); err != nil {
			t.Fatalf("FUA write: %v", err)
		}
		if err := do(pipeline.Request{Op: pipeline.OpFlush}); err != nil {
			t.Fatalf("flush: %v", err)
		}
		if err := do(pipeline.Request{Op: pipeline.OpCache, Offset: 0, Length: 4096}); err != nil {
			t.Fatalf("cache: %v", err)
		}
		if err := do(pipeline.Request{Op: pipeline.OpWriteZeroes, Offset: 4096, Length: 4096, Flags: pipeline.FlagNoHole}); err != nil {
			t.Fatalf("write zeroes: %v", err)
		}
		got := make([]byte, 8192)
		if err := do(pipeline.Request{Op: pipeline.OpRead, Offset: 4096, Length: 8192, Buf: got}); err != nil {
			t.Fatalf("read: %v", err)
		}
		if !allZero(got[:4096]) || !bytes.Equal(got[4096:], buf[4096:]) {
			t.Fatal("read after write+write_zeroes returned wrong data")
		}
		if err := do(pipeline.Request{Op: pipeline.OpRead, Offset: size - 4096, Length: 8192, Buf: got}); !errors.Is(err, pipeline.ErrOutOfRange) {
			t.Fatalf("read past end: %v, want ErrOutOfRange", err)
		}
		if err := do(pipeline.Request{Op: pipeline.Op(99)}); !errors.Is(err, pipeline.ErrNotSupported) {
			t.Fatalf("unknown op: %v, want ErrNotSupported", err)
		}
	})
	t.Run("Map", func(t *testing.T) {
		e := newEngine(t, size)
		m, ok := e.(pipeline.Mapper)
		if !ok {
			// Not every engine can tell holes from data; the frontends
			// then report everything as data.
			return
		}
		const mib = 1 << 20
		ext := mapAll(t, m, 0, size)
		if len(ext) != 1 || !ext[0].Hole {
			t.Fatalf("fresh engine maps as %+v, want one hole of %d bytes", ext, size)
		}
		data := bytes.Repeat([]byte{9}, mib)
		if _, err := e.WriteAt(data, 2*mib); err != nil {
			t.Fatal(err)
		}
		if _, err := e.WriteAt(data[:100], 6*mib+100); err != nil {
			t.Fatal(err)
		}
		if cw, ok := e.(ioengine.CachedWriter); ok {
			// A write that is only in the page cache is data too.
			if _, err := cw.WriteAtCached(data[:4096], 5*mib); err != nil {
				t.Fatal(err)
			}
		}
		ext = mapAll(t, m, 0, size)
		for _, r := range [][2]int64{{2 * mib, 3 * mib}, {6*mib + 100, 6*mib + 200}} {
			if holeIn(ext, 0, r[0], r[1]) {
				t.Errorf("written range [%d, %d) is reported as a hole: %+v", r[0], r[1], ext)
			}
		}
		if _, ok := e.(ioengine.CachedWriter); ok && holeIn(ext, 0, 5*mib, 5*mib+4096) {
			t.Errorf("range written through the page cache is reported as a hole: %+v", ext)
		}
		for _, r := range [][2]int64{{0, mib}, {3 * mib, 4 * mib}, {7 * mib, 8 * mib}} {
			if !holeIn(ext, 0, r[0], r[1]) || dataIn(ext, 0, r[0], r[1]) {
				t.Errorf("range [%d, %d), never written, is not reported as a hole: %+v", r[0], r[1], ext)
			}
		}
		// A query from the middle of a run starts there.
		if got := mapAll(t, m, 2*mib+4096, 4096); len(got) != 1 || got[0].Hole || got[0].Length != 4096 {
			t.Errorf("Map of 4 KiB inside written data = %+v", got)
		}
		// Room for one extent: one extent, a prefix of the range.
		one, err := m.Map(make([]pipeline.Extent, 0, 1), 0, size)
		if err != nil || len(one) != 1 || !one[0].Hole || one[0].Length != 2*mib {
			t.Errorf("Map with room for one extent = %+v, %v; want the 2 MiB hole", one, err)
		}
		if err := e.Trim(2*mib, mib); err != nil {
			t.Fatal(err)
		}
		ext = mapAll(t, m, 0, size)
		if dataIn(ext, 0, 2*mib, 3*mib) {
			t.Errorf("trimmed range [2 MiB, 3 MiB) still maps as data: %+v", ext)
		}
		if _, err := m.Map(nil, size-4096, 8192); !errors.Is(err, pipeline.ErrOutOfRange) {
			t.Errorf("Map past the end: %v, want ErrOutOfRange", err)
		}
	})
}

// mapAll maps [off, off+n) with room for every extent and checks that the
// extents are non-empty and cover the range exactly.
func mapAll(t *testing.T, m pipeline.Mapper, off, n int64) []pipeline.Extent {
	t.Helper()
	ext, err := m.Map(make([]pipeline.Extent, 0, 1024), off, n)
	if err != nil {
		t.Fatalf("Map(%d, %d): %v", off, n, err)
	}
	var sum int64
	for i, x := range ext {
		if x.Length <= 0 {
			t.Fatalf("Map(%d, %d): extent %d is empty: %+v", off, n, i, ext)
		}
		if i > 0 && ext[i-1].Hole == x.Hole {
			t.Fatalf("Map(%d, %d): extents %d and %d are of one kind, not merged: %+v", off, n, i-1, i, ext)
		}
		sum += x.Length
	}
	if sum != n {
		t.Fatalf("Map(%d, %d): extents cover %d bytes: %+v", off, n, sum, ext)
	}
	return ext
}

// holeIn and dataIn report whether extents that start at base have a hole
// (data) overlapping [lo, hi).
func holeIn(ext []pipeline.Extent, base, lo, hi int64) bool { return kindIn(ext, base, lo, hi, true) }
func dataIn(ext []pipeline.Extent, base, lo, hi int64) bool { return kindIn(ext, base, lo, hi, false) }

func kindIn(ext []pipeline.Extent, base, lo, hi int64, hole bool) bool {
	off := base
	for _, x := range ext {
		if x.Hole == hole && off < hi && off+x.Length > lo {
			return true
		}
		off += x.Length
	}
	return false
}

func mustRead(t *testing.T, e ioengine.Engine, p []byte, off int64) {
	t.Helper()
	if n, err := e.ReadAt(p, off); err != nil || n != len(p) {
		t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", len(p), off, n, err)
	}
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
