package probe

import (
	"errors"
	"os"
	"os/exec"
	"testing"
)

// TestUnavailableWithoutPrivilege re-runs this test binary with every
// capability dropped (setpriv clears the bounding set, so even uid 0 has
// none) and checks that New fails with ErrUnavailable instead of
// panicking or returning an untyped error.
func TestUnavailableWithoutPrivilege(t *testing.T) {
	if os.Getenv("BLOCKD_PROBE_UNPRIV") == "1" {
		p, err := New(Options{})
		if err == nil {
			p.Close()
			t.Fatal("New succeeded without capabilities")
		}
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("New: %v does not wrap ErrUnavailable", err)
		}
		t.Logf("New without capabilities: %v", err)
		return
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	cmd := exec.Command(setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
		os.Args[0], "-test.run=^TestUnavailableWithoutPrivilege$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "BLOCKD_PROBE_UNPRIV=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("unprivileged run: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}
