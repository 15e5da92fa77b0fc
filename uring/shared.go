package uring

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// More opcodes, for file I/O.
const (
	OpFsync     = 3
	OpFallocate = 17
)

// FsyncDatasync is IORING_FSYNC_DATASYNC: fdatasync rather than fsync.
const FsyncDatasync = 1

const (
	registerProbe = 8
	probeOps      = 256
	opSupported   = 1 << 0 // IO_URING_OP_SUPPORTED
)

// ErrBroken is returned by a Shared ring whose submissions the kernel
// refused: nothing more goes through it, and its user should go back to
// plain system calls.
var ErrBroken = errors.New("uring: ring failed")

// Shared is a ring that many goroutines use at once, for file I/O. An
// operation (Read, Write, Fsync, Fallocate) takes one of the ring's slots,
// fills an SQE under a lock, has it submitted, and parks its goroutine on
// the slot's channel until the reaper goroutine hands it the result. No OS
// thread is held while the I/O runs: the submission never waits, and the
// reaper parks in Go's netpoller on the ring's eventfd. (A blocking pread
// holds its thread and, until sysmon retakes it, its P: on a 2-CPU machine
// two of them stall every other goroutine of the process.)
//
// Submissions are batched: a goroutine that finds another one inside
// io_uring_enter leaves its SQE to it, and that one submits until none is
// left. A burst of requests thus reaches the kernel in a few syscalls, and
// the block layer sees it as one plug (one doorbell for a virtio disk).
//
// The kernel completes file I/O as task work of the thread that submitted
// it; the CQEs are posted when that thread next runs in the kernel (woken
// for it if it sleeps), and the eventfd wakes the reaper.
type Shared struct {
	ring *Ring

	mu         sync.Mutex // guards the SQ (GetSQE, publishing) and submitting
	submitting bool       // a goroutine is submitting; others leave their SQEs to it

	free   chan uint16 // slots not in use; at most len(slots) operations are in flight
	slots  []sharedSlot
	broken atomic.Bool
	enters atomic.Int64  // submitting io_uring_enter calls
	sqes   atomic.Int64  // SQEs they handed the kernel
	reaped chan struct{} // closed when the reaper has exited
	ops    [probeOps]bool
}

// sharedSlot is one operation in flight.
type sharedSlot struct {
	done chan int32 // the result; capacity 1
	// buf keeps the operation's memory reachable while the kernel uses
	// it, and makes the callers' buffers escape to the heap: the kernel
	// writes to the address it was given, which a goroutine stack moved
	// by the runtime would no longer be.
	buf []byte
}

// NewShared sets up a ring for up to entries operations in flight (a
// power of two is best; the kernel rounds up) with its reaper goroutine,
// which runs until Close. It fails where the kernel has no io_uring or
// refuses it (io_uring_setup: ENOSYS, EPERM under seccomp or the
// kernel.io_uring_disabled sysctl), or lacks READ, WRITE or FSYNC.
func NewShared(entries uint32) (*Shared, error) {
	// Twice the SQEs of the slots: the kernel moves the SQ head only at
	// the end of a submission, and the operations of a batch may
	// complete (and their slots be taken again) before that, so up to
	// two slots' worth of SQEs can be unconsumed at once.
	r, err := New(2*entries, 0)
	if err != nil {
		return nil, err
	}
	q := &Shared{ring: r, reaped: make(chan struct{})}
	if err := q.probe(); err != nil {
		r.Close()
		return nil, err
	}
	for _, op := range []uint8{OpRead, OpWrite, OpFsync} {
		if !q.ops[op] {
			r.Close()
			return nil, fmt.Errorf("uring: kernel lacks opcode %d: %w", op, unix.EOPNOTSUPP)
		}
	}
	if err := r.EnableEventfd(); err != nil {
		r.Close()
		return nil, err
	}
	n := r.SQEntries() / 2
	q.free = make(chan uint16, n)
	q.slots = make([]sharedSlot, n)
	for i := range q.slots {
		q.slots[i].done = make(chan int32, 1)
		q.free <- uint16(i)
	}
	go q.reap() // owner: q; exits when Close closes the ring
	return q, nil
}

// probe asks the kernel which opcodes it supports (IORING_REGISTER_PROBE,
// 5.6).
func (q *Shared) probe() error {
	var buf [16 + probeOps*8]byte
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(q.ring.fd), registerProbe,
		uintptr(unsafe.Pointer(&buf[0])), probeOps, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register probe: %w", errno)
	}
	n := int(buf[1]) // ops_len
	for i := 0; i < n && i < probeOps; i++ {
		op := buf[16+8*i : 16+8*i+8]
		if op[2]&opSupported != 0 { // flags, little-endian u16
			q.ops[op[0]] = true
		}
	}
	return nil
}

// Supports reports whether the kernel supports opcode op on this ring.
func (q *Shared) Supports(op uint8) bool { return q.ops[op] }

// SharedStats counts a Shared ring's submissions.
type SharedStats struct {
	// Enters is the number of io_uring_enter calls that submitted, SQEs
	// the entries they handed over: SQEs/Enters is the batch size.
	Enters, SQEs int64
}

// Stats returns the ring's counters.
func (q *Shared) Stats() SharedStats {
	return SharedStats{Enters: q.enters.Load(), SQEs: q.sqes.Load()}
}

// Entries is how many operations may be in flight at once; more wait for
// a slot.
func (q *Shared) Entries() int { return len(q.slots) }

