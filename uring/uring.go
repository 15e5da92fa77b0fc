// Package uring is a small io_uring ring on golang.org/x/sys/unix, made for
// the ublk frontend: it supports 128-byte SQEs (IORING_SETUP_SQE128) and
// IORING_OP_URING_CMD, which the general-purpose Go io_uring libraries get
// wrong or lack. It does only what ublk needs: setup, the three mmaps, NOP,
// READ, WRITE and URING_CMD preparation, submit, submit-and-wait, reaping
// completions into a caller's slice, and Close.
//
// A Ring is not safe for concurrent use: one goroutine owns it (for ublk,
// the goroutine locked to the queue's OS thread). Preparing and reaping
// allocate nothing.
package uring

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Setup flags (include/uapi/linux/io_uring.h).
const (
	SetupCQSize       = 1 << 3
	SetupClamp        = 1 << 4
	SetupCoopTaskrun  = 1 << 8
	SetupSQE128       = 1 << 10
	SetupCQE32        = 1 << 11
	SetupSingleIssuer = 1 << 12
)

// Features reported by the kernel in io_uring_params.features.
const (
	FeatSingleMmap = 1 << 0
	FeatNoDrop     = 1 << 1
	FeatExtArg     = 1 << 8 // io_uring_enter takes a timeout (5.11)
)

// Opcodes used by blockd.
const (
	OpNop      = 0
	OpRead     = 22
	OpWrite    = 23
	OpURingCmd = 46
)

const (
	enterGetEvents = 1 << 0
	enterExtArg    = 1 << 3

	registerEventfd = 4
	cqEventfdOff    = 1 << 0 // IORING_CQ_EVENTFD_DISABLED in the CQ ring's flags

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000
)

// ErrRingFull is returned when no SQE is free; submit what is prepared
// (and reap completions if the kernel reports EBUSY) and try again.
var ErrRingFull = errors.New("uring: submission queue full")

// ErrClosed is returned by operations on a closed ring.
var ErrClosed = errors.New("uring: ring closed")

// SQE is the 64-byte submission queue entry. For URING_CMD, the command
// opcode is the low 32 bits of Off and the command payload starts at byte 48
// (see Ring.Cmd).
type SQE struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64
	Addr        uint64
	Len         uint32
	OpFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	SpliceFdIn  int32
	Addr3       uint64
	pad2        uint64
}

// CQE is a completion: UserData from the SQE, Res the result (a negative
// errno on failure) and Flags.
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

type sqOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

type cqOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

type params struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  sqOffsets
	CQOff                                                                  cqOffsets
}

// Ring is one io_uring instance.
type Ring struct {
	fd       int
	flags    uint32
	features uint32

	sqRing, cqRing, sqeMem []byte // cqRing aliases sqRing with FeatSingleMmap

	sqHead, sqTail    *uint32
	sqMask, sqEntries uint32
	sqeSize           uint32
	tail              uint32 // next SQE to hand out; published at submit

	cqHead, cqTail *uint32
	cqFlags        *uint32 // nil before 5.8
	cqMask         uint32
	cqEntries      uint32
	cqeSize        uint32
	cqes           unsafe.Pointer

	// WaitTimeout's argument to io_uring_enter; kept here, not on the
	// stack, so a wait allocates nothing.
	waitArg getEventsArg
	waitTS  unix.Timespec

	// Set by EnablePolling: the ring fd in Go's netpoller.
	file    *os.File
	rc      syscall.RawConn
	pollFn  func(uintptr) bool
	readyFn func(uintptr) bool
	pollErr error

	// Set by EnableEventfd: an eventfd the kernel signals, in the
	// netpoller; WaitReady waits on it instead of the ring fd.
	evFile    *os.File
	evRC      syscall.RawConn
	evReadyFn func(uintptr) bool
	evBuf     [8]byte
}

