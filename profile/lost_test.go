package profile

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

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

// logRecorder is a slog.Handler that passes every record's message and
// "err" attribute to records, dropping them when it is full.
type logRecorder struct{ records chan logged }

type logged struct {
	msg string
	err error
}

func newLogRecorder() (*slog.Logger, chan logged) {
	c := make(chan logged, 64)
	return slog.New(logRecorder{c}), c
}

func (l logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l logRecorder) WithGroup(string) slog.Handler            { return l }
func (l logRecorder) Handle(_ context.Context, r slog.Record) error {
	var rec logged
	rec.msg = r.Message
	r.Attrs(func(a slog.Attr) bool {
		if err, ok := a.Value.Any().(error); ok && a.Key == "err" {
			rec.err = err
		}
		return true
	})
	select {
	case l.records <- rec:
	default:
	}
	return nil
}

// waitLogged waits, at most 5 seconds, for a record whose err is want.
func waitLogged(t *testing.T, records <-chan logged, want error, what string) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case rec := <-records:
			if errors.Is(rec.err, want) {
				return
			}
		case <-timeout:
			t.Fatalf("%s was never reported", what)
		}
	}
}

// A write-back drain that no request waits for (the age bound started it)
// and fails is reported to the logger, and it counts as lost durability:
// the data had been acknowledged, so a later FLUSH fails even once the
// engine takes writes again and a retry got the data there.
func TestBackgroundDrainErrorReported(t *testing.T) {
	e := newFailing(1 << 20)
	opts := testOptions(e)
	log, records := newLogRecorder()
	opts.Logger = log
	s := newStaged(t, e, Sequential, opts)
	e.failWrites.Store(true)
	if err := s.do(pipeline.OpWrite, 0, make([]byte, 4096), 0, 4096); err != nil {
		t.Fatal(err) // buffered: the engine is not asked yet
	}
	waitLogged(t, records, errInjected, "a failed age-triggered drain")
	e.failWrites.Store(false)
	for i := 0; s.stage.Stats().BufferedBytes != 0; i++ {
		if i == 5000 {
			t.Fatal("the write-back buffer never drained once the engine took writes again")
		}
		time.Sleep(time.Millisecond)
	}
	if err := s.Flush(); !errors.Is(err, errInjected) {
		t.Fatalf("FLUSH after a failed background drain returned %v", err)
	}
	if err := s.do(pipeline.OpWrite, pipeline.FlagFUA, make([]byte, 4096), 0, 4096); !errors.Is(err, errInjected) {
		t.Fatalf("FUA write after a failed background drain returned %v", err)
	}
}

// failingDropper is a memory engine with a page-cache write path whose
// cache drop fails.
type failingDropper struct{ *ioengine.Memory }

func (d failingDropper) WriteAtCached(p []byte, off int64) (int, error) { return d.WriteAt(p, off) }
func (d failingDropper) DropCache() error                               { return errInjected }

// A page-cache drop that fails after the volume left db is reported.
func TestDropCacheErrorReported(t *testing.T) {
	m, _ := ioengine.NewMemory(1 << 20)
	e := failingDropper{m}
	opts := testOptions(e)
	log, records := newLogRecorder()
	opts.Logger = log
	s := newStaged(t, e, DB, opts)
	if err := s.do(pipeline.OpWrite, 0, make([]byte, 4096), 0, 4096); err != nil {
		t.Fatal(err)
	}
	s.stage.SetProfile(Random)
	waitLogged(t, records, errInjected, "a failed page-cache drop")
	if n := s.stage.Stats().PageCacheDrops; n != 0 {
		t.Errorf("a failed drop was counted as a drop (%d)", n)
	}
}
