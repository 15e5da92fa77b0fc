package ublk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/uring"
)

// qring is what a queue needs from the kernel: the real one is an io_uring
// on /dev/ublkcN (kernelRing); tests use a fake that plays the driver.
// waitReady is called by the queue's watcher goroutine, close by the queue
// goroutine after everything else; every other method only by the queue
// goroutine.
type qring interface {
	// fetch queues FETCH_REQ for tag with its data buffer at addr.
	fetch(tag uint16, addr uint64) error
	// commit queues COMMIT_AND_FETCH_REQ for tag with result res.
	commit(tag uint16, res int32, addr uint64) error
	// submit hands queued commands to the driver without waiting.
	submit() error
	// wait submits queued commands and waits in the kernel until a
	// completion is ready or d has passed; it reports whether one is
	// ready. errNoWait means the ring cannot (the queue then parks).
	wait(d time.Duration) (bool, error)
	reap(cqes []uring.CQE) int
	// ready reports whether a completion is there to reap.
	ready() bool
	// waitReady blocks until a completion is ready to reap; it fails once
	// the ring is closed. It may run concurrently with the methods above.
	waitReady() error
	// notify turns waitReady's wakeups on (the queue is about to sleep
	// on kick) or off (the queue reaps by itself).
	notify(on bool)
	close() error
}

// errNoWait is qring.wait's answer when the ring cannot wait with a
// timeout.
var errNoWait = errors.New("ring cannot wait with a timeout")

// Tag states, owned by the queue goroutine.
const (
	tagInKernel  = iota // a FETCH or COMMIT_AND_FETCH is pending in the driver
	tagInHandler        // a worker is running the request
	tagDead             // the driver ended the command; never fetched again
)

// Inliner is implemented by Handlers that can tell that handling a
// request will wait for nothing but CPU and memory (no throttling, no
// device I/O, no lock held across either): the queue goroutine then runs
// it itself and commits its result with the others of the same batch,
// instead of handing it to a worker and waiting to be woken by it.
// volume.Volume implements it (as it does nbd.Inliner). Inline is called
// for every request; a wrong true stalls the queue while the request
// waits. It may mark the request (QoS admission), which Handle then sees.
type Inliner interface {
	Inline(r *pipeline.Request) bool
}

// directWait is how long an idle queue waits for the driver inside
// io_uring_enter before it parks in Go instead (see queue.loop).
const directWait = 2 * time.Millisecond

// directWaitEnabled is the kill switch of the in-kernel wait:
// BLOCKD_UBLK_DIRECT_WAIT=0 makes queues always park in Go.
var directWaitEnabled = os.Getenv("BLOCKD_UBLK_DIRECT_WAIT") != "0"

// slot is one tag: its request and buffer. A slot moves between the queue
// goroutine and one worker by channel and the done list, never shared.
type slot struct {
	q     *queue
	tag   uint16
	state uint8
	res   int32
	req   pipeline.Request
	buf   []byte
}

