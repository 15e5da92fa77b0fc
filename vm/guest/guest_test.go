package guest

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestProcStopAndKill(t *testing.T) {
	// The trap is set before "started" is printed, so a TERM sent after
	// that always finds it.
	p := Start(t, "sh", "-c", "trap 'echo term; exit 3' TERM; echo started; while :; do sleep 0.05; done")
	WaitFor(t, "output", 10*time.Second, func() bool { return strings.Contains(p.Output(), "started") })
	err := p.Stop(10 * time.Second)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("Stop = %v, want exit status 3 from the TERM trap", err)
	}
	if !strings.Contains(p.Output(), "term") || !p.Exited() {
		t.Errorf("output %q exited %v", p.Output(), p.Exited())
	}

	k := Start(t, "sh", "-c", "trap '' TERM; while :; do sleep 0.05; done")
	k.Kill()
	if !k.Exited() {
		t.Fatal("Kill returned before the process was reaped")
	}
	if st, ok := k.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || st.Signal() != syscall.SIGKILL {
		t.Errorf("process state %v, want killed by SIGKILL", k.cmd.ProcessState)
	}
}

func TestRandomFilesRoundTrip(t *testing.T) {
	dir := t.TempDir()
	sums := WriteRandomFiles(t, dir, 4, 1000)
	if len(sums) != 4 {
		t.Fatalf("%d sums", len(sums))
	}
	VerifyFiles(t, dir, sums) // must pass

	// Corrupt one byte: VerifyFiles must notice (run on a fake TB).
	p := filepath.Join(dir, "f002")
	b, _ := os.ReadFile(p)
	b[500] ^= 1
	os.WriteFile(p, b, 0o644)
	ft := &fakeTB{TB: t}
	VerifyFiles(ft, dir, sums)
	if !ft.failed {
		t.Error("VerifyFiles accepted a corrupted file")
	}
}

type fakeTB struct {
	testing.TB
	failed bool
}

func (f *fakeTB) Errorf(string, ...any) { f.failed = true }
func (f *fakeTB) Helper()               {}

func TestExecReportsFailure(t *testing.T) {
	if _, err := Exec("sh", "-c", "echo boom; exit 4"); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("Exec error %v does not carry output", err)
	}
	if out := Run(t, "echo", "hi"); out != "hi\n" {
		t.Errorf("Run output %q", out)
	}
}
