package ioengine_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/ioengine/enginetest"
	"github.com/blockd/blockd/uring"
)

// seccompChildEnv makes the test binary refuse io_uring_setup with EPERM
// (a seccomp filter on every thread, as container runtimes' default
// profiles do) before it runs its tests.
const seccompChildEnv = "BLOCKD_TEST_SECCOMP_CHILD"

// seccompUnavailable is the child's exit status when it cannot install the
// filter.
const seccompUnavailable = 3

// TestFileSeccompFallback runs TestFileSeccompChild in a child process
// whose io_uring_setup fails as under a container's seccomp profile: the
// file engine must fall back to system calls, say so once in the log,
// count itself, and pass the engine suite.
func TestFileSeccompFallback(t *testing.T) {
	if _, ok := auditArch[runtime.GOARCH]; !ok {
		t.Skipf("no seccomp filter written for %s", runtime.GOARCH)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestFileSeccompChild$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), seccompChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == seccompUnavailable {
		t.Skipf("cannot install a seccomp filter here:\n%s", out)
	}
	if err != nil || !bytes.Contains(out, []byte("--- PASS: TestFileSeccompChild")) {
		t.Fatalf("child under seccomp: %v\n%s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "io_uring unavailable") {
			t.Logf("the child logged: %s", strings.TrimSpace(l))
		}
	}
}

// TestFileSeccompChild is the child's half of TestFileSeccompFallback.
func TestFileSeccompChild(t *testing.T) {
	if os.Getenv(seccompChildEnv) == "" {
		t.Skip("runs in TestFileSeccompFallback's child process")
	}
	if _, err := uring.NewShared(4); !errors.Is(err, unix.EPERM) {
		t.Fatalf("io_uring setup under the seccomp filter: %v, want EPERM", err)
	}
	var log bytes.Buffer
	slog.SetDefault(slog.New(slog.NewTextHandler(&log, nil)))
	before := ioengine.FileIO()
	dir := t.TempDir()
	e, err := ioengine.OpenFileWith(filepath.Join(dir, "vol.img"), 1<<20, ioengine.OpenFileOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if e.URing() {
		t.Fatal("the engine has a ring although io_uring_setup is refused")
	}
	s := ioengine.FileIO()
	if s.Fallbacks != before.Fallbacks+1 || s.Syscalls != before.Syscalls+1 || !strings.Contains(s.LastFallback, "operation not permitted") {
		t.Fatalf("FileIO after a fallback: %+v (before %+v)", s, before)
	}
	p := bytes.Repeat([]byte{3}, 4096)
	if _, err := e.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	e.Close()
	enginetest.Run(t, func(t *testing.T, size int64) ioengine.Engine {
		e, err := ioengine.OpenFileWith(filepath.Join(t.TempDir(), "vol.img"), size, ioengine.OpenFileOptions{Direct: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		return e
	})
	if n := strings.Count(log.String(), "io_uring unavailable"); n != 1 || !strings.Contains(log.String(), "level=WARN") ||
		!strings.Contains(log.String(), "operation not permitted") {
		t.Fatalf("want one WARN line naming the refusal, got %d:\n%s", n, log.String())
	}
	t.Logf("log: %s", strings.TrimSpace(log.String()))
}

// auditArch is AUDIT_ARCH_* of the architectures the filter knows.
var auditArch = map[string]uint32{"amd64": 0xc000003e, "arm64": 0xc00000b7}

// seccompChild installs a filter that fails io_uring_setup with EPERM on
// every thread of the process (SECCOMP_FILTER_FLAG_TSYNC), then runs the
// tests.
func seccompChild(m *testing.M) int {
	arch, ok := auditArch[runtime.GOARCH]
	if !ok {
		fmt.Fprintln(os.Stderr, "seccomp: unknown architecture", runtime.GOARCH)
		return seccompUnavailable
	}
	const (
		retAllow = 0x7fff0000 // SECCOMP_RET_ALLOW
		retErrno = 0x00050000 // SECCOMP_RET_ERRNO
		ldAbsW   = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeqK     = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		retK     = unix.BPF_RET | unix.BPF_K
	)
	// struct seccomp_data: int nr; __u32 arch; ...
	filter := []unix.SockFilter{
		{Code: ldAbsW, K: 4},                // arch
		{Code: jeqK, Jt: 1, Jf: 0, K: arch}, // ours: go on
		{Code: retK, K: retAllow},           // another ABI: leave it alone
		{Code: ldAbsW, K: 0},                // nr
		{Code: jeqK, Jt: 0, Jf: 1, K: unix.SYS_IO_URING_SETUP},
		{Code: retK, K: retErrno | uint32(unix.EPERM)},
		{Code: retK, K: retAllow},
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "seccomp: no_new_privs:", err)
		return seccompUnavailable
	}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC,
		uintptr(unsafe.Pointer(&prog))); errno != 0 {
		fmt.Fprintln(os.Stderr, "seccomp: set filter:", errno)
		return seccompUnavailable
	}
	runtime.KeepAlive(filter)
	return m.Run()
}
