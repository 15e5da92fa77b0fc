//go:build vmtest

package kerneltest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/vm/guest"
)

// What a daemon restart does to kernel devices beyond the plain recovery
// of blockd_test.go: a memory volume's device is failed, not served from
// the empty volume, and a daemon never disturbs another daemon's devices.
// Each scenario runs over both frontends (ublk on 6.12 only).

// kernelFrontend is one frontend as these tests drive it.
type kernelFrontend struct {
	name    string
	require func(t *testing.T)
	attach  func(d *blockd, vol string) string
	detach  func(d *blockd, vol, dev string)
	// gone reports whether dev's kernel device is gone (nbd: no size;
	// ublk: block and character devices removed).
	gone func(dev string) bool
}

var (
	nbdFrontend = kernelFrontend{
		name:    "nbd",
		require: func(t *testing.T) { loadNBD(t) },
		attach:  func(d *blockd, vol string) string { return d.attach(vol, 1) },
		detach:  func(d *blockd, vol, dev string) { d.detach(vol, dev) },
		gone: func(dev string) bool {
			n, err := guest.DeviceSize(dev)
			return err != nil || n == 0
		},
	}
	ublkFrontend = kernelFrontend{
		name:    "ublk",
		require: requireUblk,
		attach:  func(d *blockd, vol string) string { return d.attachUblk(vol, 1, 0) },
		detach:  func(d *blockd, vol, dev string) { d.detachUblk(vol, vol, dev) },
		gone: func(dev string) bool {
			for _, p := range []string{dev, "/dev/ublkc" + strings.TrimPrefix(dev, "/dev/ublkb")} {
				if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
					return false
				}
			}
			return true
		},
	}
)

// memoryLostLog is the error blockd logs when it fails a memory volume's
// device at start.
const memoryLostLog = "detached the kernel device of a memory volume at start"

// TestBlockdMemoryVolumeRestart: a memory volume attached as /dev/nbdN
// loses its data when blockd is killed; the restarted daemon must fail the
// device's I/O (EIO) rather than serve the new, empty volume's zeroes.
func TestBlockdMemoryVolumeRestart(t *testing.T) { memoryVolumeRestart(t, nbdFrontend) }

// TestBlockdUblkMemoryVolumeRestart is TestBlockdMemoryVolumeRestart over
// /dev/ublkbN.
func TestBlockdUblkMemoryVolumeRestart(t *testing.T) { memoryVolumeRestart(t, ublkFrontend) }

func memoryVolumeRestart(t *testing.T, fe kernelFrontend) {
	fe.require(t)
	d := startBlockd(t, t.TempDir(), "--nbd-timeout", "5s")
	d.must("volume", "create", "mem", "--size", "64MiB", "--engine", "memory")
	dev := fe.attach(d, "mem")
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := alignedBuf(writerBlock)
	pattern(want, 16, 1)
	if _, err := f.WriteAt(want, 16*writerBlock); err != nil {
		t.Fatal(err)
	}
	got := alignedBuf(writerBlock)
	if _, err := f.ReadAt(got, 16*writerBlock); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back before the kill: %v (data match %v)", err, bytes.Equal(got, want))
	}

	d.kill()
	// A read issued while no daemon runs waits for the next one, as an
	// application's (a mounted filesystem's) would.
	clear(got)
	err = heldAcrossStart(t, d, func() error {
		_, err := f.ReadAt(got, 16*writerBlock)
		return err
	})
	switch {
	case errors.Is(err, syscall.EIO):
		t.Logf("the read that waited across the restart failed: %v", err)
	case err == nil && !bytes.ContainsFunc(got, func(r rune) bool { return r != 0 }):
		t.Errorf("the read that waited across the restart returned zeroes (served by the new, empty volume), want EIO")
	default:
		t.Errorf("the read that waited across the restart: %v (data match %v), want EIO", err, bytes.Equal(got, want))
	}
	// Later I/O on the file still open gets no data either: nbd fails it
	// (EIO); a deleted ublk disk has size 0, so a read there is at its end
	// (EOF) and a write finds no space (ENOSPC).
	clear(got)
	switch n, err := f.ReadAt(got, 16*writerBlock); {
	case errors.Is(err, syscall.EIO):
		t.Logf("a new read on the open %s: %v", dev, err)
	case n == 0 && errors.Is(err, io.EOF):
		t.Logf("a new read on the open %s: EOF (the kernel set the disk's size to 0)", dev)
	default:
		t.Errorf("a new read on the open %s: %d bytes (zeroes %v), %v; want EIO or EOF", dev, n, !bytes.ContainsFunc(got, func(r rune) bool { return r != 0 }), err)
	}
	if _, err := f.WriteAt(want, 16*writerBlock); err == nil {
		t.Errorf("a new write on the open %s succeeded", dev)
	} else {
		t.Logf("a new write on the open %s: %v", dev, err)
	}
	f.Close()
	guest.WaitFor(t, dev+" gone", 10*time.Second, func() bool { return fe.gone(dev) })

	v := d.get("mem")
	wantReason := fmt.Sprintf("kernel device %s was detached at start: a memory volume's data does not survive a restart, so its I/O was failed (EIO) rather than served as zeroes", dev)
	if v.Attachment != nil || v.Reason != wantReason {
		t.Errorf("volume get mem after the restart: attachment %+v, reason %q; want none and %q", v.Attachment, v.Reason, wantReason)
	}
	if out := d.p.Output(); !strings.Contains(out, memoryLostLog) || !strings.Contains(out, "device="+dev) {
		t.Errorf("restarted blockd did not log at error level why it detached %s:\n%s", dev, out)
	}
	d.allowErrors = append(d.allowErrors, memoryLostLog)
	// The volume can be attached again: empty, as memory volumes start.
	dev = fe.attach(d, "mem")
	if err := writeRead(dev, 8192); err != nil {
		t.Error(err)
	}
	fe.detach(d, "mem", dev)
	d.stop()
}

