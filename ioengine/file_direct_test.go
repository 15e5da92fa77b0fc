package ioengine_test

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
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
// random offsets and lengths exercise the bounce and read-modify-write paths.
func TestFileDirect(t *testing.T) {
	e := openDirect(t, t.TempDir(), 4096)
	if !e.Direct() {
		t.Skipf("filesystem of %s refuses O_DIRECT", os.TempDir())
	}
	enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
		return openDirect(t, t.TempDir(), size)
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
