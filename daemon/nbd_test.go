package daemon

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/nbd"
)

func dialNBD(t *testing.T, d *Daemon, export string) *nbd.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, "tcp", d.NBDAddr(), export)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Defect 6: deleting a volume closes its NBD connections, so a client
// learns it is gone (and finds a new volume of the same name when it
// reconnects) instead of getting ESHUTDOWN forever.
func TestDeleteClosesNBDClients(t *testing.T) {
	d, c := startTestDaemon(t, Config{NBDListen: "127.0.0.1:0"})
	if _, err := c.CreateVolume(api.Spec{Name: "v", Size: 1 << 20, Engine: "memory"}); err != nil {
		t.Fatal(err)
	}
	old := dialNBD(t, d, "v")
	if _, err := old.WriteAt([]byte("old data"), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	_, err := old.ReadAt(buf, 0)
	var re *nbd.ReplyError
	if err == nil || errors.As(err, &re) {
		t.Fatalf("read on a deleted volume's connection: %v; want the connection closed", err)
	}
	if _, err := c.CreateVolume(api.Spec{Name: "v", Size: 2 << 20, Engine: "memory"}); err != nil {
		t.Fatal(err)
	}
	fresh := dialNBD(t, d, "v")
	if _, err := fresh.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, make([]byte, 8)) || fresh.Size() != 2<<20 {
		t.Fatalf("the new volume of the same name: %q, size %d, %v", buf, fresh.Size(), err)
	}
}

// After a resize, a client's next connection sees the new size, and a
// connection made before keeps working within the size it was told.
func TestResizeSeenOnNextConnection(t *testing.T) {
	d, c := startTestDaemon(t, Config{NBDListen: "127.0.0.1:0"})
	if _, err := c.CreateVolume(api.Spec{Name: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	before := dialNBD(t, d, "v")
	if _, err := c.ResizeVolume("v", 4<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := before.WriteAt([]byte("still fine"), 4096); err != nil {
		t.Fatalf("the connection made before the resize: %v", err)
	}
	after := dialNBD(t, d, "v")
	if after.Size() != 4<<20 {
		t.Fatalf("size on the next connection %d, want %d", after.Size(), 4<<20)
	}
	if _, err := after.WriteAt([]byte("grown"), 3<<20); err != nil {
		t.Fatalf("write into the grown part: %v", err)
	}
}
