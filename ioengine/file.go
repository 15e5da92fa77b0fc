package ioengine

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/uring"
)

// File is the default engine: a sparse file. Reads and writes are positional
// (no shared offset, no lock); Flush is fdatasync; Trim punches a hole so the
// space goes back to the filesystem.
//
// The I/O goes through an io_uring of the engine's own (uring.Shared): the
// goroutine of a request parks while its read, write, fdatasync or
// fallocate runs, instead of holding an OS thread (and, until Go's sysmon
// takes it back, a P) in a blocking system call, and requests that arrive
// together reach the disk in one submission. Where the kernel has no
// io_uring or refuses it (seccomp, the kernel.io_uring_disabled sysctl),
// the engine uses pread/pwrite/fdatasync/fallocate, logs why once per
// process and counts itself in FileIO (the blockd_file_engines metric).
// BLOCKD_IO_URING=0 makes every file engine use system calls.
//
// Opened with Direct, the file bypasses the host page cache (O_DIRECT), so
// blockd's own caching and prefetch decide what is in memory and the host
// does not keep a second copy. O_DIRECT wants the buffer address, offset and
// length aligned to the device's logical block; requests that are not go
// through an aligned bounce buffer from a pool (a write of a partial block
// is a read-modify-write of its edge blocks). Filesystems that refuse
// O_DIRECT (tmpfs) get buffered I/O instead.
type File struct {
	f  *os.File
	fd int
	// cf is a second descriptor of the file without O_DIRECT (nil when
	// f is buffered already): WriteAtCached writes through it into the
	// host page cache, and the next Flush (fdatasync of the same inode)
	// writes those pages back.
	cf     *os.File
	cfd    int
	size   atomic.Int64
	direct atomic.Bool // O_DIRECT is in effect on fd

	// rmw orders partial-block writes against every other write: aligned
	// writes, trims and zeroing hold it shared; a read-modify-write holds
	// it exclusively, so no write lands between its read and its write
	// of the edge blocks. Unaligned writes are rare (the block size is
	// advertised to every client), so the exclusive side is cold.
	rmw sync.RWMutex
	// fua is cleared when the kernel refuses RWF_DSYNC.
	noFUA atomic.Bool

	// ring carries the I/O on fd; nil for system calls (Syscalls, or no
	// io_uring). A ring the kernel stops accepting is dropped for good
	// (dead keeps it for Close).
	ring   atomic.Pointer[uring.Shared]
	dead   *uring.Shared
	deadMu sync.Mutex
}

// OpenFileOptions tune OpenFileWith.
type OpenFileOptions struct {
	// Direct opens the file with O_DIRECT when the filesystem allows it,
	// and falls back to buffered I/O when it does not.
	Direct bool
	// MustExist opens an existing backing file only: a missing file is
	// an error (os.ErrNotExist), and so is one smaller than size
	// (ErrTruncated), where a volume's data would silently read as
	// zeroes.
	MustExist bool
	// Syscalls does the I/O with pread/pwrite/fdatasync/fallocate
	// instead of an io_uring.
	Syscalls bool
}

// ErrTruncated: an existing backing file is smaller than its volume.
var ErrTruncated = errors.New("backing file is shorter than the volume")

// dioAlign is the alignment of O_DIRECT offsets, lengths and buffers. 4 KiB
// is a multiple of every logical block size in use (512 and 4Kn).
const dioAlign = 4096

// openFile is os.OpenFile; tests replace it to play a filesystem that
// refuses O_DIRECT (tmpfs does since Linux 6.6, so none is at hand).
var openFile = os.OpenFile

// OpenFile opens the backing file at path with buffered I/O, creating it
// sparse if it does not exist and growing it to size if it is smaller.
func OpenFile(path string, size int64) (*File, error) {
	return OpenFileWith(path, size, OpenFileOptions{})
}

