//go:build vmtest

// In-VM tests: they need ublk_drv, so they are built with -tags vmtest and
// run inside the QEMU guest (make test-ublk-vm), never on the host.

package ublk

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/vm/guest"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv("BLOCKD_UBLK_CHILD"); mode != "" {
		os.Exit(childDaemon(mode))
	}
	os.Exit(m.Run())
}

func requireUblk(t *testing.T) {
	t.Helper()
	guest.RequireVM(t)
	if err := module.Load("ublk_drv"); err != nil {
		t.Fatal(err)
	}
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func waitGone(t *testing.T, path string) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s still exists", path)
}

// alignedBuf is page-aligned memory for O_DIRECT.
func alignedBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// directIO writes random blocks at scattered offsets with O_DIRECT, reads
// them back and compares.
func directIO(t *testing.T, dev string, size int64) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := alignedBuf(t, 1<<20)
	r := alignedBuf(t, 1<<20)
	offs := []int64{0, 4096, size/2 + 8192, size - 1<<20}
	for _, off := range offs {
		rand.Read(w)
		if _, err := f.WriteAt(w, off); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
		clear(r)
		if _, err := f.ReadAt(r, off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if !bytes.Equal(w, r) {
			t.Fatalf("data at %d differs", off)
		}
	}
	if _, err := f.ReadAt(r[:4096], size); err != io.EOF {
		t.Fatalf("read at the end: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
}

func TestVMAttachDetach(t *testing.T) {
	requireUblk(t)
	const size = 64 << 20
	fds, goroutines := fdCount(t), runtime.NumGoroutine()
	for i := 0; i < 2; i++ {
		mem, err := ioengine.NewMemory(size)
		if err != nil {
			t.Fatal(err)
		}
		dev, err := Attach(context.Background(), Config{ID: -1, Queues: 2, Depth: 16, Size: size, Handler: ioengine.Handler(mem)})
		if err != nil {
			t.Fatal(err)
		}
		info := dev.Info()
		t.Logf("attached %s flags %#x max io %d", dev.Path(), info.Flags, info.MaxIOBufBytes)
		if info.Flags&FlagUserRecovery == 0 || info.Flags&FlagUserRecoveryReissue == 0 {
			t.Errorf("kernel did not keep recovery flags: %#x", info.Flags)
		}
		got, err := os.ReadFile(fmt.Sprintf("/sys/block/ublkb%d/size", dev.ID()))
		if err != nil || strings.TrimSpace(string(got)) != strconv.Itoa(size/512) {
			t.Fatalf("sysfs size %q %v", got, err)
		}
		lbs, _ := os.ReadFile(fmt.Sprintf("/sys/block/ublkb%d/queue/logical_block_size", dev.ID()))
		if strings.TrimSpace(string(lbs)) != "4096" {
			t.Errorf("logical block size %q", lbs)
		}
		directIO(t, dev.Path(), size)
		// Discard through the block layer reaches the engine as a trim.
		guest.Run(t, "blkdiscard", "-o", "0", "-l", "1048576", dev.Path())
		if err := dev.Detach(); err != nil {
			t.Fatal(err)
		}
		waitGone(t, dev.Path())
		waitGone(t, CharPath(dev.ID()))
		mem.Close()
	}
	if n := fdCount(t); n != fds {
		t.Errorf("fds before %d after %d", fds, n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines {
		t.Errorf("goroutines before %d after %d", goroutines, n)
	}
}

// waitBlocked waits until n of this process's threads sit in
// uninterruptible sleep: the application I/O waiting for a server, so that
// recovery is tested with I/O pending on it. (The block layer's inflight
// counters do not count requests held while the device is quiesced.)
func waitBlocked(t *testing.T, n int) {
	t.Helper()
	got := 0
	for i := 0; i < 500; i++ {
		got = 0
		tasks, _ := filepath.Glob("/proc/self/task/*/stat")
		for _, p := range tasks {
			b, _ := os.ReadFile(p)
			// state follows the parenthesised command name
			if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'D' {
				got++
			}
		}
		if got >= n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%d threads blocked in I/O, want %d", got, n)
}

func TestVMExt4(t *testing.T) {
	requireUblk(t)
	for _, m := range []string{"crc32c_generic", "ext4"} {
		if err := module.Load(m); err != nil {
			t.Fatal(err)
		}
	}
	dev := memoryDevice(t, 512<<20, Config{ID: -1, Queues: 2, Depth: 32})
	defer dev.Detach()
	guest.Run(t, "/sbin/mke2fs", "-q", "-F", "-t", "ext4", dev.Path())
	dir := guest.Mount(t, dev.Path(), "ext4")
	sums := guest.WriteRandomFiles(t, dir, 24, 512<<10)
	guest.Run(t, "sync")
	guest.Umount(t, dir)
	// Drop the page cache so the verification reads through ublk.
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
	guest.Run(t, "/sbin/e2fsck", "-f", "-n", dev.Path())
	guest.Remount(t, dev.Path(), "ext4", dir)
	guest.VerifyFiles(t, dir, sums)
	guest.Run(t, "fstrim", dir)
	guest.Umount(t, dir)
	if err := dev.Detach(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, dev.Path())
}

// TestVMReleaseRecover stops serving a live device and recovers it in the
// same process, with a read issued during the gap: it must wait, not fail.
func TestVMReleaseRecover(t *testing.T) {
	requireUblk(t)
	mem, err := ioengine.NewMemory(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	id, f, w, r, done := releasedWithPendingRead(t, Config{ID: -1, Queues: 2, Depth: 8, Size: mem.Size(), Handler: ioengine.Handler(mem)})
	dev2, err := Recover(context.Background(), id, Config{Handler: ioengine.Handler(mem)})
	if err != nil {
		out, _ := guest.Exec("dmesg")
		t.Logf("dmesg:\n%s", out)
		t.Fatal(err)
	}
	defer dev2.Detach()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("read across recovery: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("read across recovery never completed")
	}
	if !bytes.Equal(r, w) {
		t.Fatal("read across recovery returned wrong data")
	}
	f.Close()
	if err := dev2.Detach(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, dev2.Path())
}

// memoryDevice attaches a device of size bytes with cfg, served from a new
// memory engine that is closed at cleanup.
func memoryDevice(t *testing.T, size int64, cfg Config) *Device {
	t.Helper()
	mem, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	cfg.Size, cfg.Handler = size, ioengine.Handler(mem)
	dev, err := Attach(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return dev
}

// releasedWithPendingRead attaches a device with cfg, writes 64 KiB of
// random data at 1 MiB through an O_DIRECT file, releases the device (it
// is quiesced, as after its server died) and reads that block back: the
// read waits. It returns the device id, the open file (closed at cleanup),
// the data written, the read's buffer and its result. Should the test
// fail, removing the device at cleanup fails the read instead of leaving
// the process stuck in it.
func releasedWithPendingRead(t *testing.T, cfg Config) (id int, f *os.File, w, r []byte, done chan error) {
	t.Helper()
	dev, err := Attach(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	id = dev.ID()
	t.Cleanup(func() { Remove(id, nil) })
	f, err = os.OpenFile(dev.Path(), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	w = alignedBuf(t, 64<<10)
	rand.Read(w)
	if _, err := f.WriteAt(w, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := dev.Release(); err != nil {
		t.Fatal(err)
	}
	r = alignedBuf(t, 64<<10)
	done = make(chan error, 1)
	go func() { // owner: the test; exits when the read returns
		_, err := f.ReadAt(r, 1<<20)
		done <- err
	}()
	waitBlocked(t, 1)
	return id, f, w, r, done
}

// childDaemon serves a file-backed device until killed: mode "attach"
// creates it, "recover:<id>" takes it over. It prints "READY <id>".
func childDaemon(mode string) int {
	path := os.Getenv("BLOCKD_UBLK_FILE")
	e, err := ioengine.OpenFile(path, 64<<20)
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	var dev *Device
	cfg := Config{ID: -1, Queues: 2, Depth: 8, Size: 64 << 20, Handler: ioengine.Handler(e)}
	if id, ok := strings.CutPrefix(mode, "recover:"); ok {
		n, _ := strconv.Atoi(id)
		dev, err = Recover(context.Background(), n, cfg)
	} else {
		dev, err = Attach(context.Background(), cfg)
	}
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	fmt.Printf("READY %d\n", dev.ID())
	select {}
}

func startChild(t *testing.T, mode, file string) (*exec.Cmd, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "BLOCKD_UBLK_CHILD="+mode, "BLOCKD_UBLK_FILE="+file)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	var id int
	if _, serr := fmt.Sscanf(line, "READY %d", &id); err != nil || serr != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child %s: %q %v", mode, line, err)
	}
	return cmd, id
}

// TestVMKillRecover kills the serving process with SIGKILL while an
// application has the device open, recovers it from a new process, and
// checks the I/O issued in between completes with the right data; then it
// kills the server again and Cleanup removes the orphan.
func TestVMKillRecover(t *testing.T) {
	requireUblk(t)
	file := filepath.Join(t.TempDir(), "vol")
	child, id := startChild(t, "attach", file)
	t.Cleanup(func() { child.Process.Kill(); Remove(id, nil) })
	dev := BlockPath(id)
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := alignedBuf(t, 128<<10)
	rand.Read(w)
	if _, err := f.WriteAt(w, 8<<20); err != nil {
		t.Fatal(err)
	}
	child.Process.Kill()
	child.Wait()

	r := alignedBuf(t, 128<<10)
	w2 := alignedBuf(t, 64<<10)
	rand.Read(w2)
	done := make(chan error, 2)
	go func() {
		_, err := f.ReadAt(r, 8<<20)
		done <- err
	}()
	go func() {
		_, err := f.WriteAt(w2, 16<<20)
		done <- err
	}()

	waitBlocked(t, 2)
	child2, id2 := startChild(t, "recover:"+strconv.Itoa(id), file)
	t.Cleanup(func() { child2.Process.Kill() })
	if id2 != id {
		t.Fatalf("recovered %d, want %d", id2, id)
	}
	for i := 0; i < 2; i++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("I/O across kill and recovery: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("I/O across recovery never completed")
		}
	}
	if !bytes.Equal(r, w) {
		t.Fatal("read across recovery returned wrong data")
	}
	r2 := alignedBuf(t, 64<<10)
	if _, err := f.ReadAt(r2, 16<<20); err != nil || !bytes.Equal(r2, w2) {
		t.Fatalf("write across recovery not durable: %v", err)
	}
	f.Close()

	// Orphan it again; a new daemon that does not want it cleans it up.
	child2.Process.Kill()
	child2.Wait()
	var removed []int
	for i := 0; i < 100; i++ {
		removed, err = Cleanup(0, func(DevInfo) bool { return false }, nil)
		if err == nil && len(removed) > 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil || len(removed) != 1 || removed[0] != id {
		t.Fatalf("cleanup removed %v: %v", removed, err)
	}
	waitGone(t, dev)
	waitGone(t, CharPath(id))
}

// TestVMRequestAllocs checks the steady-state data path (queue goroutine,
// descriptor decoding, worker hand-off, wake-up, commit) allocates nothing
// per request. It also logs the request rate, which under TCG says little.
func TestVMRequestAllocs(t *testing.T) {
	requireUblk(t)
	h := pipeline.HandlerFunc(func(context.Context, *pipeline.Request) error { return nil })
	dev, err := Attach(context.Background(), Config{ID: -1, Queues: 1, Depth: 8, Size: 64 << 20, Handler: h})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach()
	f, err := os.OpenFile(dev.Path(), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(t, 4096)
	io := func(n int) {
		for i := 0; i < n; i++ {
			if _, err := f.ReadAt(buf, int64(i%4096)*4096); err != nil {
				t.Fatal(err)
			}
		}
	}
	io(200)
	const n = 2000
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	start := time.Now()
	io(n)
	elapsed := time.Since(start)
	runtime.ReadMemStats(&m1)
	per := float64(m1.Mallocs-m0.Mallocs) / n
	t.Logf("%.4f allocations per request; %.0f sync 4 KiB reads/s in the VM", per, n/elapsed.Seconds())
	if per > 0.01 {
		t.Fatalf("%.4f allocations per request", per)
	}
	f.Close()
	if err := dev.Detach(); err != nil {
		t.Fatal(err)
	}
}

// TestVMAbandon: a quiesced device whose data is gone is abandoned while an
// application holds it open with a read waiting: the read fails (EIO),
// Abandon does not wait for the application to close it, the device nodes
// go, and later I/O on the open file finds a disk of size 0. Another
// owner's Abandon leaves the device alone.
func TestVMAbandon(t *testing.T) {
	requireUblk(t)
	const owner = 7
	mem, err := ioengine.NewMemory(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	id, f, w, r, done := releasedWithPendingRead(t, Config{ID: -1, Queues: 1, Depth: 8, Size: mem.Size(), Handler: ioengine.Handler(mem), Owner: owner})
	path := BlockPath(id)

	if err := Abandon(id, owner+1, nil); !errors.Is(err, ErrNotRecoverable) {
		t.Fatalf("Abandon by another owner: %v, want ErrNotRecoverable", err)
	}
	t0 := time.Now()
	if err := Abandon(id, owner, nil); err != nil {
		t.Fatal(err)
	}
	t.Logf("Abandon returned after %v with the disk open", time.Since(t0).Round(time.Millisecond))
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("the read that waited: %v, want EIO", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the read that waited is still blocked 10s after Abandon")
	}
	waitGone(t, path)
	waitGone(t, CharPath(id))
	if n, err := f.ReadAt(r, 1<<20); n != 0 || err != io.EOF {
		t.Errorf("a read on the open file after Abandon: %d bytes, %v; want EOF (size 0)", n, err)
	}
	if _, err := f.WriteAt(w, 1<<20); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("a write on the open file after Abandon: %v, want ENOSPC (size 0)", err)
	}
	// The kernel keeps the deleted device (its id) until the last close;
	// abandoning it again meanwhile is a no-op.
	if err := Abandon(id, owner, nil); err != nil {
		t.Errorf("Abandon again while the disk is open: %v", err)
	}
	f.Close()
	for i := 0; ; i++ {
		err := Abandon(id, owner, nil)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if i == 100 {
			t.Fatalf("Abandon after the last close: %v, want os.ErrNotExist", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestVMDelDevWaitsForOpeners documents why blockd deletes devices with
// DEL_DEV_ASYNC: the plain DEL_DEV of a stopped device returns only once
// the last opener of its disk closes it.
func TestVMDelDevWaitsForOpeners(t *testing.T) {
	requireUblk(t)
	dev := memoryDevice(t, 16<<20, Config{ID: -1, Queues: 1, Depth: 8})
	id := dev.ID()
	f, err := os.OpenFile(dev.Path(), os.O_RDONLY, 0)
	if err != nil {
		dev.Detach()
		t.Fatal(err)
	}
	if err := dev.Release(); err != nil {
		t.Fatal(err)
	}
	ctrl, err := OpenControl(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	if err := ctrl.StopDev(uint32(id)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ctrl.DelDev(uint32(id)) }() // owner: this test; exits when DEL_DEV completes
	select {
	case err := <-done:
		f.Close()
		t.Fatalf("DEL_DEV returned (%v) while the disk was open; blockd's delete can use it again", err)
	case <-time.After(time.Second):
	}
	f.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("DEL_DEV still waiting 10s after the last opener closed the disk")
	}
	waitGone(t, CharPath(id))
}
