package profile

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
	"github.com/blockd/blockd/pipeline"
)

// every profile, with the write-back and cache sized small so that the
// tests cross their bounds.
var allProfiles = []Profile{None, DB, DBRemote, Sequential, Random, Journal, Auto}

func testOptions(e ioengine.Engine) Options {
	o := Options{
		Size:           e.Size,
		CacheBytes:     4 << 20,
		WriteBackBytes: 512 << 10,
		WriteBackAge:   20 * time.Millisecond,
		Tick:           10 * time.Millisecond,
	}
	if c, ok := e.(CachedWriter); ok {
		o.Cached = c // as the daemon wires it
	}
	return o
}

// staged is an Engine whose every call goes through a profile stage: it
// lets the shared engine suite run against the stage.
type staged struct {
	e     ioengine.Engine
	stage *Stage
	h     pipeline.Handler
}

func newStaged(t testing.TB, e ioengine.Engine, p Profile, opts Options) *staged {
	st := New(p, opts)
	s := &staged{e: e, stage: st, h: pipeline.Chain(ioengine.Handler(e), st.Wrap)}
	t.Cleanup(func() { s.Close() })
	return s
}

func (s *staged) do(op pipeline.Op, flags pipeline.Flags, p []byte, off, n int64) error {
	r := pipeline.Request{Op: op, Flags: flags, Offset: off, Length: uint32(n), Buf: p}
	return s.h.Handle(context.Background(), &r)
}

