package daemon

import (
	"context"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

// What a CSI driver does for a StorageClass with encryption: it creates
// the volume with the node-stage secret, and after a daemon restart hands
// the secret in again with the attach (here the attach itself fails:
// kernel devices are off in tests, but the volume is unlocked first).
// The API never shows the wrapped key, salt or secret.
func TestSecretThroughAttach(t *testing.T) {
	dir := t.TempDir()
	secret := strings.Repeat("node-stage-secret/", 3)
	d, c := startTestDaemon(t, Config{StateDir: dir})
	vi, err := c.CreateVolume(api.Spec{Name: "csi", Size: 4 << 20, Engine: "memory",
		Encryption: &api.Encryption{KEK: api.KEKSecret, Secret: secret}})
	if err != nil {
		t.Fatal(err)
	}
	if vi.Encryption == nil || vi.Encryption.KEK != api.KEKSecret || vi.Encryption.WrappedKey != "" || vi.Encryption.Salt != "" || vi.Encryption.Secret != "" {
		t.Fatalf("the API shows %+v", vi.Encryption)
	}
	d.Shutdown(context.Background())

	_, c = startTestDaemon(t, Config{StateDir: dir})
	if vi, err = c.GetVolume("csi"); err != nil || vi.State != api.StateFailed || !strings.Contains(vi.Reason, "secret") {
		t.Fatalf("after a restart, before the secret: %+v, %v", vi, err)
	}
	if _, err := c.Attach("csi", api.AttachRequest{Secret: strings.Repeat("x", 40)}); !api.IsCode(err, api.CodeInvalid) {
		t.Fatalf("attach with the wrong secret: %v", err)
	}
	c.Attach("csi", api.AttachRequest{Secret: secret})
	if vi, err = c.GetVolume("csi"); err != nil || vi.State != api.StateOK {
		t.Fatalf("after an attach with the secret: %+v, %v", vi, err)
	}
}

// A KEK file readable by others stops the daemon before anything opens.
func TestLooseKEKFileRefused(t *testing.T) {
	_, err := Start(Config{StateDir: t.TempDir(), Logger: quietLog(), KEKFiles: []string{"/etc/hostname"}})
	if err == nil || !strings.Contains(err.Error(), "kek-file") {
		t.Fatalf("Start with a world-readable KEK file: %v", err)
	}
}
