package ioengine

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/pipeline"
)

// File is the default engine: a sparse file. Reads and writes are positional
// (pread/pwrite, no shared offset, no lock); Flush is fdatasync; Trim punches
// a hole so the space goes back to the filesystem.
type File struct {
	f    *os.File
	fd   int
	size atomic.Int64
}

// OpenFile opens the backing file at path, creating it sparse if it does
// not exist and growing it to size if it is smaller.
func OpenFile(path string, size int64) (*File, error) {
	if size < 0 {
		return nil, fmt.Errorf("file engine: negative size %d", size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("file engine: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("file engine: %w", err)
	}
	if st.Size() < size {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("file engine: grow %s: %w", path, err)
		}
	}
	e := &File{f: f, fd: int(f.Fd())}
	e.size.Store(size)
	return e, nil
}

func (e *File) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > e.size.Load() {
		return pipeline.ErrOutOfRange
	}
	return nil
}

// ReadAt implements Engine.
func (e *File) ReadAt(p []byte, off int64) (int, error) {
	if err := e.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pread(e.fd, p[done:], off+int64(done))
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
	if err := e.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(e.fd, p[done:], off+int64(done))
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

// Flush implements Engine.
func (e *File) Flush() error {
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
	return e.punch(off, length)
}

func (e *File) punch(off, length int64) error {
	err := unix.Fallocate(e.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
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
		return e.punch(off, length)
	}
	err := unix.Fallocate(e.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return e.writeZeroes(off, length)
	}
	return err
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

// Allocated returns the bytes of the backing file that hold blocks on disk.
func (e *File) Allocated() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(e.fd, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// Close implements Engine.
func (e *File) Close() error { return e.f.Close() }
