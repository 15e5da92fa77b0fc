package nbd

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"
	"time"
)

// TestClient: the Go client against the server: handshake, read, write,
// flush, trim, an error reply that leaves the connection usable, and a
// refused export.
func TestClient(t *testing.T) {
	exp, _ := memExport(t, 1<<20)
	_, addr := startServer(t, exportSet{"v": exp}, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "tcp", addr, "v")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size() != 1<<20 || c.ReadOnly() {
		t.Fatalf("size %d, read-only %v", c.Size(), c.ReadOnly())
	}
	data := pattern(8192, 7)
	if _, err := c.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if _, err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if _, err := c.ReadAt(got, 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past the end: %v, want EINVAL", err)
	}
	if err := c.Trim(4096, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(got[:4096], 4096); err != nil || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatalf("read after trim: %v", err)
	}
	if _, err := Dial(ctx, "tcp", addr, "nope"); err == nil {
		t.Fatal("dial of an unknown export succeeded")
	}
}