// queue serves one hardware queue. Its goroutine (run) owns the ring; it
// exits when every tag is dead (after STOP_DEV aborts the fetches) or, once
// stop is requested, as soon as no request is in a handler.
//
// Requests the Handler vouches for (Inliner) run on the queue goroutine:
// every completion the ring holds is reaped, its request handled, and the
// COMMIT_AND_FETCHes of the whole batch go to the driver in one
// io_uring_enter. The others go to workers.
//
// Waiting: while no request is in a worker, the queue waits for the
// driver inside io_uring_enter (uring.Ring.WaitTimeout), where the
// driver's task work for this thread posts the next request: one wakeup
// per batch, and the commits ride on the same syscall. That wait holds the
// goroutine's P, so it is bounded (directWait); a queue idle for that long,
// or with requests in workers, sleeps instead on kick, a Go channel,
// which workers (a request finished) and the watcher goroutine (the ring
// has completions) signal: a worker wakes the queue with a channel send,
// and the watcher parks in the netpoller on the ring fd (see
// uring.EnablePolling), so an idle queue holds no P. The watcher polls
// only while the queue sleeps on kick (the queue acks it just before).
type queue struct {
	id      int
	size    int64
	descs   []byte // the driver's descriptor array, read-only mapping
	slots   []slot
	work    chan<- *slot
	log     *slog.Logger
	newRing func() (qring, error)
	ctx     context.Context  // for inline requests
	h       pipeline.Handler // for inline requests
	inl     Inliner          // h, if it implements Inliner
	direct  bool             // wait in the kernel when idle (directWaitEnabled)

	kick   chan struct{} // capacity 1: a pending wake-up is never lost
	ack    chan struct{} // capacity 1: the queue is about to sleep on kick; the watcher may poll again
	settle *time.Timer   // the queue's second look after it turned notify on (sleep)

	mu       sync.Mutex
	done     []uint16 // tags whose handler finished, for the queue goroutine
	stopping bool     // set by requestStop under mu

	spare     []uint16
	inHandler int
	live      int
}

func newQueue(ctx context.Context, id int, size int64, descs []byte, bufs [][]byte, h pipeline.Handler, work chan<- *slot, log *slog.Logger, newRing func() (qring, error)) *queue {
	q := &queue{id: id, size: size, descs: descs, work: work, log: log, newRing: newRing,
		ctx: ctx, h: h, direct: directWaitEnabled,
		kick: make(chan struct{}, 1), ack: make(chan struct{}, 1)}
	q.inl, _ = h.(Inliner)
	q.slots = make([]slot, len(bufs))
	for i := range q.slots {
		q.slots[i] = slot{q: q, tag: uint16(i), buf: bufs[i]}
	}
	q.done = make([]uint16, 0, len(bufs))
	q.spare = make([]uint16, 0, len(bufs))
	return q
}

func bufAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

