package profile

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blockd/blockd/pipeline"
)

// Concurrent writers on overlapping ranges (small buffered writes, large
// write-through ones, FUA), trims, flushes and readers. Every 4 KiB block
// a writer writes is one 8-byte stamp repeated, so a reader can tell a
// block that mixes two writes (a torn overlay, a stale prefetch glued to
// buffered data) from a whole one. At the end the stage and, after Close,
// the engine hold the same data.
func TestConcurrentOverlapping(t *testing.T) {
	const size = 2 << 20
	for _, p := range []Profile{Sequential, Auto, DB, None} {
		t.Run(p.String(), func(t *testing.T) {
			e := openFile(t, size)
			s := newStaged(t, e, p, testOptions(e))
			var wg sync.WaitGroup
			stop := make(chan struct{})
			for w := 0; w < 4; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 99))
					buf := make([]byte, 256<<10)
					for i := 0; i < 200; i++ {
						blocks := 1 + rng.IntN(8)
						if rng.IntN(10) == 0 {
							blocks = 64 // 256 KiB: past the write-back, written through
						}
						off := rng.Int64N(size/4096-int64(blocks)) * 4096
						n := blocks * 4096
						stamp := uint64(w+1)<<32 | uint64(i+1)
						for j := 0; j < n; j += 8 {
							binary.LittleEndian.PutUint64(buf[j:], stamp+uint64(j/4096)<<48)
						}
						var err error
						switch k := rng.IntN(20); {
						case k == 0:
							err = s.do(pipeline.OpTrim, 0, nil, off, int64(n))
						case k == 1:
							err = s.do(pipeline.OpFlush, 0, nil, 0, 0)
						case k == 2:
							err = s.do(pipeline.OpWrite, pipeline.FlagFUA, buf[:n], off, int64(n))
						default:
							err = s.do(pipeline.OpWrite, 0, buf[:n], off, int64(n))
						}
						if err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			var rwg sync.WaitGroup
			for r := 0; r < 2; r++ {
				rwg.Add(1)
				go func() {
					defer rwg.Done()
					rng := rand.New(rand.NewPCG(uint64(r), 5))
					buf := make([]byte, 128<<10)
					pos := int64(0)
					for {
						select {
						case <-stop:
							return
						default:
						}
						off := pos // a sequential stream, so prefetch runs
						pos = (pos + int64(len(buf))) % size
						if rng.IntN(3) == 0 {
							off = rng.Int64N(size/4096-32) * 4096
						}
						if err := s.do(pipeline.OpRead, 0, buf, off, int64(len(buf))); err != nil {
							t.Error(err)
							return
						}
						for b := 0; b < len(buf); b += 4096 {
							blk := buf[b : b+4096]
							first := binary.LittleEndian.Uint64(blk)
							for j := 8; j < 4096; j += 8 {
								if binary.LittleEndian.Uint64(blk[j:]) != first {
									t.Errorf("block at %d mixes two writes (%#x and %#x)", off+int64(b), first, binary.LittleEndian.Uint64(blk[j:]))
									return
								}
							}
						}
					}
				}()
			}
			wg.Wait()
			close(stop)
			rwg.Wait()
			got := make([]byte, size)
			if _, err := s.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if err := s.stage.Close(); err != nil {
				t.Fatal(err)
			}
			onDisk := make([]byte, size)
			if _, err := e.ReadAt(onDisk, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, onDisk) {
				t.Fatal("after Close the engine differs from what the stage returned")
			}
		})
	}
}
