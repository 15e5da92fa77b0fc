package cli

import (
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

// The kernel paths of attach run in the VM harness (vm/); these check the
// refusals that happen before the kernel is involved.
func TestAttachRefusals(t *testing.T) {
	sock := startDaemon(t, t.TempDir())
	if _, err := api.NewClient(sock).CreateVolume(api.Spec{Name: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "v"}, "kernel nbd driver unavailable: " + errNoModules.Error()},
		{[]string{"attach", "nope"}, "volume nope not found"},
		{[]string{"attach", "v", "--frontend", "iscsi"}, `frontend "iscsi"`},
		{[]string{"attach", "v", "--frontend", "ublk"}, errNoModules.Error()},
		{[]string{"attach", "v", "--frontend", "ublk", "--queues", "99"}, "want 1-32 queues"},
		{[]string{"detach", "v"}, "not attached"},
		{[]string{"detach", "/dev/nbd7"}, "not a device attached by blockd"},
	} {
		_, errs, code := run(t, sock, tc.args...)
		if code != 1 || !strings.Contains(errs, tc.want) {
			t.Errorf("blockd %v: code %d, stderr %q; want %q", tc.args, code, errs, tc.want)
		}
	}
	vi, err := api.NewClient(sock).GetVolume("v")
	if err != nil || vi.Attachment != nil {
		t.Fatalf("refused attach left state: %+v, %v", vi, err)
	}
}