// Read reads into p at off from fd (one read: it may be short). buf must
// not be used by anyone else until Read returns.
func (q *Shared) Read(fd int, p []byte, off int64) (int, error) {
	return q.do(OpRead, fd, p, uint64(off), 0, 0, 0)
}

// Write writes p at off to fd (one write: it may be short), with
// pwritev2-style flags rwFlags (unix.RWF_DSYNC; 0 for none).
func (q *Shared) Write(fd int, p []byte, off int64, rwFlags int) (int, error) {
	return q.do(OpWrite, fd, p, uint64(off), 0, 0, uint32(rwFlags))
}

// Fsync is fsync(2) of fd, or fdatasync with flags FsyncDatasync.
func (q *Shared) Fsync(fd int, flags uint32) error {
	_, err := q.do(OpFsync, fd, nil, 0, 0, 0, flags)
	return err
}

// Fallocate is fallocate(2); see Supports(OpFallocate) (5.6).
func (q *Shared) Fallocate(fd int, mode uint32, off, length int64) error {
	_, err := q.do(OpFallocate, fd, nil, uint64(off), uint64(length), mode, 0)
	return err
}

// do runs one operation: for READ and WRITE, buf's address and length go
// in the SQE; FALLOCATE takes its length in addr and its mode in len.
func (q *Shared) do(op uint8, fd int, buf []byte, off, addr uint64, length, opFlags uint32) (int, error) {
	if q.broken.Load() {
		return 0, ErrBroken
	}
	i, ok := <-q.free
	if !ok {
		return 0, ErrClosed
	}
	sl := &q.slots[i]
	sl.buf = buf
	q.mu.Lock()
	s := q.ring.GetSQE() // never nil: see NewShared
	s.Opcode = op
	s.Fd = int32(fd)
	s.Off = off
	s.UserData = uint64(i)
	s.OpFlags = opFlags
	switch op {
	case OpRead, OpWrite:
		if len(buf) > 0 {
			s.Addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
		}
		s.Len = uint32(len(buf))
	default:
		s.Addr = addr
		s.Len = length
	}
	atomic.StoreUint32(q.ring.sqTail, q.ring.tail)
	lead := !q.submitting
	q.submitting = true
	q.mu.Unlock()
	if lead {
		// Let the goroutines already runnable here (the other requests
		// of a burst a frontend just handed out) add their SQEs first,
		// so that one submission carries them all.
		runtime.Gosched()
		q.submit()
	}
	res := <-sl.done
	sl.buf = nil
	q.free <- i
	if res < 0 {
		if res == -int32(unix.ECANCELED) && q.broken.Load() {
			return 0, ErrBroken
		}
		return 0, unix.Errno(-res)
	}
	return int(res), nil
}

// submit hands the kernel every published SQE, including those other
// goroutines add meanwhile, then gives up the submitter's role.
func (q *Shared) submit() {
	for {
		q.mu.Lock()
		n := q.ring.tail - atomic.LoadUint32(q.ring.sqHead)
		if n == 0 {
			q.submitting = false
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
		var err error
		var got int
		if testEnter != nil {
			err = testEnter(n)
		} else {
			got, err = q.ring.enter(n, 0, 0)
		}
		q.enters.Add(1)
		q.sqes.Add(int64(max(got, 0)))
		switch err {
		case nil, unix.EINTR:
		case unix.EAGAIN, unix.EBUSY:
			// Out of kernel memory for requests, or completions backed
			// up (cannot happen: no more are out than the CQ holds);
			// let the reaper and others run, then retry.
			runtime.Gosched()
		default:
			q.fail()
			return
		}
	}
}

// fail marks the ring broken after the kernel refused a submission: the
// SQEs it did not take are answered ECANCELED (their callers see
// ErrBroken), and later operations fail at once.
func (q *Shared) fail() {
	q.broken.Store(true)
	q.mu.Lock()
	defer q.mu.Unlock()
	for h := atomic.LoadUint32(q.ring.sqHead); h != q.ring.tail; h++ {
		off := (h & q.ring.sqMask) * q.ring.sqeSize
		s := (*SQE)(unsafe.Pointer(&q.ring.sqeMem[off]))
		q.slots[s.UserData].done <- -int32(unix.ECANCELED)
	}
	// Nothing is pending any more: the next submission starts afresh.
	q.ring.tail = atomic.LoadUint32(q.ring.sqHead)
	atomic.StoreUint32(q.ring.sqTail, q.ring.tail)
	q.submitting = false
}

// reap hands every completion to the goroutine waiting for it, until the
// ring is closed.
func (q *Shared) reap() {
	defer close(q.reaped)
	cqes := make([]CQE, q.ring.CQEntries())
	for {
		if err := q.ring.WaitReady(); err != nil {
			return
		}
		n := q.ring.Reap(cqes)
		for _, c := range cqes[:n] {
			if c.UserData < uint64(len(q.slots)) {
				q.slots[c.UserData].done <- c.Res
			}
		}
	}
}

// testEnter, set by tests before a Shared ring is made, replaces the
// submitting io_uring_enter.
var testEnter func(n uint32) error

// Close waits for the operations in flight, stops the reaper and closes
// the ring. No operation may start once Close is called.
func (q *Shared) Close() error {
	for range q.slots {
		<-q.free
	}
	close(q.free)
	// The reaper first (closing the eventfd ends its wait), so that
	// nothing reads the rings when they are unmapped.
	err := q.ring.closeEventfd()
	<-q.reaped
	return errors.Join(err, q.ring.Close())
}
