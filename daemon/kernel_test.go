package daemon

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

// Without kernel devices the daemon loads no module, leaves attachments
// recorded by an earlier daemon as they are (no recovery), and refuses
// attach and detach with a message that names the flag.
func TestKernelDevicesOff(t *testing.T) {
	dir := t.TempDir()
	d, c := startTestDaemon(t, Config{StateDir: dir})
	if _, err := c.CreateVolume(api.Spec{Name: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Attach("v", api.AttachRequest{}); !api.IsCode(err, api.CodeUnavailable) || !strings.Contains(err.Error(), "--kernel-devices=false") {
		t.Fatalf("attach without kernel devices: %v", err)
	}
	if err := d.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}

	// A device recorded by a daemon that had kernel devices.
	meta := filepath.Join(dir, "volumes", "v.json")
	b, err := os.ReadFile(meta)
	if err != nil {
		t.Fatal(err)
	}
	var s api.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	rec := api.Attachment{Frontend: api.FrontendNBD, Device: "/dev/nbd9", Index: 9, Connections: 1, Backend: "blockd:0123456789abcdef:v"}
	s.Attachment = &rec
	if b, err = json.Marshal(s); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(meta, b, 0o600); err != nil {
		t.Fatal(err)
	}

	_, c = startTestDaemon(t, Config{StateDir: dir})
	vi, err := c.GetVolume("v")
	if err != nil || vi.Attachment == nil || *vi.Attachment != rec || vi.Reason != "" {
		t.Fatalf("recorded attachment after a start without kernel devices: %+v (reason %q), %v; want it untouched", vi.Attachment, vi.Reason, err)
	}
	if _, err := c.Detach("v"); !api.IsCode(err, api.CodeUnavailable) || !strings.Contains(err.Error(), "--kernel-devices=false") {
		t.Fatalf("detach without kernel devices: %v", err)
	}
}
