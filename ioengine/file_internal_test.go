package ioengine

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// A filesystem that refuses O_DIRECT at open gets buffered I/O, and the
// engine works.
func TestFileDirectFallback(t *testing.T) {
	openFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		if flag&unix.O_DIRECT != 0 {
			return nil, &os.PathError{Op: "open", Path: name, Err: unix.EINVAL}
		}
		return os.OpenFile(name, flag, perm)
	}
	t.Cleanup(func() { openFile = os.OpenFile })
	e, err := OpenFileWith(filepath.Join(t.TempDir(), "vol.img"), 1<<20, OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatalf("open with a filesystem refusing O_DIRECT: %v", err)
	}
	defer e.Close()
	if e.Direct() {
		t.Fatal("Direct() after the filesystem refused O_DIRECT")
	}
	p := []byte("unaligned, buffered")
	if _, err := e.WriteAt(p, 4097); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := e.ReadAt(got, 4097); err != nil || string(got) != string(p) {
		t.Fatalf("read back %q, %v", got, err)
	}
}

// An aligned direct I/O that the filesystem refuses with EINVAL turns
// O_DIRECT off and is retried buffered.
func TestFileDropDirect(t *testing.T) {
	e, err := OpenFileWith(filepath.Join(t.TempDir(), "vol.img"), 1<<20, OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if !e.Direct() {
		t.Skip("temp dir filesystem refuses O_DIRECT")
	}
	if !e.dropDirect() || e.Direct() {
		t.Fatal("dropDirect did not turn O_DIRECT off")
	}
	fl, err := unix.FcntlInt(uintptr(e.fd), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_DIRECT != 0 {
		t.Fatalf("fd flags %#x, %v: O_DIRECT still set", fl, err)
	}
	p := []byte("x")
	if _, err := e.WriteAt(p, 1); err != nil {
		t.Fatal(err)
	}
}

// Reopen never creates or grows a backing file: a missing one is
// os.ErrNotExist and a short one ErrTruncated, so a volume's lost data is
// an error, not zeroes.
func TestReopenMustExist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.img")
	if _, err := Reopen(KindFile, path, 1<<20); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Reopen of a missing file: %v, want ErrNotExist", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("Reopen created the file: %v", err)
	}
	e, err := Open(KindFile, path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	if e, err = Reopen(KindFile, path, 1<<20); err != nil {
		t.Fatalf("Reopen of an existing file: %v", err)
	}
	e.Close()
	if _, err := Reopen(KindFile, path, 2<<20); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Reopen with a larger size: %v, want ErrTruncated", err)
	}
	if st, _ := os.Stat(path); st.Size() != 1<<20 {
		t.Fatalf("Reopen changed the file size to %d", st.Size())
	}
}
