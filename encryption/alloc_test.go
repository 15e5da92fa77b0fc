package encryption

import (
	"context"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// TestStageAllocs: aligned and unaligned reads and writes, trims and
// flushes through the stage allocate nothing once its pools are warm.
// (Run without -race too, by `make test`: the race detector makes
// sync.Pool drop items on purpose.)
func TestStageAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items: make test runs this without -race")
	}
	plain := pipeline.Chain(ioengine.Handler(memory(t, 8<<20)), newStage(t).Wrap)
	// As the daemon runs a memory volume: writes encrypted into the
	// engine's memory, reads offered by reference.
	m := memory(t, 8<<20)
	s := newStage(t)
	s.LendWrites(m.(WriteLender))
	lent := pipeline.Chain(ioengine.Handler(m), s.Wrap)
	t.Run("copied", func(t *testing.T) { stageAllocs(t, plain, 0) })
	t.Run("lent", func(t *testing.T) { stageAllocs(t, lent, pipeline.FlagRef) })
}

func stageAllocs(t *testing.T, h pipeline.Handler, readFlags pipeline.Flags) {
	buf := make([]byte, 256<<10)
	refs := make([][]byte, 0, 4)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		r    pipeline.Request
	}{
		{"write 4k", pipeline.Request{Op: pipeline.OpWrite, Offset: 4096, Length: 4096}},
		{"read 4k", pipeline.Request{Op: pipeline.OpRead, Offset: 4096, Length: 4096}},
		{"write 256k", pipeline.Request{Op: pipeline.OpWrite, Offset: 1 << 20, Length: 256 << 10}},
		{"read 256k", pipeline.Request{Op: pipeline.OpRead, Offset: 1 << 20, Length: 256 << 10}},
		{"write 512b unaligned", pipeline.Request{Op: pipeline.OpWrite, Offset: 512, Length: 512}},
		{"read 100b unaligned", pipeline.Request{Op: pipeline.OpRead, Offset: 4000, Length: 200}},
		{"trim unaligned", pipeline.Request{Op: pipeline.OpTrim, Offset: 1000, Length: 10000}},
		{"flush", pipeline.Request{Op: pipeline.OpFlush}},
	} {
		r := new(pipeline.Request)
		allocs := testing.AllocsPerRun(200, func() {
			*r = tc.r
			if r.Op == pipeline.OpRead || r.Op == pipeline.OpWrite {
				r.Buf = buf[:r.Length]
			}
			if r.Op == pipeline.OpRead {
				r.Flags, r.Ref = readFlags, refs[:0]
			}
			if err := h.Handle(ctx, r); err != nil {
				t.Fatal(err)
			}
		})
		if allocs > 0 {
			t.Errorf("%s: %.1f allocations per request, want 0", tc.name, allocs)
		}
	}
}

type nopCached struct{}

func (nopCached) WriteAtCached(p []byte, off int64) (int, error) { return len(p), nil }

// The db profile's page-cache writes through the stage allocate nothing.
func TestCachedAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items: make test runs this without -race")
	}
	c := newStage(t).Cached(nopCached{})
	buf := make([]byte, 64<<10)
	if allocs := testing.AllocsPerRun(200, func() {
		if _, err := c.WriteAtCached(buf, 4096); err != nil {
			t.Fatal(err)
		}
	}); allocs > 0 {
		t.Errorf("%.1f allocations per cached write, want 0", allocs)
	}
}

// A 4 KiB block and a 1 MiB run, encrypted and decrypted, allocate
// nothing on any implementation. The assembly has no pool, so it is
// checked under -race too; x/crypto/xts keeps its tweak buffers in a
// sync.Pool, so generic is checked by make test's run without -race.
func TestXTSAllocs(t *testing.T) {
	key := NewDataKey()
	for _, im := range impls {
		if im == implGeneric && raceEnabled {
			continue
		}
		x, err := newXTS(key, im)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []int{BlockSize, 1 << 20} {
			src, dst := make([]byte, n), make([]byte, n)
			src[0] = 1 // not a hole
			seq := uint64(1 << 40)
			runs := 100
			if n > BlockSize {
				runs = 10
			}
			for _, dec := range []bool{false, true} {
				allocs := testing.AllocsPerRun(runs, func() {
					if dec {
						x.DecryptBlocks(dst, src, seq)
					} else {
						x.EncryptBlocks(dst, src, seq)
					}
					seq++
				})
				if allocs > 0 {
					t.Errorf("%v: %.1f allocations per %d bytes (decrypt %v), want 0", im, allocs, n, dec)
				}
			}
		}
	}
}
