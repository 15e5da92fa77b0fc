// Package guest holds helpers for tests that run inside the QEMU guest
// booted by package vm: running tools and checking their output, starting,
// stopping and killing daemons (the blockd binary), mounting, and writing
// and verifying files of random data.
//
// Everything here reports through testing.TB, so a guest test reads like
// any other Go test; cmd/vmrun turns "--- PASS/FAIL" lines into the verdict.
package guest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// InVM reports whether the process runs in the vm harness's guest (its
// /init exports BLOCKD_VM=1).
func InVM() bool { return os.Getenv("BLOCKD_VM") == "1" }

// RequireVM fails the test outside the guest: these tests load modules,
// make filesystems and mount them, which must never happen on a build host.
func RequireVM(t testing.TB) {
	t.Helper()
	if !InVM() {
		t.Fatal("this test runs only in the vm harness guest (make test-kernel)")
	}
}

// CmdTimeout bounds every command Run starts.
var CmdTimeout = 2 * time.Minute

// Exec runs a command and returns its combined output.
func Exec(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), CmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Run runs a command and fails the test when it does not exit 0.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := Exec(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Proc is a background process owned by a test. Cleanup kills it if the
// test did not stop it.
type Proc struct {
	Name string
	cmd  *exec.Cmd
	out  lockedBuffer
	done chan struct{} // closed when the process has been reaped
	err  error         // Wait's result, valid after done
}

// Start starts a process whose output is collected (see Output).
func Start(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, done: make(chan struct{})}
	p.cmd = exec.Command(name, args...)
	p.cmd.Stdout = &p.out
	p.cmd.Stderr = &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { // owner: p; exits when the process does
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() { p.Kill() })
	return p
}

// Pid returns the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Output returns what the process wrote so far.
func (p *Proc) Output() string { return p.out.String() }

// Signal sends sig.
func (p *Proc) Signal(sig syscall.Signal) error { return p.cmd.Process.Signal(sig) }

// Stop sends SIGTERM and waits up to grace for exit, then kills. It
// returns the exit error (nil for a clean exit 0).
func (p *Proc) Stop(grace time.Duration) error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(grace):
		p.Kill()
		return fmt.Errorf("%s did not exit within %v of SIGTERM", p.Name, grace)
	}
}

// Kill sends SIGKILL (a crash, as far as the process can tell) and reaps it.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// WaitFor polls cond every 50ms until it is true or timeout passes.
func WaitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Mount mounts dev on a fresh directory and unmounts it at cleanup if the
// test did not.
func Mount(t testing.TB, dev, fstype string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mnt")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(dev, dir, fstype, 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, dir, err)
	}
	t.Cleanup(func() {
		_ = syscall.Unmount(dir, 0) // already gone if the test unmounted
		os.Remove(dir)
	})
	return dir
}

// Umount unmounts dir.
func Umount(t testing.TB, dir string) {
	t.Helper()
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Fatalf("umount %s: %v", dir, err)
	}
}

// Remount mounts dev on an existing directory.
func Remount(t testing.TB, dev, fstype, dir string) {
	t.Helper()
	if err := syscall.Mount(dev, dir, fstype, 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, dir, err)
	}
}

// Checksums maps file names to sha256 sums.
type Checksums map[string][sha256.Size]byte

// WriteRandomFiles writes n files of size bytes of random data into dir and
// returns their checksums.
func WriteRandomFiles(t testing.TB, dir string, n, size int) Checksums {
	t.Helper()
	sums := Checksums{}
	buf := make([]byte, size)
	for i := range n {
		if _, err := rand.Read(buf); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("f%03d", i)
		if err := os.WriteFile(filepath.Join(dir, name), buf, 0o644); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
		sums[name] = sha256.Sum256(buf)
	}
	return sums
}

// VerifyFiles checks that dir holds exactly the files in sums, with those
// contents.
func VerifyFiles(t testing.TB, dir string, sums Checksums) {
	t.Helper()
	for name, want := range sums {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("open %s: %v", name, err)
			continue
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			t.Errorf("read %s: %v", name, err)
			continue
		}
		if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
			t.Errorf("%s: sha256 %x, want %x", name, got, want)
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, ok := sums[e.Name()]; !ok && e.Name() != "lost+found" {
			t.Errorf("unexpected file %s", e.Name())
		}
	}
}

// DeviceSize returns a block device's size in bytes from sysfs
// (/sys/class/block/<name>/size counts 512-byte sectors).
func DeviceSize(dev string) (int64, error) {
	b, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(dev), "size"))
	if err != nil {
		return 0, err
	}
	var sectors int64
	if _, err := fmt.Sscan(string(b), &sectors); err != nil {
		return 0, errors.New("parse " + dev + " size: " + err.Error())
	}
	return sectors * 512, nil
}
