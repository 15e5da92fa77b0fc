//go:build vmtest

package kerneltest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/vm/guest"
)

// blockdCLI runs the guest's blockd client against the daemon's socket.
func blockdCLI(t *testing.T, sock string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "/usr/bin/blockd", append(args, "--api-socket", sock)...).CombinedOutput()
	if err != nil {
		t.Fatalf("blockd %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

func readAheadKB(t *testing.T, dev string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue/read_ahead_kb"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// Attaching a volume sets the kernel read-ahead its io_profile wants
// (sequential 4096 KiB, random 16 KiB, others 128 KiB), and a live
// profile change of an attached volume moves it: over nbd and over ublk.
func TestProfileReadAhead(t *testing.T) {
	guest.RequireVM(t)
	loadNBD(t)
	testProfileReadAhead(t, "nbd", "/dev/nbd", "--connections", "1")
}

func TestProfileReadAheadUblk(t *testing.T) {
	guest.RequireVM(t)
	requireUblk(t)
	testProfileReadAhead(t, "ublk", "/dev/ublkb", "--frontend", "ublk", "--queues", "1")
}

func testProfileReadAhead(t *testing.T, frontend, devPrefix string, attachArgs ...string) {
	if _, err := os.Stat("/usr/bin/blockd"); err != nil {
		t.Fatalf("blockd is not in the guest (make test-kernel puts it there): %v", err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "blockd.sock")
	d := exec.Command("/usr/bin/blockd", "serve", "--state-dir", dir, "--nbd-listen", "", "--metrics-listen", "")
	var log strings.Builder
	d.Stdout, d.Stderr = &log, &log
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		d.Process.Signal(syscall.SIGTERM)
		d.Wait()
		if t.Failed() {
			t.Logf("daemon log:\n%s", log.String())
		}
	}()
	for i := 0; ; i++ {
		if exec.Command("/usr/bin/blockd", "volume", "list", "--api-socket", sock).Run() == nil {
			break
		}
		if i == 400 {
			t.Fatal("daemon did not start in 20s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	devs := map[string]string{}
	for _, tc := range []struct{ profile, want string }{
		{"sequential", "4096"}, {"random", "16"}, {"db", "128"},
	} {
		blockdCLI(t, sock, "volume", "create", tc.profile, "--size", "64MiB", "--engine", "memory", "--profile", tc.profile)
		out := blockdCLI(t, sock, append([]string{"attach", tc.profile}, attachArgs...)...)
		dev := strings.Fields(out)[len(strings.Fields(out))-1]
		if !strings.HasPrefix(dev, devPrefix) {
			t.Fatalf("attach printed %q, want a %sN", out, devPrefix)
		}
		devs[tc.profile] = dev
		if got := readAheadKB(t, dev); got != tc.want {
			t.Errorf("%s volume attached as %s: read_ahead_kb = %s, want %s", tc.profile, dev, got, tc.want)
		}
	}
	blockdCLI(t, sock, "volume", "set", "sequential", "--profile", "random")
	if got := readAheadKB(t, devs["sequential"]); got != "16" {
		t.Errorf("after volume set --profile random on an attached volume: read_ahead_kb = %s, want 16", got)
	}
	for name := range devs {
		blockdCLI(t, sock, "detach", name)
	}
	fmt.Fprintln(os.Stderr, frontend, "read-ahead per profile checked on", devs)
}
