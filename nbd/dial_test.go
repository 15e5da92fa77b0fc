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

// A connection's memory follows the depth it runs at: at queue depth 1 it
// cycles through one or two slots (the most recently freed is reused
// first; the reply's slot may not be home yet when the next request
// arrives), and no slot keeps a buffer larger than 16 KiB between
// requests. With slots handed out in turn, every one of MaxInFlight slots
// ended up keeping a 128 KiB buffer: 16 MiB per connection, gigabytes for
// a node's hundreds.
func TestConnMemoryFollowsDepth(t *testing.T) {
	kept := make(chan int, 1)
	testHookKept = func(n int) { kept <- n }
	defer func() { testHookKept = nil }()
	exp, _ := memExport(t, 8<<20)
	_, addr := startServer(t, exportSet{"v": exp}, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, "tcp", addr, "v")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 128<<10)
	for i := range 300 {
		n := len(buf)
		if i%2 == 1 {
			n = 4096
		}
		if _, err := c.ReadAt(buf[:n], int64(i%64)*int64(len(buf))); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	select {
	case n := <-kept:
		if n > 2 {
			t.Errorf("%d slots kept a buffer after 300 requests at queue depth 1, want at most 2", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the connection did not end")
	}
}
