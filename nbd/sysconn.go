package nbd

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// sysConn reads and writes a connection's socket with raw system calls,
// waiting for readiness in the runtime's netpoller exactly as net.Conn
// does (deadlines and Close included: syscall.RawConn).
//
// Why: the socket is non-blocking, so read and writev return at once, but
// the runtime brackets every ordinary system call with entersyscall, which
// wakes the sysmon thread if it went to sleep because every P was idle.
// At queue depth 1 every request finds the process idle, so each one paid
// for waking sysmon (a futex wake, a context switch, and sysmon's 20 µs
// polling until the process is idle again): about a quarter of the
// daemon's CPU per request on a 2-core host. A raw system call does not
// enter the scheduler, which is right for calls that cannot block.
type sysConn struct {
	rc syscall.RawConn

	// Arguments and results of the call in progress; the RawConn callbacks
	// are method values made once, since a closure per call would
	// allocate. Reads come from the connection's reader only, writes only
	// under conn.wmu, so each half has one caller at a time.
	rp     []byte
	rn     int
	rerr   syscall.Errno
	readFn func(uintptr) bool
	// beforeWait, if set, runs once per Read when the socket has nothing
	// to read, before the reader waits: the connection writes the replies
	// it batched. Flushing there, rather than whenever the read buffer
	// runs short, keeps batches whole while the client is still sending.
	beforeWait func()
	waited     bool

	iov     []syscall.Iovec
	werr    syscall.Errno
	wwaits  int // writes that found the socket buffer full (for tests)
	writeFn func(uintptr) bool
}

// newSysConn returns nil when nc has no file descriptor to work on (such
// connections keep to net.Conn's own Read and Write).
func newSysConn(nc net.Conn) *sysConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &sysConn{rc: rc}
	s.readFn = s.doRead
	s.writeFn = s.doWritev
	return s
}

func (s *sysConn) doRead(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rp[0])), uintptr(len(s.rp)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			if s.beforeWait != nil && !s.waited {
				s.waited = true
				s.beforeWait()
				continue // data may have come in meanwhile
			}
			return false // wait in the netpoller
		}
		s.rn, s.rerr = int(n), e
		return true
	}
}

// Read implements io.Reader for the connection's bufio.Reader.
func (s *sysConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rp, s.rn, s.rerr, s.waited = p, 0, 0, false
	err := s.rc.Read(s.readFn)
	s.rp = nil
	if err != nil {
		return 0, err // deadline, or the connection closed
	}
	if s.rerr != 0 {
		return 0, os.NewSyscallError("read", s.rerr)
	}
	if s.rn == 0 {
		return 0, io.EOF
	}
	return s.rn, nil
}

func (s *sysConn) doWritev(fd uintptr) bool {
	for len(s.iov) > 0 {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&s.iov[0])), uintptr(len(s.iov)))
		switch e {
		case 0:
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			s.wwaits++
			return false // socket buffer full: wait in the netpoller
		default:
			s.werr = e
			return true
		}
		// Drop what was written: whole vectors, then the front of one.
		k := uint64(n)
		for len(s.iov) > 0 && k >= uint64(s.iov[0].Len) {
			k -= uint64(s.iov[0].Len)
			s.iov = s.iov[1:]
		}
		if len(s.iov) > 0 && k > 0 {
			s.iov[0].Base = (*byte)(unsafe.Add(unsafe.Pointer(s.iov[0].Base), k))
			s.iov[0].SetLen(int(uint64(s.iov[0].Len) - k))
		}
	}
	return true
}

// writev writes every byte of bufs, in order (at most maxIov of them at a
// time, the kernel's IOV_MAX).
func (s *sysConn) writev(bufs [][]byte) error {
	const maxIov = 1024
	for len(bufs) > 0 {
		s.iov = s.iov[:0]
		for len(bufs) > 0 && len(s.iov) < maxIov {
			if b := bufs[0]; len(b) > 0 {
				v := syscall.Iovec{Base: &b[0]}
				v.SetLen(len(b))
				s.iov = append(s.iov, v)
			}
			bufs = bufs[1:]
		}
		if len(s.iov) == 0 {
			break
		}
		s.werr = 0
		all := s.iov
		err := s.rc.Write(s.writeFn)
		clear(all) // do not keep the payloads reachable
		s.iov = all[:0]
		if err != nil {
			return err
		}
		if s.werr != 0 {
			return os.NewSyscallError("writev", s.werr)
		}
	}
	return nil
}
