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
	kern, r := serveMemory(t, size, 2)

	idx, err := connectKernel(c, kern, size, nbdnl.Config{BackendID: "blockd-test-ext4"})
	if err != nil {
		t.Fatal(err)
	}
	dev := nbdnl.DevicePath(idx)
	t.Logf("connected %s", dev)
	if id, err := nbdnl.Backend(idx); err != nil || id != "blockd-test-ext4" {
		t.Errorf("Backend(%d) = %q, %v; want blockd-test-ext4", idx, id, err)
	}
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

	ext4RoundTrip(t, dev)

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
	idx, err := connectKernel(c, kern, size, nbdnl.Config{DeadConnTimeout: 60 * time.Second})
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
	// The kernel only swaps sockets it has already marked dead
	// (ErrNoDeadSocket otherwise); by now the blocked read has made sure
	// it noticed, but allow it a moment.
	var rerr error
	guest.WaitFor(t, "reconfigure accepted", 10*time.Second, func() bool {
		rerr = c.Reconfigure(idx, kern2, 0, 0, 0)
		return !errors.Is(rerr, nbdnl.ErrNoDeadSocket)
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

// TestNBDDiscardAndWriteZeroes checks that the advertised TRIM and
// WRITE_ZEROES flags reach the server as those commands and that both
// ranges read back as zeroes.
func TestNBDDiscardAndWriteZeroes(t *testing.T) {
	c := loadNBD(t)
	const size = 64 << 20
	kern, r := serveMemory(t, size, 1)
	idx, err := connectKernel(c, kern, size, nbdnl.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(idx)
	dev := nbdnl.DevicePath(idx)
	guest.WaitFor(t, dev+" size", 10*time.Second, func() bool {
		n, _ := guest.DeviceSize(dev)
		return n == size
	})

	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const mib = 1 << 20
	fill := alignedBuf(4 * mib)
	for i := range fill {
		fill[i] = 0xa5
	}
	if _, err := f.WriteAt(fill, 0); err != nil {
		t.Fatal(err)
	}
	guest.Run(t, "/usr/sbin/blkdiscard", "-o", "0", "-l", "1048576", dev)
	guest.Run(t, "/usr/sbin/blkdiscard", "-z", "-o", "2097152", "-l", "1048576", dev)

	got := alignedBuf(4 * mib)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for _, rg := range []struct {
		off  int
		zero bool
	}{{0, true}, {mib, false}, {2 * mib, true}, {3 * mib, false}} {
		for i, b := range got[rg.off : rg.off+mib] {
			if (b == 0) != rg.zero {
				t.Fatalf("byte %d = %#x after discard/zero-out (range zero=%v)", rg.off+i, b, rg.zero)
			}
		}
	}
	if n := r.ops[cmdTrim].Load(); n == 0 {
		t.Error("blkdiscard sent no NBD_CMD_TRIM")
	}
	// Kernels that support NBD_CMD_WRITE_ZEROES advertise it in the queue
	// limits; there a zero-out must arrive as that command.
	if lim, err := os.ReadFile("/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/queue/write_zeroes_max_bytes"); err == nil &&
		strings.TrimSpace(string(lim)) != "0" {
		if r.ops[cmdWriteZeroes].Load() == 0 {
			t.Error("write_zeroes is enabled but blkdiscard -z sent no NBD_CMD_WRITE_ZEROES")
		}
	} else {
		t.Logf("kernel does not use NBD_CMD_WRITE_ZEROES (write_zeroes_max_bytes=%q)", strings.TrimSpace(string(lim)))
	}
	t.Logf("ops: trim=%d write_zeroes=%d write=%d", r.ops[cmdTrim].Load(), r.ops[cmdWriteZeroes].Load(), r.ops[cmdWrite].Load())
}

// connectKernel connects the kernel's ends of socketpairs as a device of
// size bytes, with the settings of cfg that are set (index: any unless
// set; 4 KiB blocks, the default flags and a 60s request timeout unless
// set), and closes the kernel's ends.
func connectKernel(c *nbdnl.Client, kern []*os.File, size uint64, cfg nbdnl.Config) (int, error) {
	defer closeAll(kern)
	cfg.Socks, cfg.SizeBytes = kern, size
	if cfg.Index == 0 {
		cfg.Index = nbdnl.AnyIndex
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = 4096
	}
	if cfg.ServerFlags == 0 {
		cfg.ServerFlags = nbdnl.FlagsDefault
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 60 * time.Second
	}
	return c.Connect(cfg)
}