// New sets up a ring with at least entries SQEs and the given Setup* flags.
func New(entries uint32, flags uint32) (*Ring, error) {
	var p params
	p.Flags = flags
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{fd: int(fd), flags: flags, features: p.Features, sqeSize: 64, cqeSize: 16}
	if flags&SetupSQE128 != 0 {
		r.sqeSize = 128
	}
	if flags&SetupCQE32 != 0 {
		r.cqeSize = 32
	}
	if err := r.mmap(&p); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Ring) mmap(p *params) error {
	sqSize := int(p.SQOff.Array + p.SQEntries*4)
	cqSize := int(p.CQOff.CQEs + p.CQEntries*r.cqeSize)
	single := p.Features&FeatSingleMmap != 0
	if single && cqSize > sqSize {
		sqSize = cqSize
	}
	var err error
	r.sqRing, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap sq ring: %w", err)
	}
	if single {
		r.cqRing = r.sqRing
	} else {
		r.cqRing, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("mmap cq ring: %w", err)
		}
	}
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.SQEntries*r.sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap sqes: %w", err)
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	r.sqHead = u32(r.sqRing, p.SQOff.Head)
	r.sqTail = u32(r.sqRing, p.SQOff.Tail)
	r.sqMask = *u32(r.sqRing, p.SQOff.RingMask)
	r.sqEntries = *u32(r.sqRing, p.SQOff.RingEntries)
	r.cqHead = u32(r.cqRing, p.CQOff.Head)
	r.cqTail = u32(r.cqRing, p.CQOff.Tail)
	if p.CQOff.Flags != 0 {
		r.cqFlags = u32(r.cqRing, p.CQOff.Flags)
	}
	r.cqMask = *u32(r.cqRing, p.CQOff.RingMask)
	r.cqEntries = *u32(r.cqRing, p.CQOff.RingEntries)
	r.cqes = unsafe.Pointer(&r.cqRing[p.CQOff.CQEs])
	// SQE i always sits in slot i of the indirection array, so the array is
	// filled once here and never touched again.
	for i := uint32(0); i < r.sqEntries; i++ {
		*u32(r.sqRing, p.SQOff.Array+4*i) = i
	}
	r.tail = atomic.LoadUint32(r.sqTail)
	return nil
}

// Fd returns the ring's file descriptor.
func (r *Ring) Fd() int { return r.fd }

// Features returns the IORING_FEAT_* bits the kernel reported.
func (r *Ring) Features() uint32 { return r.features }

// SQEntries and CQEntries return the ring sizes the kernel chose.
func (r *Ring) SQEntries() uint32 { return r.sqEntries }

// CQEntries returns the completion ring size.
func (r *Ring) CQEntries() uint32 { return r.cqEntries }

// GetSQE returns a zeroed SQE to fill in, or nil when the submission queue
// is full. The SQE goes to the kernel at the next Submit.
func (r *Ring) GetSQE() *SQE {
	if r.fd < 0 {
		return nil
	}
	head := atomic.LoadUint32(r.sqHead)
	if r.tail-head >= r.sqEntries {
		return nil
	}
	off := (r.tail & r.sqMask) * r.sqeSize
	r.tail++
	b := r.sqeMem[off : off+r.sqeSize]
	clear(b)
	return (*SQE)(unsafe.Pointer(&b[0]))
}

// Cmd returns the 80-byte command area (bytes 48..127) of an SQE from a
// ring set up with SetupSQE128. It panics on a 64-byte ring, where the
// area is only 16 bytes and a caller writing 80 would corrupt the next SQE.
func (r *Ring) Cmd(s *SQE) *[80]byte {
	if r.sqeSize != 128 {
		panic("uring: Cmd needs a ring set up with SetupSQE128")
	}
	return (*[80]byte)(unsafe.Add(unsafe.Pointer(s), 48))
}

// PrepNop makes s a no-op that completes with res 0.
func (s *SQE) PrepNop(userData uint64) {
	s.Opcode = OpNop
	s.UserData = userData
}

// PrepRead reads len(buf) bytes at off from fd into buf. buf must stay
// valid and unmoved until the completion: use mmapped memory or keep the
// Go heap slice referenced.
func (s *SQE) PrepRead(fd int, buf []byte, off uint64, userData uint64) {
	s.prepRW(OpRead, fd, buf, off, userData)
}

// PrepWrite writes buf at off to fd; the same lifetime rule as PrepRead.
func (s *SQE) PrepWrite(fd int, buf []byte, off uint64, userData uint64) {
	s.prepRW(OpWrite, fd, buf, off, userData)
}

