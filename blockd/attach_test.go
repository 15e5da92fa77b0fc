package blockd

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// The kernel paths of attach run in the VM harness (vm/); these check the
// refusals that happen before the kernel is involved.
func TestAttachRefusals(t *testing.T) {
	dir := t.TempDir()
	loadErr := errors.New("load module nbd: not found in /lib/modules/6.99-test")
	d, err := Start(Config{
		StateDir: dir, NBDListen: "127.0.0.1:0", Logger: quietLog(),
		Kernel: KernelOptions{LoadModule: func(string) error { return loadErr }},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(context.Background())
	sock := filepath.Join(dir, "blockd.sock")
	if _, err := NewClient(sock).CreateVolume(CreateRequest{Name: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "v"}, "kernel nbd driver unavailable: load module nbd: not found in /lib/modules/6.99-test"},
		{[]string{"attach", "nope"}, `volume "nope": not found`},
		{[]string{"attach", "v", "--frontend", "iscsi"}, `frontend "iscsi"`},
		{[]string{"attach", "v", "--frontend", "ublk"}, "not found in /lib/modules/6.99-test"},
		{[]string{"attach", "v", "--frontend", "ublk", "--queues", "99"}, "want 1-32 queues"},
		{[]string{"detach", "v"}, "not attached"},
		{[]string{"detach", "/dev/nbd7"}, "not a device attached by blockd"},
	} {
		_, errs, code := run(t, sock, tc.args...)
		if code != 1 || !strings.Contains(errs, tc.want) {
			t.Errorf("blockd %v: code %d, stderr %q; want %q", tc.args, code, errs, tc.want)
		}
	}
	vi, err := NewClient(sock).GetVolume("v")
	if err != nil || vi.Attachment != nil {
		t.Fatalf("refused attach left state: %+v, %v", vi, err)
	}
}

func TestDefaultKernelConns(t *testing.T) {
	for _, tc := range []struct {
		release string
		cpus    int
		want    int
	}{
		{"6.1.0-56-amd64", 4, 1},
		{"5.10.0-30-amd64", 4, 1},
		{"6.11.2", 4, 1},
		{"6.12.117+deb12-amd64", 4, 4},
		{"6.12.0", 32, maxKernelConns},
		{"7.0.1", 2, 2},
		{"6.13", 1, 1},
		{"", 4, 1},
		{"garbage", 4, 1},
	} {
		if got := defaultKernelConns(tc.release, tc.cpus); got != tc.want {
			t.Errorf("defaultKernelConns(%q, %d) = %d, want %d", tc.release, tc.cpus, got, tc.want)
		}
	}
}
