package ioengine_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"github.com/blockd/blockd/internal/leakcheck"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
	"golang.org/x/sys/unix"
)

func openDirect(t *testing.T, dir string, size int64) *ioengine.File {
	t.Helper()
	e, err := ioengine.OpenFileWith(filepath.Join(dir, "vol.img"), size, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// The temp dir is on a disk filesystem, which takes O_DIRECT; the suite's
// random offsets and lengths exercise the bounce and read-modify-write
// paths, on the engine's io_uring.
func TestFileDirect(t *testing.T) {
	requireURing(t)
	e := openDirect(t, t.TempDir(), 4096)
	if !e.Direct() {
		t.Skipf("filesystem of %s refuses O_DIRECT", os.TempDir())
	}
	enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
		return openFile(t, t.TempDir(), size, ioengine.OpenFileOptions{Direct: true})
	})
}

// Unaligned writes to disjoint bytes of the same blocks, concurrently with
// aligned writes elsewhere in those blocks' neighbours: a read-modify-write
// must never lose another writer's bytes.
func TestFileDirectConcurrentPartialBlocks(t *testing.T) {
	e := openDirect(t, t.TempDir(), 1<<20)
	const writers, rounds = 8, 50
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(w + 1)}, 512)
			for i := 0; i < rounds; i++ {
				// Writer w owns bytes [w*512, w*512+512) of blocks 0..3.
				off := int64(i%4)*4096 + int64(w)*512
				if _, err := e.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got := make([]byte, 4*4096)
	if _, err := e.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i, b := range got {
		if want := byte((i%4096)/512 + 1); b != want {
			t.Fatalf("byte %d = %d, want %d: a partial-block write was lost", i, b, want)
		}
	}
}

func TestFileWriteAtFUA(t *testing.T) {
	e := openDirect(t, t.TempDir(), 1<<20)
	p := bytes.Repeat([]byte{0x42}, 8192)
	if n, err := e.WriteAtFUA(p, 4096); err != nil || n != len(p) {
		t.Fatalf("WriteAtFUA = %d, %v", n, err)
	}
	if n, err := e.WriteAtFUA(p[:100], 3); err != nil || n != 100 {
		t.Fatalf("unaligned WriteAtFUA = %d, %v", n, err)
	}
	got := make([]byte, 8192)
	if _, err := e.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back after FUA write: %v", err)
	}
}

func BenchmarkFileDirectWrite4K(b *testing.B) {
	dir := b.TempDir()
	e, err := ioengine.OpenFileWith(filepath.Join(dir, "vol.img"), 64<<20, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	buf := make([]byte, 8192)
	p := buf[4096-int(uintptrOf(buf)%4096):][:4096]
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, err := e.WriteAt(p, int64(i%16384)*4096); err != nil {
			b.Fatal(err)
		}
	}
}

// Page-cache writes, direct writes (aligned and read-modify-write), trims
// and direct reads of overlapping ranges, from concurrent writers on
// disjoint stripes, always read back as the last write left them: the two
// descriptors stay coherent. The data survives Close and reopen, and
// Close releases both descriptors.
func TestFileWriteAtCached(t *testing.T) {
	dir := t.TempDir()
	fdsBefore := leakcheck.FDs(t)
	const stripe, writers, rounds = 64 << 10, 4, 200
	e, err := ioengine.OpenFileWith(filepath.Join(dir, "vol.img"), stripe*writers, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if !e.Direct() {
		t.Skipf("filesystem of %s refuses O_DIRECT", dir)
	}
	model := make([]byte, stripe*writers)
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			base := int64(w * stripe)
			m := model[base : base+stripe]
			for i := 0; i < rounds; i++ {
				off := rng.Int64N(stripe - 8192)
				n := 1 + rng.Int64N(8192)
				if rng.IntN(2) == 0 { // block-aligned half the time
					off, n = off&^4095, (n+4095)&^4095
				}
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				var err error
				switch rng.IntN(4) {
				case 0, 1:
					_, err = e.WriteAtCached(p, base+off)
				case 2:
					_, err = e.WriteAt(p, base+off)
				case 3:
					off, n = off&^4095, (n+4095)&^4095
					err = e.Trim(base+off, n)
					p = make([]byte, n)
				}
				if err != nil {
					t.Error(err)
					return
				}
				copy(m[off:], p)
				roff := rng.Int64N(stripe - 8192)
				got := make([]byte, 1+rng.Int64N(8192))
				if _, err := e.ReadAt(got, base+roff); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, m[roff:roff+int64(len(got))]) {
					t.Errorf("writer %d round %d: read at %d differs from the last writes", w, i, roff)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if n := leakcheck.FDs(t); n != fdsBefore {
		t.Errorf("%d open descriptors after Close, %d before Open", n, fdsBefore)
	}
	e = openDirect(t, dir, stripe*writers)
	got := make([]byte, len(model))
	if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("after reopen the file differs from the writes: %v", err)
	}
}

// resident counts the pages of path's first n bytes in the page cache.
func resident(t *testing.T, path string, n int) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, n, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (n+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(n), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	c := 0
	for _, v := range vec {
		c += int(v & 1)
	}
	return c
}

// DropCache empties the page cache that cached writes filled once they are
// written back, and never loses a write that is not: a dirty page stays
// and the data reads back, before and after a flush and a reopen.
func TestFileDropCache(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	e := openDirect(t, dir, size)
	if !e.Direct() {
		t.Skipf("filesystem of %s refuses O_DIRECT", dir)
	}
	path := filepath.Join(dir, "vol.img")
	want := bytes.Repeat([]byte("blockd-dropcache"), size/16)
	if _, err := e.WriteAtCached(want[:size/2], 0); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := resident(t, path, size); n < size/2/os.Getpagesize() {
		t.Fatalf("%d pages cached after %d KiB of cached writes; the test cannot see a drop", n, size/2>>10)
	}
	if err := e.DropCache(); err != nil {
		t.Fatal(err)
	}
	if n := resident(t, path, size); n != 0 {
		t.Errorf("%d pages still cached after DropCache of a flushed file", n)
	}
	// Not flushed: the drop must keep the data.
	if _, err := e.WriteAtCached(want[size/2:], size/2); err != nil {
		t.Fatal(err)
	}
	if err := e.DropCache(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after DropCache of unflushed writes the data differs: %v", err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e = openDirect(t, dir, size)
	if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after reopen the data differs: %v", err)
	}
}