// OpenFileWith is OpenFile with options.
func OpenFileWith(path string, size int64, opts OpenFileOptions) (*File, error) {
	if size < 0 {
		return nil, fmt.Errorf("file engine: negative size %d", size)
	}
	flags := os.O_RDWR | os.O_CREATE
	if opts.MustExist {
		flags = os.O_RDWR
	}
	direct := false
	var f *os.File
	var err error
	if opts.Direct {
		f, err = openFile(path, flags|unix.O_DIRECT, 0o600)
		if err == nil {
			direct = true
		} else if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EOPNOTSUPP) {
			return nil, fmt.Errorf("file engine: %w", err)
		}
	}
	if f == nil {
		f, err = os.OpenFile(path, flags, 0o600)
		if err != nil {
			return nil, fmt.Errorf("file engine: %w", err)
		}
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("file engine: %w", err)
	}
	if st.Size() < size && opts.MustExist {
		f.Close()
		return nil, fmt.Errorf("file engine: %s is %d bytes, smaller than the volume (%d bytes): %w", path, st.Size(), size, ErrTruncated)
	}
	if st.Size() < size {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("file engine: grow %s: %w", path, err)
		}
	}
	e := &File{f: f, fd: int(f.Fd())}
	e.cfd = e.fd
	if !opts.Syscalls && useURing {
		r, err := newShared(fileRingEntries)
		if err != nil {
			uringFallback(err)
		} else {
			e.ring.Store(r)
		}
	}
	fileIO.count(e.ring.Load() != nil, 1)
	if direct {
		cf, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("file engine: %w", err)
		}
		e.cf, e.cfd = cf, int(cf.Fd())
	}
	e.direct.Store(direct)
	e.size.Store(size)
	return e, nil
}

// Direct reports whether the page cache is bypassed (O_DIRECT in effect).
func (e *File) Direct() bool { return e.direct.Load() }

// URing reports whether the engine's I/O goes through its io_uring.
func (e *File) URing() bool { return e.ring.Load() != nil }

func (e *File) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > e.size.Load() {
		return pipeline.ErrOutOfRange
	}
	return nil
}

// aligned reports whether p at off can go to the file without a bounce
// buffer.
func (e *File) aligned(p []byte, off int64) bool {
	if !e.direct.Load() {
		return true
	}
	if off%dioAlign != 0 || len(p)%dioAlign != 0 {
		return false
	}
	return len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))%dioAlign == 0
}

// dropDirect turns O_DIRECT off after the filesystem refused an aligned
// direct I/O with EINVAL (some accept the open flag but not the I/O).
func (e *File) dropDirect() bool {
	fl, err := unix.FcntlInt(uintptr(e.fd), unix.F_GETFL, 0)
	if err != nil {
		return false
	}
	if _, err := unix.FcntlInt(uintptr(e.fd), unix.F_SETFL, fl&^unix.O_DIRECT); err != nil {
		return false
	}
	e.direct.Store(false)
	return true
}

// ReadAt implements Engine.
func (e *File) ReadAt(p []byte, off int64) (int, error) {
	if err := e.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if e.aligned(p, off) {
		n, err := e.pread(p, off)
		if err == unix.EINVAL && e.direct.Load() && e.dropDirect() {
			return e.pread(p, off)
		}
		return n, err
	}
	lo := alignDown(off)
	hi := alignUp(off + int64(len(p)))
	b := getBounce(int(hi - lo))
	defer putBounce(b)
	if _, err := e.pread(b.b, lo); err != nil {
		return 0, err
	}
	copy(p, b.b[off-lo:])
	return len(p), nil
}

func (e *File) pread(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := e.readOnce(p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, err
		}
		if n == 0 { // the file is shorter than the volume: the rest is a hole
			clear(p[done:])
			return len(p), nil
		}
		done += n
	}
	return done, nil
}

// WriteAt implements Engine.
func (e *File) WriteAt(p []byte, off int64) (int, error) {
	return e.writeAt(p, off, 0)
}