// TestBlockdTwoDaemons: two daemons on two state dirs, each with an
// attached volume. Restarting one (kill -9) while the other runs, and
// while the other is down too, leaves the other's device alone: it keeps
// serving I/O, or holds it until its own daemon returns.
func TestBlockdTwoDaemons(t *testing.T) { twoDaemons(t, nbdFrontend) }

// TestBlockdUblkTwoDaemons is TestBlockdTwoDaemons over /dev/ublkbN.
func TestBlockdUblkTwoDaemons(t *testing.T) { twoDaemons(t, ublkFrontend) }

func twoDaemons(t *testing.T, fe kernelFrontend) {
	fe.require(t)
	a := startBlockd(t, t.TempDir(), "--nbd-timeout", "5s")
	b := startBlockd(t, t.TempDir(), "--nbd-timeout", "5s")
	if a.id() == b.id() || a.id() == "" {
		t.Errorf("two state dirs, daemon ids %q and %q; want two", a.id(), b.id())
	}
	a.must("volume", "create", "va", "--size", "64MiB", "--engine", "file")
	b.must("volume", "create", "vb", "--size", "64MiB", "--engine", "file")
	devA := fe.attach(a, "va")
	devB := fe.attach(b, "vb")
	for _, dev := range []string{devA, devB} {
		if err := writeRead(dev, 0); err != nil {
			t.Fatal(err)
		}
	}

	ok := t.Run("RestartWhileOtherRuns", func(t *testing.T) {
		a.kill()
		a.start()
		if err := boundedIO(devB, 8192); err != nil {
			t.Errorf("the other daemon's device after a restart: %v\nrestarted daemon's log:\n%s", err, a.p.Output())
		}
		if err := boundedIO(devA, 8192); err != nil {
			t.Errorf("the restarted daemon's own device: %v", err)
		}
	})
	if !ok {
		t.FailNow()
	}
	t.Run("RestartWhileOtherDown", func(t *testing.T) {
		b.kill()
		a.kill()
		a.start()
		if fe.gone(devB) {
			t.Fatalf("%s, the stopped daemon's device, was removed by the other daemon's start:\n%s", devB, a.p.Output())
		}
		// I/O on it waits for its own daemon, then completes.
		ioHeldWhileStopped(t, b, devB)
		if err := boundedIO(devA, 8192); err != nil {
			t.Errorf("the restarted daemon's own device: %v", err)
		}
	})
	fe.detach(a, "va", devA)
	fe.detach(b, "vb", devB)
	a.stop()
	b.stop()
}

// boundedIO is writeRead at off that must finish within 30 seconds.
func boundedIO(dev string, off int64) error {
	done := make(chan error, 1)
	go func() { done <- writeRead(dev, off) }() // owner: boundedIO; exits when the I/O returns
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s: I/O still blocked after 30s", filepath.Base(dev))
	}
}