func (s *SQE) prepRW(op uint8, fd int, buf []byte, off uint64, userData uint64) {
	s.Opcode = op
	s.Fd = int32(fd)
	s.Off = off
	if len(buf) > 0 {
		s.Addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
	}
	s.Len = uint32(len(buf))
	s.UserData = userData
}

// PrepURingCmd makes s an IORING_OP_URING_CMD with command opcode cmdOp
// on fd; the payload goes in Ring.Cmd(s).
func (s *SQE) PrepURingCmd(fd int, cmdOp uint32, userData uint64) {
	s.Opcode = OpURingCmd
	s.Fd = int32(fd)
	s.Off = uint64(cmdOp)
	s.UserData = userData
}

func (r *Ring) enter(toSubmit, minComplete, flags uint32) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return int(n), errno
	}
	return int(n), nil
}

// pending publishes the prepared SQEs and returns how many the kernel has
// not consumed yet.
func (r *Ring) pending() uint32 {
	atomic.StoreUint32(r.sqTail, r.tail)
	return r.tail - atomic.LoadUint32(r.sqHead)
}

// Submit hands every prepared SQE to the kernel without waiting. It
// returns the number consumed. EINTR is retried; EBUSY/EAGAIN are returned
// (wrapped) so the caller can reap completions and retry.
func (r *Ring) Submit() (int, error) {
	if r.fd < 0 {
		return 0, ErrClosed
	}
	for {
		n := r.pending()
		if n == 0 {
			return 0, nil
		}
		got, err := r.enter(n, 0, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return got, fmt.Errorf("io_uring_enter: %w", err)
		}
		return got, nil
	}
}

// SubmitAndWait submits every prepared SQE and waits until at least want
// completions are ready to reap. Signals (Go's preemption uses SIGURG)
// interrupt the wait; it is resumed.
func (r *Ring) SubmitAndWait(want uint32) error {
	if r.fd < 0 {
		return ErrClosed
	}
	for {
		n := r.pending()
		if n == 0 && r.Ready() >= want {
			return nil
		}
		_, err := r.enter(n, want, enterGetEvents)
		switch err {
		case nil, unix.EINTR:
		case unix.EBUSY, unix.EAGAIN:
			// Completions are backed up; the caller must reap first.
			if r.Ready() > 0 {
				return nil
			}
			return fmt.Errorf("io_uring_enter: %w", err)
		default:
			return fmt.Errorf("io_uring_enter: %w", err)
		}
	}
}

// getEventsArg is struct io_uring_getevents_arg.
type getEventsArg struct {
	sigmask   uint64
	sigmaskSz uint32
	pad       uint32
	ts        uint64
}

// ErrNoTimeout is returned by WaitTimeout on kernels whose io_uring_enter
// takes no timeout (before 5.11).
var ErrNoTimeout = errors.New("uring: io_uring_enter has no timeout on this kernel")

// WaitTimeout submits every prepared SQE and waits in io_uring_enter until
// a completion is ready or d has passed; it reports whether one is ready.
// Unlike WaitPoll the calling thread sleeps in the kernel, so task work
// queued for it (ublk's requests) runs and posts its completion within the
// same syscall: one wakeup, no netpoller. The goroutine keeps its P while
// it waits (until sysmon retakes it), so keep d short. Signals interrupt
// the wait; it is resumed with the time left.
func (r *Ring) WaitTimeout(d time.Duration) (bool, error) {
	if r.fd < 0 {
		return false, ErrClosed
	}
	if r.features&FeatExtArg == 0 {
		return false, ErrNoTimeout
	}
	deadline := time.Now().Add(d)
	for {
		n := r.pending()
		if n == 0 && r.Ready() > 0 {
			return true, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			left = 0
		}
		r.waitTS = unix.NsecToTimespec(int64(left))
		r.waitArg = getEventsArg{ts: uint64(uintptr(unsafe.Pointer(&r.waitTS)))}
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), 1,
			enterGetEvents|enterExtArg, uintptr(unsafe.Pointer(&r.waitArg)), unsafe.Sizeof(r.waitArg))
		switch errno {
		case 0, unix.ETIME:
			if errno == unix.ETIME || r.Ready() > 0 {
				return r.Ready() > 0, nil
			}
		case unix.EINTR:
		case unix.EBUSY, unix.EAGAIN:
			if r.Ready() > 0 {
				return true, nil
			}
			return false, fmt.Errorf("io_uring_enter: %w", errno)
		default:
			return false, fmt.Errorf("io_uring_enter: %w", errno)
		}
		if left == 0 {
			return r.Ready() > 0, nil
		}
	}
}

