package ublk

import (
	"bytes"
	"encoding/binary"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/uring"
)

// inlineHandler vouches for reads and plain writes, as a memory volume
// does, and counts what it ran and where.
type inlineHandler struct {
	pipeline.Handler
	inlined atomic.Int64
	refuse  atomic.Bool // Inline says no to everything
}

func (h *inlineHandler) Inline(r *pipeline.Request) bool {
	if h.refuse.Load() || (r.Op != pipeline.OpRead && r.Op != pipeline.OpWrite) || r.Flags&pipeline.FlagFUA != 0 {
		return false
	}
	h.inlined.Add(1)
	return true
}

func newInlineHandler(t testing.TB, size int64) *inlineHandler {
	mem, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	return &inlineHandler{Handler: ioengine.Handler(mem)}
}

// requestMany posts requests on several fetched tags at once, as the
// driver does when a burst of bios arrives, so the queue reaps them in
// one batch.
func (f *fakeDriver) requestMany(tags []uint16, d ioDesc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, tag := range tags {
		for !f.inKernel[tag] {
			f.cond.Wait()
		}
	}
	for _, tag := range tags {
		b := f.descs[int(tag)*ioDescSize:]
		binary.LittleEndian.PutUint32(b[0:], d.OpFlags)
		binary.LittleEndian.PutUint32(b[4:], d.NrSectors)
		binary.LittleEndian.PutUint64(b[8:], d.StartSector+uint64(tag)*uint64(d.NrSectors))
		f.inKernel[tag] = false
		f.cqes = append(f.cqes, uring.CQE{UserData: uint64(tag)})
	}
	f.cond.Broadcast()
}

// TestQueueInline: requests the handler vouches for run on the queue
// goroutine (no worker exists until the flush, which must wait for one),
// a burst of them is committed in one submission, and the queue works
// both waiting in the kernel and parked on its watcher.
func TestQueueInline(t *testing.T) {
	for _, park := range []bool{false, true} {
		h := newInlineHandler(t, 1<<20)
		f := newFakeDriver(t, 8, 64<<10)
		f.noWait = park
		fq := startQueue(t, f, f.descs, f.bufs, 1<<20, h, 0)
		fq.f = f
		// A burst of 8 writes, each of its own pattern, reaped and
		// committed together.
		tags := []uint16{0, 1, 2, 3, 4, 5, 6, 7}
		for _, tag := range tags {
			copy(f.bufs[tag], bytes.Repeat([]byte{byte(tag + 1)}, 4096))
		}
		f.requestMany(tags, ioDesc{OpFlags: opWrite, NrSectors: 8})
		for _, tag := range tags {
			if res := f.waitResult(tag, 1); res != 4096 {
				t.Fatalf("park=%v: write on tag %d: result %d", park, tag, res)
			}
		}
		f.requestMany(tags, ioDesc{OpFlags: opRead, NrSectors: 8})
		for _, tag := range tags {
			if res := f.waitResult(tag, 2); res != 4096 || f.bufs[tag][4095] != byte(tag+1) {
				t.Fatalf("park=%v: read on tag %d: result %d, data %d", park, tag, res, f.bufs[tag][4095])
			}
		}
		if got := h.inlined.Load(); got != 16 {
			t.Fatalf("park=%v: %d requests ran inline, want 16", park, got)
		}
		f.mu.Lock()
		waits := f.waits
		f.mu.Unlock()
		if park && waits != 0 || !park && waits == 0 {
			t.Fatalf("park=%v: the queue waited in the ring %d times", park, waits)
		}
		// A flush is not inline: it waits in the work channel until a
		// worker runs it.
		f.request(3, ioDesc{OpFlags: opFlush})
		time.Sleep(20 * time.Millisecond)
		if n := len(fq.work); n != 1 {
			t.Fatalf("park=%v: %d requests queued for workers, want the flush", park, n)
		}
		fq.addWorkers(h, 1)
		if res := f.waitResult(3, 3); res != 0 {
			t.Fatalf("park=%v: flush result %d", park, res)
		}
		fq.stop(t)
	}
}

// TestQueueInlineBatch: a burst reaped together is committed with one
// submission.
func TestQueueInlineBatch(t *testing.T) {
	d := newLoopDriver(t, 32, 4096)
	d.perSubmit = make([]int, 0, 64)
	q := d.start(t, newInlineHandler(t, 1<<20))
	defer d.stop(t, q)
	d.run(32)
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.perSubmit) == 0 || d.perSubmit[0] != 32 {
		t.Fatalf("commits per submission %v; want the burst of 32 in the first", d.perSubmit)
	}
}

// loopDriver plays a driver under constant load for benchmarks: every
// commit of a tag re-posts a 4 KiB read on it, until budget requests were
// committed. It allocates nothing per request.
type loopDriver struct {
	t     testing.TB
	descs []byte
	bufs  [][]byte

	mu        sync.Mutex
	cond      *sync.Cond
	cqes      []uring.CQE // pending completions (capacity: depth)
	budget    int         // requests still to post
	inFlight  int         // posted, not committed
	closed    bool
	pending   int   // commits since the last submit
	perSubmit []int // commits per submit (if non-nil, up to its capacity)
	done      chan struct{}
}