func (s *staged) ReadAt(p []byte, off int64) (int, error) {
	if err := s.do(pipeline.OpRead, 0, p, off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *staged) WriteAt(p []byte, off int64) (int, error) {
	if err := s.do(pipeline.OpWrite, 0, p, off, int64(len(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *staged) Flush() error { return s.do(pipeline.OpFlush, 0, nil, 0, 0) }
func (s *staged) Trim(off, n int64) error {
	return s.do(pipeline.OpTrim, 0, nil, off, n)
}

func (s *staged) WriteZeroes(off, n int64, noHole bool) error {
	var f pipeline.Flags
	if noHole {
		f = pipeline.FlagNoHole
	}
	return s.do(pipeline.OpWriteZeroes, f, nil, off, n)
}
func (s *staged) Size() int64          { return s.e.Size() }
func (s *staged) Resize(n int64) error { return s.e.Resize(n) }
func (s *staged) Close() error {
	err := s.stage.Close()
	return errors.Join(err, s.e.Flush(), s.e.Close())
}

func openFile(t testing.TB, size int64) ioengine.Engine {
	e, err := ioengine.OpenFileWith(filepath.Join(t.TempDir(), "vol.img"), size, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// The shared engine suite passes through the stage under every profile:
// on the O_DIRECT file engine for the profiles that buffer, prefetch or
// switch (the stage's own logic does not depend on the engine, and the
// file engine's unaligned paths have their own suite run in ioengine), on
// the memory engine for the rest.
func TestEngineSuite(t *testing.T) {
	for _, p := range allProfiles {
		t.Run(p.String(), func(t *testing.T) {
			enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
				var e ioengine.Engine
				switch p {
				case None, DB, DBRemote, Sequential, Auto:
					e = openFile(t, size) // db: its page-cache writes
				default:
					e, _ = ioengine.NewMemory(size)
				}
				return newStaged(t, e, p, testOptions(e))
			})
		})
	}
}

func TestParse(t *testing.T) {
	for i, n := range Names() {
		p, err := Parse(n)
		if err != nil || p != Profile(i) || p.String() != n {
			t.Errorf("Parse(%q) = %v, %v", n, p, err)
		}
	}
	if p, err := Parse(""); err != nil || p != Auto {
		t.Errorf(`Parse("") = %v, %v; want auto`, p, err)
	}
	if _, err := Parse("fast"); err == nil {
		t.Error(`Parse("fast") succeeded`)
	}
	if ReadAheadKB(Sequential) <= ReadAheadKB(None) || ReadAheadKB(Random) >= ReadAheadKB(None) {
		t.Error("read-ahead: sequential must be above the default and random below")
	}
}

// A random single-threaded sequence of every op, checked against a model
// on every read: reads after merged writes, reads overlapping buffered
// writes, trims and zeroing over buffered writes, writes into prefetched
// ranges. Sequential read runs keep the prefetcher busy; SetProfile flips
// the profile now and then so leftovers of one profile meet another.
func TestModel(t *testing.T) {
	const size = 8 << 20
	for _, p := range allProfiles {
		t.Run(p.String(), func(t *testing.T) {
			e, _ := ioengine.NewMemory(size)
			s := newStaged(t, e, p, testOptions(e))
			model := make([]byte, size)
			rng := rand.New(rand.NewPCG(uint64(p), 7))
			buf := make([]byte, 512<<10)
			seqPos := int64(0)
			for i := 0; i < 1500; i++ {
				n := int64(1 + rng.IntN(64<<10))
				if rng.IntN(2) == 0 {
					n = (n + 4095) &^ 4095
				}
				off := rng.Int64N(size - n)
				if rng.IntN(2) == 0 {
					off &^= 4095
				}
				switch k := rng.IntN(20); {
				case k < 6: // write, sometimes sequential, sometimes FUA
					if k < 3 {
						off, n = seqPos, 4096
						seqPos = (seqPos + n) % size
					}
					p := buf[:n]
					for j := range p {
						p[j] = byte(rng.Uint32())
					}
					var f pipeline.Flags
					if k == 5 {
						f = pipeline.FlagFUA
					}
					if err := s.do(pipeline.OpWrite, f, p, off, n); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				case k < 12: // sequential read run (prefetch) or random read
					if k < 9 {
						off, n = seqPos, 128<<10
						if off+n > size {
							off = 0
						}
						seqPos = (off + n) % size
					}
					got := buf[:n]
					if err := s.do(pipeline.OpRead, 0, got, off, n); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+n]) {
						t.Fatalf("op %d: read %d bytes at %d differs from model (profile %s, effective %s)", i, n, off, p, s.stage.Effective())
					}
				case k < 14:
					if err := s.do(pipeline.OpTrim, 0, nil, off, n); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case k < 16:
					f := pipeline.Flags(0)
					if k == 15 {
						f = pipeline.FlagNoHole | pipeline.FlagFUA
					}
					if err := s.do(pipeline.OpWriteZeroes, f, nil, off, n); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case k < 18:
					if err := s.do(pipeline.OpFlush, 0, nil, 0, 0); err != nil {
						t.Fatal(err)
					}
				case k == 18 && p == Auto:
					s.stage.SetProfile(allProfiles[rng.IntN(len(allProfiles))])
				default:
					time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond) // let ageing and prefetch run
				}
			}
			got := make([]byte, size)
			if _, err := s.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
				t.Fatalf("final read differs from model: %v", err)
			}
			if err := s.stage.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
				t.Fatal("after Close the engine does not hold every write")
			}
		})
	}
}

// durableEngine models a disk with a volatile write cache: writes land in
// vol; a flush copies what vol held when the flush started to dur after a
// delay, so a flush acknowledged too early is caught.
type durableEngine struct {
	*ioengine.Memory
	mu        sync.Mutex
	dur       []byte
	seq       uint64 // flushes started
	committed uint64 // the newest flush whose snapshot is in dur
}

func newDurable(size int64) *durableEngine {
	m, _ := ioengine.NewMemory(size)
	return &durableEngine{Memory: m, dur: make([]byte, size)}
}

// WriteAtCached is the page-cache write: volatile until a flush, like
// every write here.
func (d *durableEngine) WriteAtCached(p []byte, off int64) (int, error) {
	return d.Memory.WriteAt(p, off)
}

func (d *durableEngine) Flush() error {
	snap := make([]byte, d.Size())
	d.mu.Lock()
	d.seq++
	seq := d.seq
	d.Memory.ReadAt(snap, 0)
	d.mu.Unlock()
	time.Sleep(200 * time.Microsecond)
	d.mu.Lock()
	// A newer flush that finished first saw everything this one saw.
	if seq > d.committed {
		copy(d.dur, snap)
		d.committed = seq
	}
	d.mu.Unlock()
	return nil
}

