package uring

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/internal/leakcheck"
)

func newShared(t *testing.T, entries uint32) *Shared {
	t.Helper()
	q, err := NewShared(entries)
	if err != nil {
		t.Fatalf("NewShared: %v", err)
	}
	return q
}

func tempFile(t *testing.T, size int64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "data"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// Many goroutines write and read back their own blocks through one ring
// with fewer slots than goroutines; the data and the file agree.
func TestSharedConcurrent(t *testing.T) {
	q := newShared(t, 8)
	f := tempFile(t, 1<<20)
	fd := int(f.Fd())
	const workers, rounds, bs = 32, 50, 4096
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			p := make([]byte, bs)
			got := make([]byte, bs)
			for i := range rounds {
				off := int64((i*workers+w)%(1<<20/bs)) * bs
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if n, err := q.Write(fd, p, off, 0); err != nil || n != bs {
					t.Errorf("write: %d %v", n, err)
					return
				}
				if n, err := q.Read(fd, got, off); err != nil || n != bs || !bytes.Equal(p, got) {
					t.Errorf("read back at %d: %d %v, equal %v", off, n, err, bytes.Equal(p, got))
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := q.Fsync(fd, FsyncDatasync); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Read(fd, make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read after Close: %v", err)
	}
}

// Errors come back as errnos; a read past the end is short; fallocate
// punches holes; RWF_DSYNC writes.
func TestSharedOps(t *testing.T) {
	q := newShared(t, 4)
	defer q.Close()
	f := tempFile(t, 1<<20)
	fd := int(f.Fd())
	if _, err := q.Read(-1, make([]byte, 8), 0); !errors.Is(err, unix.EBADF) {
		t.Fatalf("read of fd -1: %v", err)
	}
	if n, err := q.Read(fd, make([]byte, 8192), 1<<20-100); err != nil || n != 100 {
		t.Fatalf("read across the end: %d %v", n, err)
	}
	p := bytes.Repeat([]byte{7}, 1<<16)
	if n, err := q.Write(fd, p, 0, unix.RWF_DSYNC); err != nil || n != len(p) {
		t.Fatalf("dsync write: %d %v", n, err)
	}
	if !q.Supports(OpFallocate) {
		t.Skip("kernel without IORING_OP_FALLOCATE")
	}
	if err := q.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 4096, 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3*4096)
	if _, err := q.Read(fd, got, 0); err != nil {
		t.Fatal(err)
	}
	if got[0] != 7 || got[4096] != 0 || got[3*4096-1] != 0 {
		t.Fatalf("after punching [4096, 12288): %d %d %d", got[0], got[4096], got[3*4096-1])
	}
	if err := q.Fallocate(fd, 0xffff, 0, 1); !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
		t.Fatalf("fallocate with a bad mode: %v", err)
	}
}

// A submission the kernel refuses breaks the ring: the operation waiting
// for it and every later one get ErrBroken, and nothing hangs.
func TestSharedBroken(t *testing.T) {
	testEnter = func(uint32) error { return unix.EBADF }
	t.Cleanup(func() { testEnter = nil })
	q := newShared(t, 4)
	f := tempFile(t, 4096)
	if _, err := q.Read(int(f.Fd()), make([]byte, 4096), 0); !errors.Is(err, ErrBroken) {
		t.Fatalf("read on a ring whose submission failed: %v", err)
	}
	if err := q.Fsync(int(f.Fd()), 0); !errors.Is(err, ErrBroken) {
		t.Fatalf("fsync on a broken ring: %v", err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}

// Close releases the ring's and the eventfd's descriptors and its reaper.
func TestSharedCloseReleases(t *testing.T) {
	before := leakcheck.FDs(t)
	for range 5 {
		q := newShared(t, 16)
		f := tempFile(t, 4096)
		if _, err := q.Read(int(f.Fd()), make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if n := leakcheck.FDs(t); n != before {
		t.Fatalf("%d fds after, %d before", n, before)
	}
}

func TestSharedAllocs(t *testing.T) {
	q := newShared(t, 8)
	defer q.Close()
	f := tempFile(t, 1<<20)
	fd := int(f.Fd())
	p := make([]byte, 4096)
	allocs := testing.AllocsPerRun(500, func() {
		if _, err := q.Write(fd, p, 8192, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := q.Read(fd, p, 8192); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per write and read", allocs)
	}
}

// BenchmarkShared: 4 KiB reads of a cached file from parallel goroutines
// through one ring, against pread.
func BenchmarkShared(b *testing.B) {
	f, err := os.CreateTemp(b.TempDir(), "data")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(64 << 20); err != nil {
		b.Fatal(err)
	}
	fd := int(f.Fd())
	b.Run("uring", func(b *testing.B) {
		q, err := NewShared(64)
		if err != nil {
			b.Fatal(err)
		}
		defer q.Close()
		b.ReportAllocs()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			p := make([]byte, 4096)
			for i := 0; pb.Next(); i++ {
				if _, err := q.Read(fd, p, int64(i%16384)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("pread", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			p := make([]byte, 4096)
			for i := 0; pb.Next(); i++ {
				if _, err := unix.Pread(fd, p, int64(i%16384)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}