// WriteAtCached implements CachedWriter: the write goes into the host page
// cache, whatever the engine's O_DIRECT setting, and is durable after the
// next Flush (an fdatasync writes back every dirty page of the file). It
// stays coherent with O_DIRECT reads and writes of the same range: the
// kernel writes back (and for writes invalidates) cached pages of a range
// before direct I/O to it.
func (e *File) WriteAtCached(p []byte, off int64) (int, error) {
	if err := e.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	// Shared with aligned writes, so no cached write lands between a
	// read-modify-write's read and write of its edge blocks.
	e.rmw.RLock()
	defer e.rmw.RUnlock()
	return pwriteAll(e.cfd, p, off, 0)
}

// DropCache implements CacheDropper: it asks the kernel to drop the file's
// clean page-cache pages (POSIX_FADV_DONTNEED, which also starts writing
// back dirty ones and leaves them cached until they are clean). A file
// that could not be opened O_DIRECT keeps its cache: the page cache is
// then its only cache.
func (e *File) DropCache() error {
	if e.cf == nil || !e.direct.Load() {
		return nil
	}
	return unix.Fadvise(e.cfd, 0, 0, unix.FADV_DONTNEED)
}

// WriteAtFUA implements FUAWriter: the write is durable when it returns,
// without a separate fdatasync of the whole file (pwritev2 RWF_DSYNC).
func (e *File) WriteAtFUA(p []byte, off int64) (int, error) {
	if e.noFUA.Load() {
		if n, err := e.writeAt(p, off, 0); err != nil {
			return n, err
		}
		return len(p), e.Flush()
	}
	n, err := e.writeAt(p, off, unix.RWF_DSYNC)
	if err == unix.EOPNOTSUPP || err == unix.ENOSYS {
		e.noFUA.Store(true)
		return e.WriteAtFUA(p, off)
	}
	return n, err
}