func (d *durableEngine) durable(off, n int64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.dur[off : off+n])
}

// Every write acknowledged before a FLUSH was issued is durable when the
// FLUSH completes, and a FUA write is durable when it completes, under
// every profile, with concurrent writers and flushers.
func TestFlushDurability(t *testing.T) {
	const workers, stripe, rounds = 8, 64 << 10, 80
	for _, p := range allProfiles {
		t.Run(p.String(), func(t *testing.T) {
			d := newDurable(workers * stripe)
			s := newStaged(t, d, p, testOptions(d))
			var wg sync.WaitGroup
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), uint64(p)))
					base := int64(w * stripe)
					model := make([]byte, stripe)
					pos := int64(0)
					for i := 0; i < rounds; i++ {
						n := int64(4096 * (1 + rng.IntN(4)))
						off := pos
						if rng.IntN(3) == 0 {
							off = rng.Int64N(stripe/4096-4) * 4096
						}
						if off+n > stripe {
							off = 0
						}
						pos = off + n
						data := make([]byte, n)
						for j := range data {
							data[j] = byte(rng.Uint32())
						}
						fua := rng.IntN(8) == 0
						var f pipeline.Flags
						if fua {
							f = pipeline.FlagFUA
						}
						if err := s.do(pipeline.OpWrite, f, data, base+off, n); err != nil {
							t.Error(err)
							return
						}
						copy(model[off:], data)
						if fua && !bytes.Equal(d.durable(base+off, n), data) {
							t.Errorf("worker %d: FUA write at %d not durable when acknowledged", w, off)
							return
						}
						if rng.IntN(6) == 0 {
							if err := s.Flush(); err != nil {
								t.Error(err)
								return
							}
							if !bytes.Equal(d.durable(base, stripe), model) {
								t.Errorf("worker %d round %d: acknowledged writes not durable after FLUSH", w, i)
								return
							}
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}

// blockingFlush is a next handler whose engine flushes wait for release
// (or fail with fail, if set); other requests succeed at once.
type blockingFlush struct {
	started chan struct{}
	release chan struct{}
	count   atomic.Int32
	fail    error
}

func (b *blockingFlush) Handle(_ context.Context, r *pipeline.Request) error {
	if r.Op == pipeline.OpFlush {
		b.count.Add(1)
		b.started <- struct{}{}
		<-b.release
		return b.fail
	}
	return nil
}

// waitInside waits until n callers are inside the stage's group commit.
func waitInside(st *Stage, n int) {
	for {
		st.gc.mu.Lock()
		in := st.gc.inside
		st.gc.mu.Unlock()
		if in >= n {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func newBlocking() *blockingFlush {
	return &blockingFlush{started: make(chan struct{}, 8), release: make(chan struct{})}
}

func handle(h pipeline.Handler, op pipeline.Op) error {
	r := pipeline.Request{Op: op}
	if op == pipeline.OpWrite {
		r.Length, r.Buf = 4096, make([]byte, 4096)
	}
	return h.Handle(context.Background(), &r)
}

// A FLUSH that arrives while an engine flush is running shares it if every
// write it covers completed before that flush started; if a write
// completed after, it waits for a new engine flush.
func TestGroupCommitWaitsForLaterFlush(t *testing.T) {
	b := newBlocking()
	st := New(DB, Options{Size: func() int64 { return 1 << 20 }})
	h := st.Wrap(b)
	defer st.Close()
	flush := func(done chan<- error) { done <- handle(h, pipeline.OpFlush) }
	if err := handle(h, pipeline.OpWrite); err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go flush(first)
	<-b.started // engine flush #1 running; it covers the write above
	covered := make(chan error, 1)
	go flush(covered) // nothing written since #1 started
	waitInside(st, 2)
	if err := handle(h, pipeline.OpWrite); err != nil {
		t.Fatal(err)
	}
	later := make(chan error, 2)
	go flush(later) // written after #1 started
	go flush(later)
	waitInside(st, 4)
	b.release <- struct{}{} // finish #1
	for _, c := range []chan error{first, covered} {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-later:
		t.Fatal("a FLUSH after a write that completed during a running engine flush completed without a later engine flush")
	case <-b.started: // #2 started: the later ones wait for it
	}
	close(b.release)
	for i := 0; i < 2; i++ {
		if err := <-later; err != nil {
			t.Fatal(err)
		}
	}
	if n := b.count.Load(); n != 2 {
		t.Errorf("%d engine flushes for 4 FLUSHes (2 covered by #1, 2 after a later write), want 2", n)
	}
}

// The first FLUSH after the stage opened always reaches the engine (a
// previous process may have left writes in the page cache); later a FLUSH
// with no write since the last engine flush started needs none.
func TestFlushWithoutWritesSkipsEngine(t *testing.T) {
	b := newBlocking()
	close(b.release)
	st := New(DB, Options{Size: func() int64 { return 1 << 20 }})
	h := st.Wrap(b)
	defer st.Close()
	steps := []struct {
		op   pipeline.Op
		want int32 // engine flushes after the step
	}{
		{pipeline.OpFlush, 1},
		{pipeline.OpFlush, 1},
		{pipeline.OpWrite, 1},
		{pipeline.OpFlush, 2},
		{pipeline.OpFlush, 2},
		{pipeline.OpTrim, 2},
		{pipeline.OpFlush, 3},
	}
	for i, s := range steps {
		if err := handle(h, s.op); err != nil {
			t.Fatal(err)
		}
		if n := b.count.Load(); n != s.want {
			t.Fatalf("step %d (%s): %d engine flushes, want %d", i, s.op, n, s.want)
		}
	}
}

// A failed engine flush fails the FLUSHes waiting for it and every later
// one: they all cover the writes it may have lost.
func TestGroupCommitFlushError(t *testing.T) {
	b := newBlocking()
	b.fail = errors.New("injected")
	st := New(DB, Options{Size: func() int64 { return 1 << 20 }})
	h := st.Wrap(b)
	defer st.Close()
	handle(h, pipeline.OpWrite)
	done := make(chan error, 3)
	go func() { done <- handle(h, pipeline.OpFlush) }()
	<-b.started
	go func() { done <- handle(h, pipeline.OpFlush) }() // covered by the failing one
	waitInside(st, 2)
	b.release <- struct{}{}
	for i := 0; i < 2; i++ {
		if err := <-done; !errors.Is(err, b.fail) {
			t.Fatalf("FLUSH %d during a failing engine flush returned %v", i, err)
		}
	}
	handle(h, pipeline.OpWrite)
	if err := handle(h, pipeline.OpFlush); !errors.Is(err, b.fail) {
		t.Fatalf("FLUSH after a failed engine flush returned %v", err)
	}
	fua := pipeline.Request{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Length: 4096, Buf: make([]byte, 4096)}
	if err := h.Handle(context.Background(), &fua); !errors.Is(err, b.fail) {
		t.Fatalf("FUA write after a failed engine flush returned %v", err)
	}
	if n := b.count.Load(); n != 1 {
		t.Errorf("%d engine flushes, want 1 (the failed one)", n)
	}
}

// After an engine flush that ran long while more committers arrived, the
// next flush's leader waits until as many committers as that flush served
// (its batch and the arrivals during it) are waiting again, so they share
// one engine flush instead of taking turns; when fewer come, the wait ends
// after about the last flush's duration.
func TestGroupCommitGathers(t *testing.T) {
	b := newBlocking()
	st := New(DB, Options{Size: func() int64 { return 1 << 20 }})
	h := st.Wrap(b)
	defer st.Close()
	st.gc.mu.Lock()
	st.gc.gatherMax = time.Hour // only arrivals and the last flush's duration bound the wait
	st.gc.mu.Unlock()
	done := make(chan error, 8)
	commit := func() {
		go func() {
			if err := handle(h, pipeline.OpWrite); err != nil {
				done <- err
				return
			}
			done <- handle(h, pipeline.OpFlush)
		}()
	}
	wait := func(n int) {
		t.Helper()
		for range n {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
	}
	commit()
	<-b.started // engine flush #1: one committer
	for range 3 {
		commit() // each wrote after #1 started: they need #2
	}
	waitInside(st, 4)
	time.Sleep(300 * time.Millisecond) // #1 is slow: gathering will pay
	b.release <- struct{}{}
	wait(1)
	// #1 served 4 committers; 3 are waiting. The 4th has not come back.
	select {
	case <-b.started:
		t.Fatal("engine flush #2 started with 3 of 4 committers waiting, 50ms after #1 ended")
	case <-time.After(50 * time.Millisecond):
	}
	commit()
	select {
	case <-b.started:
	case <-time.After(10 * time.Second):
		t.Fatal("engine flush #2 did not start when the 4th committer came")
	}
	time.Sleep(20 * time.Millisecond)
	b.release <- struct{}{}
	wait(4)
	if n := b.count.Load(); n != 2 {
		t.Fatalf("%d engine flushes for 5 committed FLUSHes in two rounds, want 2", n)
	}

	// #2 served 4 and took >= 20ms; a lone committer now waits for the
	// others for about that long, then flushes alone.
	t0 := time.Now()
	commit()
	<-b.started
	if waited := time.Since(t0); waited < 20*time.Millisecond {
		t.Errorf("lone committer led after %v, want a gathering wait of about the last flush (>= 20ms)", waited)
	}
	b.release <- struct{}{}
	wait(1)
	s := st.Stats()
	if s.FlushGathers != 1 || s.FlushGatherTimeouts != 1 {
		t.Errorf("gathers %d, timeouts %d; want 1 and 1", s.FlushGathers, s.FlushGatherTimeouts)
	}

	// #3 served one: the next committer leads at once.
	commit()
	select {
	case <-b.started:
	case <-time.After(10 * time.Second):
		t.Fatal("engine flush #4 did not start for a single committer")
	}
	b.release <- struct{}{}
	wait(1)
	if s := st.Stats(); s.FlushGathers+s.FlushGatherTimeouts != 2 {
		t.Errorf("a single committer gathered: %+v", s)
	}
}

// dropEngine is a memory engine with a page-cache write path whose cache
// can be dropped: it counts the drops.
type dropEngine struct {
	*ioengine.Memory
	drops atomic.Int32
}

func (d *dropEngine) WriteAtCached(p []byte, off int64) (int, error) { return d.Memory.WriteAt(p, off) }
func (d *dropEngine) DropCache() error                               { d.drops.Add(1); return nil }

// Once a volume leaves db, the engine cache its db writes filled is
// dropped, once; a volume still in db, or one that never wrote through the
// cache, keeps it.
func TestPageCacheDroppedAfterDB(t *testing.T) {
	m, _ := ioengine.NewMemory(1 << 20)
	e := &dropEngine{Memory: m}
	opts := testOptions(e)
	s := newStaged(t, e, DB, opts)
	buf := make([]byte, 4096)
	write := func(off int64) {
		if _, err := s.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(want int32, when string) {
		t.Helper()
		time.Sleep(20 * opts.Tick) // many ticks
		if n := e.drops.Load(); n != want {
			t.Fatalf("%d drops %s, want %d", n, when, want)
		}
	}
	expect(0, "before any write")
	write(0)
	expect(0, "while the volume is still db")
	s.stage.SetProfile(Random)
	expect(1, "after leaving db")
	if st := s.stage.Stats(); st.PageCacheDrops != 1 {
		t.Errorf("stats count %d drops, want 1", st.PageCacheDrops)
	}
	// Writes outside db do not go through the cache: nothing to drop.
	write(4096)
	expect(1, "after a write outside db")
	// Back to db and out again: one more.
	s.stage.SetProfile(DB)
	write(8192)
	s.stage.SetProfile(None)
	expect(2, "after a second stay in db")
}
