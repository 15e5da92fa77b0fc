package ioengine_test

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
	"github.com/blockd/blockd/uring"
)

// requireURing skips when this kernel has no io_uring or refuses it
// (ENOSYS, EPERM): then the file engine uses system calls, which
// TestFileSyscalls covers. Anywhere else the ring must be there.
func requireURing(t testing.TB) {
	t.Helper()
	q, err := uring.NewShared(4)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		t.Skipf("io_uring unavailable here: %v", err)
	}
	if err != nil {
		t.Fatalf("io_uring setup failed on a kernel that has it: %v", err)
	}
	q.Close()
}

func openFile(t testing.TB, dir string, size int64, opts ioengine.OpenFileOptions) *ioengine.File {
	t.Helper()
	e, err := ioengine.OpenFileWith(filepath.Join(dir, "vol.img"), size, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	if e.URing() == opts.Syscalls {
		t.Fatalf("engine opened with Syscalls=%v has URing()=%v", opts.Syscalls, e.URing())
	}
	return e
}

// The suite with system calls, buffered and O_DIRECT: what a kernel
// without io_uring gets. TestFile and TestFileDirect run it on the ring.
func TestFileSyscalls(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "Buffered", true: "Direct"}[direct], func(t *testing.T) {
			enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
				return openFile(t, t.TempDir(), size, ioengine.OpenFileOptions{Direct: direct, Syscalls: true})
			})
		})
	}
}

// Engines count themselves by how they do I/O, and Close uncounts them.
func TestFileIOCounts(t *testing.T) {
	requireURing(t)
	before := ioengine.FileIO()
	dir := t.TempDir()
	a, err := ioengine.OpenFileWith(filepath.Join(dir, "a"), 1<<20, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	b, err := ioengine.OpenFileWith(filepath.Join(dir, "b"), 1<<20, ioengine.OpenFileOptions{Syscalls: true})
	if err != nil {
		t.Fatal(err)
	}
	if s := ioengine.FileIO(); s.URing != before.URing+1 || s.Syscalls != before.Syscalls+1 || s.Fallbacks != before.Fallbacks {
		t.Errorf("with one engine of each kind open: %+v (before %+v)", s, before)
	}
	a.Close()
	b.Close()
	if s := ioengine.FileIO(); s.URing != before.URing || s.Syscalls != before.Syscalls {
		t.Errorf("after Close: %+v (before %+v)", s, before)
	}
}

// 0 allocations per aligned O_DIRECT read and write, on the ring and with
// system calls.
func TestFileDirectAllocs(t *testing.T) {
	for _, sys := range []bool{false, true} {
		if !sys {
			requireURing(t)
		}
		e := openFile(t, t.TempDir(), 1<<20, ioengine.OpenFileOptions{Direct: true, Syscalls: sys})
		if !e.Direct() {
			t.Skip("temp dir filesystem refuses O_DIRECT")
		}
		buf := make([]byte, 8192)
		p := buf[4096-int(uintptrOf(buf)%4096):][:4096]
		allocs := testing.AllocsPerRun(200, func() {
			if _, err := e.WriteAt(p, 8192); err != nil {
				t.Fatal(err)
			}
			if _, err := e.ReadAt(p, 8192); err != nil {
				t.Fatal(err)
			}
			if err := e.Flush(); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("syscalls=%v: %v allocations per write, read and flush", sys, allocs)
		}
	}
}

// BenchmarkFileDirectParallel: 4 KiB random O_DIRECT reads and writes
// from 32 goroutines (a queue depth of 32), on the ring and with system
// calls. -cpu 2 shows what a 2-CPU node gets.
func BenchmarkFileDirectParallel(b *testing.B) {
	for _, sys := range []bool{false, true} {
		for _, write := range []bool{false, true} {
			name := map[bool]string{false: "uring", true: "syscalls"}[sys] + map[bool]string{false: "/read", true: "/write"}[write]
			b.Run(name, func(b *testing.B) {
				e := openFile(b, b.TempDir(), 256<<20, ioengine.OpenFileOptions{Direct: true, Syscalls: sys})
				if !e.Direct() {
					b.Skip("no O_DIRECT here")
				}
				if !write {
					chunk := make([]byte, 1<<20)
					for off := int64(0); off < 256<<20; off += 1 << 20 {
						if _, err := e.WriteAt(chunk, off); err != nil {
							b.Fatal(err)
						}
					}
				}
				var mu sync.Mutex
				seed := uint64(0)
				b.ReportAllocs()
				b.SetParallelism(16)
				b.ResetTimer()
				cpu0 := processCPU(b)
				defer func() { b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/op") }()
				b.RunParallel(func(pb *testing.PB) {
					mu.Lock()
					seed++
					x := seed * 0x9e3779b97f4a7c15
					mu.Unlock()
					buf := make([]byte, 8192)
					p := buf[4096-int(uintptrOf(buf)%4096):][:4096]
					for pb.Next() {
						x ^= x << 13
						x ^= x >> 7
						x ^= x << 17
						off := int64(x%(256<<20/4096)) * 4096
						var err error
						if write {
							_, err = e.WriteAt(p, off)
						} else {
							_, err = e.ReadAt(p, off)
						}
						if err != nil {
							b.Fatal(err)
						}
					}
				})
			})
		}
	}
}

func TestMain(m *testing.M) {
	if os.Getenv(seccompChildEnv) != "" {
		os.Exit(seccompChild(m))
	}
	os.Exit(m.Run())
}

// processCPU is the CPU time (user and system) this process used so far.
func processCPU(t testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