func (e *File) writeAt(p []byte, off int64, rwf int) (int, error) {
	if err := e.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if e.aligned(p, off) {
		e.rmw.RLock()
		n, err := e.pwrite(p, off, rwf)
		e.rmw.RUnlock()
		if err == unix.EINVAL && e.direct.Load() && e.dropDirect() {
			return e.writeAt(p, off, rwf)
		}
		return n, err
	}
	// Partial blocks: read the edge blocks, patch them, write the whole
	// aligned range. Exclusive, so nothing else writes those blocks in
	// between.
	lo := alignDown(off)
	hi := alignUp(off + int64(len(p)))
	b := getBounce(int(hi - lo))
	defer putBounce(b)
	e.rmw.Lock()
	defer e.rmw.Unlock()
	if lo != off {
		if _, err := e.pread(b.b[:dioAlign], lo); err != nil {
			return 0, err
		}
	}
	if end := off + int64(len(p)); end != hi && !(hi-lo == dioAlign && lo != off) {
		if _, err := e.pread(b.b[hi-lo-dioAlign:], hi-dioAlign); err != nil {
			return 0, err
		}
	}
	copy(b.b[off-lo:], p)
	if _, err := e.pwrite(b.b, lo, rwf); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (e *File) pwrite(p []byte, off int64, rwf int) (int, error) {
	if e.ring.Load() == nil {
		return pwriteAll(e.fd, p, off, rwf)
	}
	done := 0
	for done < len(p) {
		n, err := e.writeOnce(p[done:], off+int64(done), rwf)
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// readOnce is one pread of fd, through the ring if the engine has one.
func (e *File) readOnce(p []byte, off int64) (int, error) {
	if r := e.ring.Load(); r != nil {
		n, err := r.Read(e.fd, p, off)
		if !errors.Is(err, uring.ErrBroken) {
			return n, err
		}
		e.dropRing(r)
	}
	return unix.Pread(e.fd, p, off)
}

// writeOnce is one pwrite (rwf 0) or pwritev2 of fd, through the ring if
// the engine has one.
func (e *File) writeOnce(p []byte, off int64, rwf int) (int, error) {
	if r := e.ring.Load(); r != nil {
		n, err := r.Write(e.fd, p, off, rwf)
		if !errors.Is(err, uring.ErrBroken) {
			return n, err
		}
		e.dropRing(r)
	}
	for {
		var n int
		var err error
		if rwf != 0 {
			n, err = pwritev2(e.fd, p, off, rwf)
		} else {
			n, err = unix.Pwrite(e.fd, p, off)
		}
		if err != unix.EINTR {
			return n, err
		}
	}
}

// dropRing turns the engine to system calls after its ring failed.
func (e *File) dropRing(r *uring.Shared) {
	if !e.ring.CompareAndSwap(r, nil) {
		return
	}
	e.deadMu.Lock()
	e.dead = r
	e.deadMu.Unlock()
	fileIO.count(true, -1)
	fileIO.count(false, 1)
	uringFallback(uring.ErrBroken)
}

// pwriteAll writes all of p at off on fd, with pwritev2 flags rwf (0: a
// plain pwrite), resuming after short writes and EINTR.
func pwriteAll(fd int, p []byte, off int64, rwf int) (int, error) {
	done := 0
	for done < len(p) {
		var n int
		var err error
		if rwf != 0 {
			n, err = pwritev2(fd, p[done:], off+int64(done), rwf)
		} else {
			n, err = unix.Pwrite(fd, p[done:], off+int64(done))
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// pwritev2 writes one buffer with per-call flags. The iovec lives on the
// stack: x/sys's Pwritev2 allocates one per call.
func pwritev2(fd int, p []byte, off int64, flags int) (int, error) {
	var iov unix.Iovec
	if len(p) > 0 {
		iov.Base = &p[0]
	}
	iov.SetLen(len(p))
	n, _, errno := unix.Syscall6(unix.SYS_PWRITEV2, uintptr(fd), uintptr(unsafe.Pointer(&iov)), 1,
		uintptr(off), uintptr(off>>32), uintptr(flags))
	runtime.KeepAlive(p)
	if errno != 0 {
		return int(n), errno
	}
	return int(n), nil
}

func alignDown(off int64) int64 { return off &^ (dioAlign - 1) }
func alignUp(off int64) int64   { return (off + dioAlign - 1) &^ (dioAlign - 1) }

// bounce is an aligned buffer for O_DIRECT I/O of unaligned requests.
type bounce struct {
	b     []byte // aligned, len set per use
	full  []byte
	class int
}

// Bounce buffers come in power-of-two classes from 4 KiB to 1 MiB; larger
// ones are allocated per use (such requests are rare and already costly).
const (
	bounceMinShift = 12
	bounceMaxShift = 20
)

var bouncePools [bounceMaxShift - bounceMinShift + 1]sync.Pool

func getBounce(n int) *bounce {
	class := 0
	for 1<<(class+bounceMinShift) < n {
		class++
	}
	if class < len(bouncePools) {
		if v := bouncePools[class].Get(); v != nil {
			b := v.(*bounce)
			b.b = b.full[:n]
			return b
		}
	} else {
		class = -1
	}
	capacity := n
	if class >= 0 {
		capacity = 1 << (class + bounceMinShift)
	}
	raw := make([]byte, capacity+dioAlign)
	skip := int((dioAlign - uintptr(unsafe.Pointer(&raw[0]))%dioAlign) % dioAlign)
	full := raw[skip : skip+capacity]
	return &bounce{b: full[:n], full: full, class: class}
}

func putBounce(b *bounce) {
	if b.class >= 0 {
		bouncePools[b.class].Put(b)
	}
}

// Flush implements Engine.
func (e *File) Flush() error {
	if r := e.ring.Load(); r != nil {
		err := r.Fsync(e.fd, uring.FsyncDatasync)
		if !errors.Is(err, uring.ErrBroken) {
			return err
		}
		e.dropRing(r)
	}
	for {
		err := unix.Fdatasync(e.fd)
		if err != unix.EINTR {
			return err
		}
	}
}

// Trim implements Engine.
func (e *File) Trim(off, length int64) error {
	if err := e.check(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	return e.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// fallocate zeroes a range with mode, writing zeroes where the filesystem
// does not support it.
func (e *File) fallocate(mode uint32, off, length int64) error {
	e.rmw.RLock()
	var err error
	if r := e.ring.Load(); r != nil && r.Supports(uring.OpFallocate) {
		if err = r.Fallocate(e.fd, mode, off, length); errors.Is(err, uring.ErrBroken) {
			e.dropRing(r)
			err = unix.Fallocate(e.fd, mode, off, length)
		}
	} else {
		err = unix.Fallocate(e.fd, mode, off, length)
	}
	e.rmw.RUnlock()
	if errors.Is(err, unix.EOPNOTSUPP) {
		return e.writeZeroes(off, length)
	}
	return err
}

// WriteZeroes implements Engine.
func (e *File) WriteZeroes(off, length int64, noHole bool) error {
	if err := e.check(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if !noHole {
		return e.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	}
	return e.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

var zeroes = make([]byte, 1<<20)

func (e *File) writeZeroes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroes)))
		if _, err := e.WriteAt(zeroes[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Size implements Engine.
func (e *File) Size() int64 { return e.size.Load() }

// Resize implements Engine: the file is grown sparse.
func (e *File) Resize(size int64) error {
	if size < 0 {
		return fmt.Errorf("file engine: negative size %d", size)
	}
	if err := e.f.Truncate(size); err != nil {
		return fmt.Errorf("file engine: resize: %w", err)
	}
	e.size.Store(size)
	return nil
}

// Map implements pipeline.Mapper with lseek(SEEK_DATA) and
// lseek(SEEK_HOLE), which see data still in the page cache as well as on
// disk. A filesystem without them reports the whole file as data, which
// is always a correct answer.
func (e *File) Map(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
	if err := e.check(off, n); err != nil {
		return dst, err
	}
	end := off + n
	for off < end {
		data, err := unix.Seek(e.fd, off, unix.SEEK_DATA)
		switch {
		case err == unix.ENXIO: // no data at or after off
			data = end
		case err == unix.EINVAL || err == unix.EOPNOTSUPP:
			dst, _ = pipeline.AppendExtent(dst, end-off, false)
			return dst, nil
		case err != nil:
			return dst, fmt.Errorf("file engine: lseek SEEK_DATA: %w", err)
		}
		var ok bool
		if data > off {
			if dst, ok = pipeline.AppendExtent(dst, min(data, end)-off, true); !ok {
				break
			}
			off = min(data, end)
			continue
		}
		hole, err := unix.Seek(e.fd, off, unix.SEEK_HOLE)
		if err != nil {
			// Data at off but no hole after it: the file shrank under
			// us, or the filesystem is odd. Data is the safe answer.
			hole = end
		}
		if hole <= off { // cannot happen after SEEK_DATA said off; do not loop
			hole = end
		}
		if dst, ok = pipeline.AppendExtent(dst, min(hole, end)-off, false); !ok {
			break
		}
		off = min(hole, end)
	}
	return dst, nil
}

// Allocated returns the bytes of the backing file that hold blocks on disk.
func (e *File) Allocated() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(e.fd, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// Close implements Engine.
func (e *File) Close() error {
	var err error
	// The ring first: it waits for what is in flight on the files.
	if r := e.ring.Swap(nil); r != nil {
		err = r.Close()
		fileIO.count(true, -1)
	} else {
		fileIO.count(false, -1)
	}
	e.deadMu.Lock()
	if e.dead != nil {
		err = errors.Join(err, e.dead.Close())
		e.dead = nil
	}
	e.deadMu.Unlock()
	err = errors.Join(err, e.f.Close())
	if e.cf != nil {
		err = errors.Join(err, e.cf.Close())
	}
	return err
}
