package ublk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/ublk/uring"
)

// qring is what a queue needs from the kernel: the real one is an io_uring
// on /dev/ublkcN plus an eventfd (kernelRing); tests use a fake that plays
// the driver. Every method but wake is called only by the queue goroutine.
type qring interface {
	// fetch queues FETCH_REQ for tag with its data buffer at addr.
	fetch(tag uint16, addr uint64) error
	// commit queues COMMIT_AND_FETCH_REQ for tag with result res.
	commit(tag uint16, res int32, addr uint64) error
	// armWake queues the read that completes (user data wakeTag) after
	// wake is called.
	armWake() error
	// submitAndWait submits what is queued and, if wait, blocks until a
	// completion is ready.
	submitAndWait(wait bool) error
	reap(cqes []uring.CQE) int
	// wake makes the armed wake read complete; safe from any goroutine
	// until close.
	wake() error
	close() error
}

const wakeTag = 1 << 32

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
type queue struct {
	id      int
	size    int64
	descs   []byte // the driver's descriptor array, read-only mapping
	slots   []slot
	work    chan<- *slot
	log     *slog.Logger
	newRing func() (qring, error)
	ring    qring

	mu       sync.Mutex
	done     []uint16 // tags whose handler finished, for the queue goroutine
	stopping bool     // set by requestStop under mu

	spare     []uint16
	inHandler int
	live      int
}

func newQueue(id int, size int64, descs []byte, bufs [][]byte, work chan<- *slot, log *slog.Logger, newRing func() (qring, error)) *queue {
	q := &queue{id: id, size: size, descs: descs, work: work, log: log, newRing: newRing}
	q.slots = make([]slot, len(bufs))
	for i := range q.slots {
		q.slots[i] = slot{q: q, tag: uint16(i), buf: bufs[i]}
	}
	q.done = make([]uint16, 0, len(bufs))
	q.spare = make([]uint16, 0, len(bufs))
	return q
}

func bufAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

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
	q.mu.Lock()
	q.ring = ring
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		q.ring = nil
		q.mu.Unlock()
		if err := ring.close(); err != nil {
			q.log.Warn("ublk queue close", "queue", q.id, "err", err)
		}
	}()
	for i := range q.slots {
		if err := ring.fetch(uint16(i), bufAddr(q.slots[i].buf)); err != nil {
			ready <- fmt.Errorf("queue %d fetch: %w", q.id, err)
			return
		}
	}
	q.live = len(q.slots)
	if err := ring.armWake(); err != nil {
		ready <- fmt.Errorf("queue %d: %w", q.id, err)
		return
	}
	if err := ring.submitAndWait(false); err != nil {
		ready <- fmt.Errorf("queue %d submit fetches: %w", q.id, err)
		return
	}
	ready <- nil
	q.loop(ring)
}

func (q *queue) loop(ring qring) {
	// A stop requested before the ring existed could not wake us.
	q.mu.Lock()
	stopped := q.stopping
	q.mu.Unlock()
	if stopped {
		return
	}
	cqes := make([]uring.CQE, len(q.slots)+1)
	for {
		if err := ring.submitAndWait(true); err != nil {
			// The ring itself failed; nothing more can be committed.
			q.log.Error("ublk queue ring failed", "queue", q.id, "err", err)
			return
		}
		n := ring.reap(cqes)
		rearm := false
		for _, c := range cqes[:n] {
			if c.UserData == wakeTag {
				rearm = true
				continue
			}
			q.completed(ring, c)
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
			if err := ring.submitAndWait(false); err != nil {
				q.log.Warn("ublk queue final submit", "queue", q.id, "err", err)
			}
			return
		}
		if rearm {
			if err := ring.armWake(); err != nil {
				q.log.Error("ublk queue arm wake", "queue", q.id, "err", err)
				return
			}
		}
	}
}

// completed handles a FETCH/COMMIT_AND_FETCH completion: a new request in
// the tag's descriptor, or the end of the tag.
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
	defer q.mu.Unlock()
	q.done = append(q.done, s.tag)
	// Wake under mu: the queue cannot exit (and close the eventfd) while a
	// tag is in a handler, and it learns of this one only after unlock.
	if len(q.done) == 1 && q.ring != nil {
		if err := q.ring.wake(); err != nil {
			q.log.Error("ublk queue wake", "queue", q.id, "err", err)
		}
	}
}

// requestStop makes the queue exit once no request is in a handler.
func (q *queue) requestStop() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.stopping = true
	if q.ring != nil {
		if err := q.ring.wake(); err != nil {
			q.log.Error("ublk queue wake", "queue", q.id, "err", err)
		}
	}
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
	efd    int
	wbuf   []byte // 8 bytes the eventfd read lands in (mmapped)
}

var one = [8]byte{1}

func newKernelRing(charFd, qid, depth int, wbuf []byte) (*kernelRing, error) {
	// Room for a command per tag plus the wake read.
	r, err := uring.New(uint32(depth+1), uring.SetupSQE128)
	if err != nil {
		return nil, err
	}
	// Wait in the netpoller, not in io_uring_enter: see uring.EnablePolling.
	if err := r.EnablePolling(); err != nil {
		r.Close()
		return nil, err
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return &kernelRing{ring: r, charFd: charFd, qid: uint16(qid), efd: efd, wbuf: wbuf}, nil
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

func (k *kernelRing) armWake() error {
	s := k.ring.GetSQE()
	if s == nil {
		return uring.ErrRingFull
	}
	s.PrepRead(k.efd, k.wbuf[:8], 0, wakeTag)
	return nil
}

func (k *kernelRing) submitAndWait(wait bool) error {
	if !wait {
		_, err := k.ring.Submit()
		return err
	}
	return k.ring.WaitPoll()
}

func (k *kernelRing) reap(cqes []uring.CQE) int { return k.ring.Reap(cqes) }

func (k *kernelRing) wake() error {
	_, err := unix.Write(k.efd, one[:])
	return err
}

func (k *kernelRing) close() error {
	return errors.Join(k.ring.Close(), unix.Close(k.efd))
}
