//go:build vmtest

package kerneltest

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/vm/guest"
)

const (
	mke2fs = "/sbin/mke2fs" // e2fsprogs, not busybox's applet
	e2fsck = "/sbin/e2fsck"
)

func loadNBD(t *testing.T) *nbdnl.Client {
	t.Helper()
	guest.RequireVM(t)
	if err := module.Load("nbd"); err != nil {
		t.Fatal(err)
	}
	if !module.Loaded("nbd") {
		t.Fatal("module.Load(nbd) returned nil but /sys/module/nbd is missing")
	}
	c, err := nbdnl.Dial()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func loadExt4(t *testing.T) {
	t.Helper()
	// ext4 asks the crypto API for "crc32c" at mount time; load a provider
	// up front instead of relying on the kernel calling modprobe.
	for _, m := range []string{"crc32c_generic", "ext4"} {
		if err := module.Load(m); err != nil {
			t.Fatal(err)
		}
	}
}

func TestModuleLoad(t *testing.T) {
	guest.RequireVM(t)
	if err := module.Load("nbd"); err != nil {
		t.Fatal(err)
	}
	if err := module.Load("nbd"); err != nil {
		t.Fatalf("second Load(nbd) must be a no-op: %v", err)
	}
	if !module.Loaded("nbd") {
		t.Fatal("nbd not live after Load")
	}
	err := module.Load("no_such_module")
	if !errors.Is(err, module.ErrNotFound) {
		t.Fatalf("Load(no_such_module) = %v, want ErrNotFound", err)
	}
	rel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	if !strings.Contains(err.Error(), strings.TrimSpace(string(rel))) {
		t.Errorf("error %q does not name the kernel", err)
	}
}

func TestNBDStatusMissingDevice(t *testing.T) {
	c := loadNBD(t)
	if _, err := c.Status(4000); !errors.Is(err, nbdnl.ErrNoDevice) {
		t.Fatalf("Status(4000) = %v, want ErrNoDevice", err)
	}
}

// TestNBDExt4 is the end-to-end proof: two sockets via netlink, a real
// filesystem on /dev/nbdN, data verified across umount/fsck/mount, and a
// clean detach.
func TestNBDExt4(t *testing.T) {
	c := loadNBD(t)
	loadExt4(t)
	const size = 512 << 20
	e, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	kern, srv := socketPairs(t, 2)
	r := serve(e, srv)
	defer r.stop()

	idx, err := c.Connect(nbdnl.Config{
		Index:       nbdnl.AnyIndex,
		Socks:       kern,
		SizeBytes:   size,
		BlockSize:   4096,
		ServerFlags: nbdnl.FlagsDefault,
		Timeout:     60 * time.Second,
	})
	closeAll(kern)
	if err != nil {
		t.Fatal(err)
	}
	dev := nbdnl.DevicePath(idx)
	t.Logf("connected %s", dev)
	detached := false
	defer func() {
		if !detached {
			_ = c.Disconnect(idx)
		}
	}()

	st, err := c.Status(idx)
	if err != nil || !st.Connected || st.Index != idx {
		t.Fatalf("Status(%d) = %+v, %v; want connected", idx, st, err)
	}
	guest.WaitFor(t, dev+" size", 10*time.Second, func() bool {
		n, _ := guest.DeviceSize(dev)
		return n == size
	})

	guest.Run(t, mke2fs, "-t", "ext4", "-F", "-q", dev)
	mnt := guest.Mount(t, dev, "ext4")
	sums := guest.WriteRandomFiles(t, mnt, 64, 256<<10)
	syscall.Sync()
	guest.Umount(t, mnt)
	guest.Run(t, e2fsck, "-f", "-n", dev)
	guest.Remount(t, dev, "ext4", mnt)
	guest.VerifyFiles(t, mnt, sums)
	guest.Umount(t, mnt)

	for i := range r.served {
		if n := r.served[i].Load(); n == 0 {
			t.Errorf("connection %d served no requests: the kernel did not use both sockets", i)
		} else {
			t.Logf("connection %d served %d requests", i, n)
		}
	}

	if err := c.Disconnect(idx); err != nil {
		t.Fatal(err)
	}
	detached = true
	guest.WaitFor(t, dev+" disconnected", 10*time.Second, func() bool {
		st, err := c.Status(idx)
		return errors.Is(err, nbdnl.ErrNoDevice) || (err == nil && !st.Connected)
	})
	if n, err := guest.DeviceSize(dev); err == nil && n != 0 {
		t.Errorf("%s size after disconnect = %d, want 0", dev, n)
	}
	// The kernel shuts its socket ends down: every server goroutine must
	// see EOF and exit on its own, without stop closing anything.
	done := make(chan struct{})
	go func() { r.wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("responder connections still open 10s after disconnect")
	}
}

// TestNBDReconfigure is the daemon-restart path: the server's sockets die,
// I/O waits (dead_conn_timeout) instead of failing, and NBD_CMD_RECONFIGURE
// with fresh sockets lets it complete with the right data.
func TestNBDReconfigure(t *testing.T) {
	c := loadNBD(t)
	const size = 64 << 20
	e, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("blockd!\n"), 512) // 4 KiB
	if _, err := e.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	kern, srv := socketPairs(t, 1)
	r := serve(e, srv)
	idx, err := c.Connect(nbdnl.Config{
		Index:           nbdnl.AnyIndex,
		Socks:           kern,
		SizeBytes:       size,
		BlockSize:       4096,
		ServerFlags:     nbdnl.FlagsDefault,
		Timeout:         60 * time.Second,
		DeadConnTimeout: 60 * time.Second,
	})
	closeAll(kern)
	if err != nil {
		r.stop()
		t.Fatal(err)
	}
	defer c.Disconnect(idx) // on failure paths; an error then is moot
	dev := nbdnl.DevicePath(idx)

	// "Crash" the server: its socket ends close, the kernel's receive
	// thread sees EOF and marks the connection dead. (NBD_CMD_STATUS keeps
	// reporting "connected": that means configured, which it still is.)
	r.stop()

	got := make([]byte, len(want))
	readErr := make(chan error, 1)
	go func() { // owner: this test; exits when the read completes or fails
		f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
		if err != nil {
			readErr <- err
			return
		}
		defer f.Close()
		buf := alignedBuf(len(want))
		_, err = f.ReadAt(buf, 1<<20)
		copy(got, buf)
		readErr <- err
	}()
	select {
	case err := <-readErr:
		t.Fatalf("read finished while no server was connected: %v", err)
	case <-time.After(2 * time.Second):
	}

	kern2, srv2 := socketPairs(t, 1)
	r2 := serve(e, srv2)
	defer r2.stop()
	// The kernel only swaps sockets it has already marked dead and says
	// ENOSPC otherwise; by now the blocked read has made sure it noticed,
	// but allow it a moment.
	var rerr error
	guest.WaitFor(t, "reconfigure accepted", 10*time.Second, func() bool {
		rerr = c.Reconfigure(idx, kern2, 0, 0, 0)
		return !errors.Is(rerr, syscall.ENOSPC)
	})
	closeAll(kern2)
	if rerr != nil {
		t.Fatal(rerr)
	}
	select {
	case err := <-readErr:
		if err != nil {
			t.Fatalf("read after reconfigure: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read still blocked 30s after reconfigure")
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data read after reconfigure differs from what the volume holds")
	}
	st, err := c.Status(idx)
	if err != nil || !st.Connected {
		t.Fatalf("Status after reconfigure = %+v, %v; want connected", st, err)
	}
	if err := c.Disconnect(idx); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { r2.wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("reconfigured connection still open 10s after disconnect")
	}
}

// alignedBuf returns a page-aligned buffer for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))&4095)
	if off == 4096 {
		off = 0
	}
	return b[off : off+n]
}