// EnablePolling puts the ring's fd in Go's netpoller so that WaitPoll can
// wait for completions without occupying a P. A goroutine blocked in
// io_uring_enter keeps its P until sysmon retakes it (up to 10 ms when the
// process is idle), and a goroutine it just readied (a worker it handed a
// request to) waits that long; parked in the netpoller it holds nothing.
func (r *Ring) EnablePolling() error {
	if r.fd < 0 {
		return ErrClosed
	}
	if err := unix.SetNonblock(r.fd, true); err != nil {
		return fmt.Errorf("ring nonblock: %w", err)
	}
	r.file = os.NewFile(uintptr(r.fd), "io_uring")
	rc, err := r.file.SyscallConn()
	if err != nil {
		return fmt.Errorf("ring poll: %w", err)
	}
	r.rc = rc
	// Made once: a closure per wait would allocate.
	r.readyFn = func(uintptr) bool { return r.Ready() > 0 }
	r.pollFn = func(uintptr) bool {
		// Submit, run pending task work and flush completions, without
		// blocking; report whether there is something to reap.
		_, err := r.enter(r.pending(), 0, enterGetEvents)
		switch err {
		case nil, unix.EINTR, unix.EAGAIN, unix.EBUSY:
		default:
			r.pollErr = fmt.Errorf("io_uring_enter: %w", err)
			return true
		}
		return r.Ready() > 0
	}
	return nil
}

// WaitPoll submits every prepared SQE and waits, parked in the netpoller,
// until a completion is ready. It needs EnablePolling.
func (r *Ring) WaitPoll() error {
	if r.rc == nil {
		return errors.New("uring: WaitPoll without EnablePolling")
	}
	r.pollErr = nil
	if err := r.rc.Read(r.pollFn); err != nil {
		return fmt.Errorf("ring poll: %w", err)
	}
	return r.pollErr
}

// Flush submits every prepared SQE without waiting. Unlike Submit it
// makes no syscall when nothing is prepared. It retries EINTR.
func (r *Ring) Flush() error {
	if r.fd < 0 {
		return ErrClosed
	}
	for {
		n := r.pending()
		if n == 0 {
			return nil
		}
		_, err := r.enter(n, 0, enterGetEvents)
		switch err {
		case nil:
			return nil
		case unix.EINTR:
		default:
			return fmt.Errorf("io_uring_enter: %w", err)
		}
	}
}

// EnableEventfd registers an eventfd with the ring
// (IORING_REGISTER_EVENTFD), which the kernel signals when it posts
// completions, and puts it in Go's netpoller: WaitReady then parks on the
// eventfd instead of polling the ring fd. Its signals can be turned off
// (SetEventfd) while the owner waits for completions in io_uring_enter
// itself: a ring fd in epoll, by contrast, wakes the netpoller's thread
// for every batch posted whoever waits, once it has been polled at all.
func (r *Ring) EnableEventfd() error {
	if r.fd < 0 {
		return ErrClosed
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	fd32 := int32(efd)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerEventfd, uintptr(unsafe.Pointer(&fd32)), 1, 0, 0)
	if errno != 0 {
		unix.Close(efd)
		return fmt.Errorf("io_uring_register eventfd: %w", errno)
	}
	r.evFile = os.NewFile(uintptr(efd), "io_uring-eventfd")
	rc, err := r.evFile.SyscallConn()
	if err != nil {
		r.evFile.Close()
		r.evFile = nil
		return fmt.Errorf("eventfd poll: %w", err)
	}
	r.evRC = rc
	// Made once: a closure per wait would allocate.
	r.evReadyFn = func(fd uintptr) bool {
		// Consume the signal (EAGAIN when there is none), then look.
		unix.Read(int(fd), r.evBuf[:])
		return r.Ready() > 0
	}
	return nil
}