func newLoopDriver(t testing.TB, depth, maxIO int) *loopDriver {
	d := &loopDriver{t: t, descs: make([]byte, depth*ioDescSize), cqes: make([]uring.CQE, 0, depth), done: make(chan struct{}, 1)}
	d.cond = sync.NewCond(&d.mu)
	for i := range depth {
		d.bufs = append(d.bufs, make([]byte, maxIO))
		binary.LittleEndian.PutUint32(d.descs[i*ioDescSize:], opRead)
		binary.LittleEndian.PutUint32(d.descs[i*ioDescSize+4:], 8)
		binary.LittleEndian.PutUint64(d.descs[i*ioDescSize+8:], uint64(i)*8)
	}
	return d
}

// postLocked completes tag's fetch with a new request, if budget is left.
func (d *loopDriver) postLocked(tag uint16) {
	if d.budget == 0 {
		return
	}
	d.budget--
	d.inFlight++
	d.cqes = append(d.cqes, uring.CQE{UserData: uint64(tag)})
	d.cond.Broadcast()
}

func (d *loopDriver) fetch(tag uint16, addr uint64) error { return nil }

func (d *loopDriver) commit(tag uint16, res int32, addr uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if res != 4096 {
		d.t.Errorf("tag %d: result %d", tag, res)
	}
	d.pending++
	d.inFlight--
	d.postLocked(tag)
	if d.inFlight == 0 && d.budget == 0 {
		d.done <- struct{}{}
	}
	return nil
}

func (d *loopDriver) submit() error {
	d.mu.Lock()
	if d.pending > 0 && d.perSubmit != nil && len(d.perSubmit) < cap(d.perSubmit) {
		d.perSubmit = append(d.perSubmit, d.pending)
	}
	d.pending = 0
	d.mu.Unlock()
	return nil
}

func (d *loopDriver) wait(time.Duration) (bool, error) {
	if err := d.submit(); err != nil {
		return false, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.cqes) > 0, nil // never sleeps: an idle queue parks
}

func (d *loopDriver) reap(cqes []uring.CQE) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := copy(cqes, d.cqes)
	d.cqes = d.cqes[:copy(d.cqes, d.cqes[n:])]
	return n
}

func (d *loopDriver) waitReady() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(d.cqes) == 0 && !d.closed {
		d.cond.Wait()
	}
	if d.closed {
		return io.EOF
	}
	return nil
}

func (d *loopDriver) notify(bool) {}

func (d *loopDriver) ready() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.cqes) > 0
}

func (d *loopDriver) close() error {
	d.mu.Lock()
	d.closed = true
	d.cond.Broadcast()
	d.mu.Unlock()
	return nil
}

// start runs a queue on the driver with h and 4 workers.
func (d *loopDriver) start(t testing.TB, h pipeline.Handler) *fakeQueue {
	return startQueue(t, d, d.descs, d.bufs, 1<<30, h, 4)
}

// run posts n requests (all tags busy, each commit reposting) and waits
// for every one to be committed.
func (d *loopDriver) run(n int) {
	d.mu.Lock()
	d.budget = n
	for tag := range len(d.bufs) {
		d.postLocked(uint16(tag))
	}
	d.mu.Unlock()
	<-d.done
}

func (d *loopDriver) stop(t testing.TB, fq *fakeQueue) {
	fq.q.requestStop()
	<-fq.done
	close(fq.work)
	fq.wwg.Wait()
}

// TestQueueAllocs: the queue allocates nothing per request in steady
// state, inline or through a worker.
func TestQueueAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, inline := range []bool{true, false} {
		h := newInlineHandler(t, 1<<30)
		h.refuse.Store(!inline)
		d := newLoopDriver(t, 16, 4096)
		q := d.start(t, h)
		d.run(1000) // warm up: slices, workers, the scheduler
		const per = 1000
		allocs := testing.AllocsPerRun(5, func() { d.run(per) })
		d.stop(t, q)
		if allocs/per > 0.001 {
			t.Errorf("inline=%v: %.1f allocations per %d requests", inline, allocs, per)
		}
	}
}

// BenchmarkQueue: 4 KiB reads from a memory engine through a queue under
// constant load (16 tags busy), handled inline and by workers.
func BenchmarkQueue(b *testing.B) {
	for _, inline := range []bool{true, false} {
		name := "Worker"
		if inline {
			name = "Inline"
		}
		b.Run(name, func(b *testing.B) {
			h := newInlineHandler(b, 1<<30)
			h.refuse.Store(!inline)
			d := newLoopDriver(b, 16, 4096)
			q := d.start(b, h)
			defer d.stop(b, q)
			b.ReportAllocs()
			b.ResetTimer()
			d.run(b.N)
		})
	}
}