func (q *queue) wake() {
	select {
	case q.kick <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// run is the queue goroutine. It reports on ready once every FETCH_REQ is
// submitted (or setup failed) and returns when the queue is finished.
func (q *queue) run(ready chan<- error) {
	// The driver binds a queue to the task that fetched on it and runs
	// completions as task work on that task, so the ring must live on one
	// OS thread. The thread is never unlocked: it exits with the goroutine.
	runtime.LockOSThread()
	ring, err := q.newRing()
	if err != nil {
		ready <- fmt.Errorf("queue %d: %w", q.id, err)
		return
	}
	quit := make(chan struct{})
	var watcher sync.WaitGroup
	defer func() {
		close(quit)
		// Closing the ring ends the watcher's waitReady.
		if err := ring.close(); err != nil {
			q.log.Warn("ublk queue close", "queue", q.id, "err", err)
		}
		watcher.Wait()
	}()
	for i := range q.slots {
		if err := ring.fetch(uint16(i), bufAddr(q.slots[i].buf)); err != nil {
			ready <- fmt.Errorf("queue %d fetch: %w", q.id, err)
			return
		}
	}
	q.live = len(q.slots)
	if err := ring.submit(); err != nil {
		ready <- fmt.Errorf("queue %d submit fetches: %w", q.id, err)
		return
	}
	watcher.Add(1)
	go func() { // owner: run; exits when quit closes or the ring is closed
		defer watcher.Done()
		q.watch(ring, quit)
	}()
	ready <- nil
	q.loop(ring)
}

// watch signals the queue whenever the ring has completions, then waits
// until the queue is about to sleep on kick again before looking again.
func (q *queue) watch(ring qring, quit <-chan struct{}) {
	for {
		if err := ring.waitReady(); err != nil {
			return
		}
		q.wake()
		select {
		case <-q.ack:
		case <-quit:
			return
		}
	}
}

func (q *queue) loop(ring qring) {
	cqes := make([]uring.CQE, len(q.slots))
	for {
		n := ring.reap(cqes)
		for _, c := range cqes[:n] {
			q.completed(ring, c)
		}
		q.mu.Lock()
		stopping := q.stopping
		q.done, q.spare = q.spare[:0], q.done
		q.mu.Unlock()
		for _, tag := range q.spare {
			q.inHandler--
			q.commit(ring, &q.slots[tag])
		}
		if q.live == 0 || (stopping && q.inHandler == 0) {
			// Submit the commits; on a stop, leave the fetches to be
			// cancelled by closing the ring.
			if err := ring.submit(); err != nil {
				q.log.Warn("ublk queue final submit", "queue", q.id, "err", err)
			}
			return
		}
		if q.direct && q.inHandler == 0 {
			// One syscall submits the commits and waits for the next
			// requests (at once if some are there already).
			ready, err := ring.wait(directWait)
			switch {
			case errors.Is(err, errNoWait):
				q.direct = false
				continue
			case err != nil:
				// The ring itself failed; nothing more can be committed.
				q.log.Error("ublk queue ring failed", "queue", q.id, "err", err)
				return
			case ready:
				continue
			}
			// Idle for directWait: sleep without holding a P.
		} else if n > 0 || len(q.spare) > 0 {
			// More may have arrived meanwhile: submit the commits and
			// look again before sleeping.
			if err := ring.submit(); err != nil {
				q.log.Error("ublk queue ring failed", "queue", q.id, "err", err)
				return
			}
			continue
		}
		if err := ring.submit(); err != nil {
			q.log.Error("ublk queue ring failed", "queue", q.id, "err", err)
			return
		}
		q.sleep(ring)
	}
}

// sleep parks the queue goroutine until a worker or the watcher kicks it,
// with the watcher's wakeups on. Completions posted while they were off
// signal nobody, so the queue looks at the ring itself once they are on,
// and again after notifySettle: a completion posted at the instant they
// turned on may have seen them still off (uring.Ring.SetEventfd). The
// watcher cannot be relied on for that second look: it may be waiting
// already, its own look done while the queue was awake (an ack or a kick
// left over from a round the queue ended by itself, in the kernel or
// woken by a worker).
func (q *queue) sleep(ring qring) {
	ring.notify(true)
	defer ring.notify(false)
	if ring.ready() {
		return
	}
	select {
	case q.ack <- struct{}{}:
	default: // the watcher has an ack it has not taken yet
	}
	if q.settle == nil {
		q.settle = time.NewTimer(notifySettle)
	} else {
		q.settle.Reset(notifySettle)
	}
	select {
	case <-q.kick:
		q.settle.Stop()
		return
	case <-q.settle.C:
	}
	if ring.ready() {
		return
	}
	<-q.kick
}

// commit queues the COMMIT_AND_FETCH of s's result.
func (q *queue) commit(ring qring, s *slot) {
	s.state = tagInKernel
	if err := ring.commit(s.tag, s.res, bufAddr(s.buf)); err != nil {
		// The ring has room for every tag, so this is a bug.
		q.log.Error("ublk commit", "queue", q.id, "tag", s.tag, "err", err)
		s.state = tagDead
		q.live--
	}
}

// completed handles a FETCH/COMMIT_AND_FETCH completion: a new request in
// the tag's descriptor, or the end of the tag. A request that fails to
// decode, or that the Handler vouches for, is answered at once; any other
// goes to a worker.
func (q *queue) completed(ring qring, c uring.CQE) {
	tag := c.UserData
	if tag >= uint64(len(q.slots)) {
		q.log.Error("ublk completion for unknown tag", "queue", q.id, "user_data", c.UserData)
		return
	}
	s := &q.slots[tag]
	if s.state != tagInKernel {
		q.log.Error("ublk completion for a tag not in the driver", "queue", q.id, "tag", tag, "state", s.state)
		return
	}
	if c.Res != 0 {
		// ABORT (-ENODEV) when the device stops; any other error means the
		// command was refused. Either way the tag is finished.
		if c.Res != ioResAbort {
			q.log.Warn("ublk io command failed", "queue", q.id, "tag", tag, "errno", unix.Errno(-c.Res))
		}
		s.state = tagDead
		q.live--
		return
	}
	var d ioDesc
	off := int(tag) * ioDescSize
	d.get(q.descs[off : off+ioDescSize])
	if err := decode(&d, q.size, s.buf, &s.req); err != nil {
		s.res = result(&s.req, err)
		q.commit(ring, s)
		return
	}
	if q.inl != nil && q.inl.Inline(&s.req) {
		s.res = result(&s.req, q.h.Handle(q.ctx, &s.req))
		q.commit(ring, s)
		return
	}
	s.state = tagInHandler
	q.inHandler++
	q.work <- s
}

// finish is called by a worker when s's handler returned.
func (q *queue) finish(s *slot) {
	q.mu.Lock()
	q.done = append(q.done, s.tag)
	first := len(q.done) == 1
	q.mu.Unlock()
	if first {
		q.wake()
	}
}

// requestStop makes the queue exit once no request is in a handler.
func (q *queue) requestStop() {
	q.mu.Lock()
	q.stopping = true
	q.mu.Unlock()
	q.wake()
}

// worker runs requests until work is closed.
func worker(ctx context.Context, h pipeline.Handler, work <-chan *slot) {
	for s := range work {
		err := h.Handle(ctx, &s.req)
		s.res = result(&s.req, err)
		s.q.finish(s)
	}
}

// kernelRing is the qring on a real ublk character device.
type kernelRing struct {
	ring   *uring.Ring
	charFd int
	qid    uint16
}

// notifySettle is how long after turning the eventfd's signals on a
// sleeping queue looks at the ring once more (queue.sleep).
const notifySettle = time.Millisecond

func newKernelRing(charFd, qid, depth int) (*kernelRing, error) {
	// Room for a command per tag.
	r, err := uring.New(uint32(depth), uring.SetupSQE128)
	if err != nil {
		return nil, err
	}
	k := &kernelRing{ring: r, charFd: charFd, qid: uint16(qid)}
	// An eventfd, whose signals the queue turns off while it waits in
	// the kernel; the ring fd in the netpoller where it cannot be had.
	if err := r.EnableEventfd(); err != nil {
		if err := r.EnablePolling(); err != nil {
			r.Close()
			return nil, err
		}
		return k, nil
	}
	r.SetEventfd(false)
	return k, nil
}

func (k *kernelRing) ioCmd(op uint32, tag uint16, res int32, addr uint64) error {
	s := k.ring.GetSQE()
	if s == nil {
		return uring.ErrRingFull
	}
	s.PrepURingCmd(k.charFd, op, uint64(tag))
	putIOCmd(k.ring.Cmd(s)[:ioCmdSize], k.qid, tag, res, addr)
	return nil
}

func (k *kernelRing) fetch(tag uint16, addr uint64) error {
	return k.ioCmd(ioFetchReq, tag, -1, addr)
}

func (k *kernelRing) commit(tag uint16, res int32, addr uint64) error {
	return k.ioCmd(ioCommitAndFetch, tag, res, addr)
}

func (k *kernelRing) submit() error { return k.ring.Flush() }

func (k *kernelRing) wait(d time.Duration) (bool, error) {
	ok, err := k.ring.WaitTimeout(d)
	if errors.Is(err, uring.ErrNoTimeout) {
		return false, errNoWait
	}
	return ok, err
}

func (k *kernelRing) reap(cqes []uring.CQE) int { return k.ring.Reap(cqes) }
func (k *kernelRing) ready() bool               { return k.ring.Ready() > 0 }
func (k *kernelRing) waitReady() error          { return k.ring.WaitReady() }

func (k *kernelRing) notify(on bool) { k.ring.SetEventfd(on) }
func (k *kernelRing) close() error   { return k.ring.Close() }
