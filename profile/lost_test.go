package profile

import (
	"errors"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

var errInjected = errors.New("injected engine failure")

// failingEngine is a memory engine whose next flushFails flushes fail
// and whose writes fail while failWrites is set. It has a page-cache
// write path, so db takes it; it is not a FUAWriter, so a FUA write is a
// write and a flush.
type failingEngine struct {
	ioengine.Engine
	flushFails atomic.Int32
	failWrites atomic.Bool
	flushes    atomic.Int32 // that succeeded
}

func newFailing(size int64) *failingEngine {
	m, _ := ioengine.NewMemory(size)
	return &failingEngine{Engine: m}
}

func (f *failingEngine) Flush() error {
	if f.flushFails.Add(-1) >= 0 {
		return errInjected
	}
	f.flushFails.Store(0)
	f.flushes.Add(1)
	return f.Engine.Flush()
}

func (f *failingEngine) WriteAt(p []byte, off int64) (int, error) {
	if f.failWrites.Load() {
		return 0, errInjected
	}
	return f.Engine.WriteAt(p, off)
}

func (f *failingEngine) WriteAtCached(p []byte, off int64) (int, error) { return f.WriteAt(p, off) }

// Once an engine flush has failed, every later FLUSH and FUA write fails
// with that error under every profile, switching between them included,
// although the engine's flushes succeed again: the writes the failed flush
// covered may be lost and nothing later can prove otherwise. The failure
// comes from a FLUSH or from a FUA write, starting under each profile.
func TestLostDurabilitySticks(t *testing.T) {
	buf := make([]byte, 4096)
	for _, first := range []pipeline.Flags{0, pipeline.FlagFUA} {
		for _, start := range allProfiles {
			name := start.String() + "/flush"
			if first != 0 {
				name = start.String() + "/fua"
			}
			t.Run(name, func(t *testing.T) {
				e := newFailing(1 << 20)
				s := newStaged(t, e, start, testOptions(e))
				if err := s.do(pipeline.OpWrite, 0, buf, 0, 4096); err != nil {
					t.Fatal(err)
				}
				e.flushFails.Store(1)
				var err error
				if first == 0 {
					err = s.Flush()
				} else {
					err = s.do(pipeline.OpWrite, pipeline.FlagFUA, buf, 4096, 4096)
				}
				if !errors.Is(err, errInjected) {
					t.Fatalf("the request whose engine flush failed returned %v", err)
				}
				for i, p := range append(allProfiles, None, start) {
					s.stage.SetProfile(p)
					if err := s.do(pipeline.OpWrite, 0, buf, int64(i)*4096, 4096); err != nil {
						t.Fatalf("%s: a plain write failed: %v", p, err)
					}
					if err := s.Flush(); !errors.Is(err, errInjected) {
						t.Errorf("%s: FLUSH after a failed engine flush returned %v", p, err)
					}
					if err := s.do(pipeline.OpWrite, pipeline.FlagFUA, buf, int64(i)*4096, 4096); !errors.Is(err, errInjected) {
						t.Errorf("%s: FUA write after a failed engine flush returned %v", p, err)
					}
					if err := s.do(pipeline.OpWriteZeroes, pipeline.FlagFUA, nil, int64(i)*4096, 4096); !errors.Is(err, errInjected) {
						t.Errorf("%s: FUA write-zeroes after a failed engine flush returned %v", p, err)
					}
				}
				if err := e.Flush(); err != nil {
					t.Fatalf("the engine's own flush still fails (%v): the test proves nothing", err)
				}
			})
		}
	}
}