// closeEventfd closes EnableEventfd's eventfd, which ends a WaitReady in
// progress (and fails later ones), leaving the ring open.
func (r *Ring) closeEventfd() error {
	if r.evFile == nil {
		return nil
	}
	err := r.evFile.Close()
	r.evFile = nil
	return err
}

// SetEventfd turns the signals of EnableEventfd's eventfd on or off
// (IORING_CQ_EVENTFD_DISABLED). Only the ring's owner may call it. Turning
// it on races with a completion being posted at that instant (neither
// side's check has a full barrier on the kernel's side), so a waiter that
// starts right after should look again shortly (WaitReadyTimeout).
func (r *Ring) SetEventfd(on bool) {
	if r.cqFlags == nil {
		return
	}
	f := atomic.LoadUint32(r.cqFlags)
	if on {
		f &^= cqEventfdOff
	} else {
		f |= cqEventfdOff
	}
	atomic.StoreUint32(r.cqFlags, f)
}

// WaitReady parks the calling goroutine in the netpoller until a
// completion is ready to reap. Unlike every other method it may be called
// from a goroutine other than the ring's owner, concurrently with it: it
// only reads the completion ring's indices. It returns an error once Close
// has been called (Close waits for it to return before unmapping). It
// needs EnablePolling or EnableEventfd.
func (r *Ring) WaitReady() error {
	rc, fn := r.rc, r.readyFn
	if r.evRC != nil {
		rc, fn = r.evRC, r.evReadyFn
	}
	if rc == nil {
		return errors.New("uring: WaitReady without EnablePolling or EnableEventfd")
	}
	if err := rc.Read(fn); err != nil {
		return fmt.Errorf("ring poll: %w", err)
	}
	return nil
}

// WaitReadyTimeout is WaitReady for at most d; it reports whether a
// completion is ready. It needs EnableEventfd.
func (r *Ring) WaitReadyTimeout(d time.Duration) (bool, error) {
	if r.evRC == nil {
		return false, errors.New("uring: WaitReadyTimeout without EnableEventfd")
	}
	if err := r.evFile.SetReadDeadline(time.Now().Add(d)); err != nil {
		return false, fmt.Errorf("ring poll: %w", err)
	}
	err := r.evRC.Read(r.evReadyFn)
	if derr := r.evFile.SetReadDeadline(time.Time{}); derr != nil && err == nil {
		err = derr
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return r.Ready() > 0, nil
	}
	if err != nil {
		return false, fmt.Errorf("ring poll: %w", err)
	}
	return true, nil
}

// Ready returns the number of completions waiting to be reaped.
func (r *Ring) Ready() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// Reap copies up to len(cqes) ready completions into cqes, frees their
// slots and returns how many it copied.
func (r *Ring) Reap(cqes []CQE) int {
	if r.fd < 0 {
		return 0
	}
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for head != tail && n < len(cqes) {
		cqes[n] = *(*CQE)(unsafe.Add(r.cqes, uintptr((head&r.cqMask)*r.cqeSize)))
		head++
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}

// Close unmaps the rings and closes the fd; the kernel cancels whatever is
// still in flight. Close is idempotent.
func (r *Ring) Close() error {
	if r.fd < 0 {
		return nil
	}
	var errs []error
	// With polling, close the files first: closing waits for a
	// WaitReady in progress to return, after which nothing reads the
	// rings.
	errs = append(errs, r.closeEventfd())
	if r.file != nil {
		errs = append(errs, r.file.Close())
	}
	if r.sqeMem != nil {
		errs = append(errs, unix.Munmap(r.sqeMem))
	}
	if r.cqRing != nil && len(r.sqRing) > 0 && &r.cqRing[0] != &r.sqRing[0] {
		errs = append(errs, unix.Munmap(r.cqRing))
	}
	if r.sqRing != nil {
		errs = append(errs, unix.Munmap(r.sqRing))
	}
	if r.file == nil {
		errs = append(errs, unix.Close(r.fd))
	}
	r.fd = -1
	r.sqRing, r.cqRing, r.sqeMem = nil, nil, nil
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close ring: %w", err)
	}
	return nil
}
