package ioengine_test

import (
	"path/filepath"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
)

func TestMemory(t *testing.T) {
	enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
		e, err := ioengine.NewMemory(size)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		return e
	})
}

// TestFile runs the suite on a buffered file engine doing its I/O through
// its io_uring (TestFileSyscalls: with system calls).
func TestFile(t *testing.T) {
	requireURing(t)
	enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
		return openFile(t, t.TempDir(), size, ioengine.OpenFileOptions{})
	})
}

func TestFileTrimFreesSpace(t *testing.T) {
	e, err := ioengine.OpenFile(filepath.Join(t.TempDir(), "vol.img"), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	p := make([]byte, 1<<20)
	for i := range p {
		p[i] = 1
	}
	for off := int64(0); off < 16<<20; off += 1 << 20 {
		if _, err := e.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	before, err := e.Allocated()
	if err != nil {
		t.Fatal(err)
	}
	if before < 16<<20 {
		t.Fatalf("allocated after writing 16 MiB = %d", before)
	}
	if err := e.Trim(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	after, _ := e.Allocated()
	if before-after < 8<<20 {
		t.Fatalf("trim of 8 MiB freed only %d bytes (%d -> %d)", before-after, before, after)
	}
}

func TestFileReopenKeepsData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol.img")
	e, err := ioengine.OpenFile(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.WriteAt([]byte("hello"), 1000); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e, err = ioengine.OpenFile(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	p := make([]byte, 5)
	if _, err := e.ReadAt(p, 1000); err != nil || string(p) != "hello" {
		t.Fatalf("after reopen read %q, %v", p, err)
	}
}

func TestOpenUnknownKind(t *testing.T) {
	if _, err := ioengine.Open("tape", "", 1); err == nil {
		t.Fatal("Open of an unknown engine kind succeeded")
	}
}
