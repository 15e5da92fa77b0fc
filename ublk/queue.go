package ublk

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
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
	reap(cqes []uring.CQE) int
	// waitReady blocks until a completion is ready to reap; it fails once
	// the ring is closed. It may run concurrently with the methods above.
	waitReady() error
	close() error
}

// Tag states, owned by the queue goroutine.
const (
	tagInKernel  = iota // a FETCH or COMMIT_AND_FETCH is pending in the driver
	tagInHandler        // a worker is running the request
	tagDead             // the driver ended the command; never fetched again
)

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
// The queue goroutine sleeps on kick, a Go channel, which workers (a
// request finished) and the watcher goroutine (the ring has completions)
// signal. A worker thus wakes the queue with a channel send, no syscall and
// no kernel round trip; the watcher parks in the netpoller on the ring fd
// (see uring.EnablePolling), so an idle queue holds no P.
type queue struct {
	id      int
	size    int64
	descs   []byte // the driver's descriptor array, read-only mapping
	slots   []slot
	work    chan<- *slot
	log     *slog.Logger
	newRing func() (qring, error)

	kick chan struct{} // capacity 1: a pending wake-up is never lost
	ack  chan struct{} // capacity 1: the queue reaped; the watcher may poll again

	mu       sync.Mutex
	done     []uint16 // tags whose handler finished, for the queue goroutine
	stopping bool     // set by requestStop under mu

	spare     []uint16
	inHandler int
	live      int
}

func newQueue(id int, size int64, descs []byte, bufs [][]byte, work chan<- *slot, log *slog.Logger, newRing func() (qring, error)) *queue {
	q := &queue{id: id, size: size, descs: descs, work: work, log: log, newRing: newRing,
		kick: make(chan struct{}, 1), ack: make(chan struct{}, 1)}
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
// for the queue to have reaped before looking again.
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
		// Submit the commits queued last round. (The driver's completions
		// reach the ring as task work on this thread, which the kernel
		// runs whenever the thread wakes; no syscall is needed for them.)
		if err := ring.submit(); err != nil {
			// The ring itself failed; nothing more can be committed.
			q.log.Error("ublk queue ring failed", "queue", q.id, "err", err)
			return
		}
		n := ring.reap(cqes)
		for _, c := range cqes[:n] {
			q.completed(c)
		}
		if n > 0 {
			select {
			case q.ack <- struct{}{}:
			default:
			}
		}
		q.mu.Lock()
		stopping := q.stopping
		q.done, q.spare = q.spare[:0], q.done
		q.mu.Unlock()
		for _, tag := range q.spare {
			s := &q.slots[tag]
			q.inHandler--
			s.state = tagInKernel
			if err := ring.commit(tag, s.res, bufAddr(s.buf)); err != nil {
				// The ring has room for every tag, so this is a bug.
				q.log.Error("ublk commit", "queue", q.id, "tag", tag, "err", err)
				s.state = tagDead
				q.live--
			}
		}
		if q.live == 0 {
			return
		}
		if stopping && q.inHandler == 0 {
			// Submit the commits, then leave the fetches to be cancelled by
			// closing the ring.
			if err := ring.submit(); err != nil {
				q.log.Warn("ublk queue final submit", "queue", q.id, "err", err)
			}
			return
		}
		if n == 0 && len(q.spare) == 0 {
			<-q.kick
		}
	}
}

// completed handles a FETCH/COMMIT_AND_FETCH completion: a new request in
// the tag's descriptor, or the end of the tag.
func (q *queue) completed(c uring.CQE) {
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
	s.state = tagInHandler
	q.inHandler++
	if err := decode(&d, q.size, s.buf, &s.req); err != nil {
		s.res = result(&s.req, err)
		q.mu.Lock()
		q.done = append(q.done, s.tag)
		q.mu.Unlock()
		return
	}
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

func newKernelRing(charFd, qid, depth int) (*kernelRing, error) {
	// Room for a command per tag.
	r, err := uring.New(uint32(depth), uring.SetupSQE128)
	if err != nil {
		return nil, err
	}
	if err := r.EnablePolling(); err != nil {
		r.Close()
		return nil, err
	}
	return &kernelRing{ring: r, charFd: charFd, qid: uint16(qid)}, nil
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

func (k *kernelRing) submit() error             { return k.ring.Flush() }
func (k *kernelRing) reap(cqes []uring.CQE) int { return k.ring.Reap(cqes) }
func (k *kernelRing) waitReady() error          { return k.ring.WaitReady() }
func (k *kernelRing) close() error              { return k.ring.Close() }
