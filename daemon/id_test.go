package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/attach"
)

func TestDaemonIDCreatedOnce(t *testing.T) {
	dir := t.TempDir()
	// A temp file an interrupted write left behind.
	stale := filepath.Join(dir, ".daemon-id.tmp-123")
	if err := os.WriteFile(stale, []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	id, err := daemonID(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !validID(id) {
		t.Fatalf("daemonID made %q, want 16 hex digits", id)
	}
	b, err := os.ReadFile(filepath.Join(dir, "daemon-id"))
	if err != nil || strings.TrimSpace(string(b)) != id {
		t.Fatalf("daemon-id holds %q (%v), want %q", b, err, id)
	}
	if st, err := os.Stat(filepath.Join(dir, "daemon-id")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("daemon-id mode: %v %v, want 0600", st.Mode(), err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale temp file still there: %v", err)
	}
	for range 3 {
		again, err := daemonID(dir)
		if err != nil || again != id {
			t.Fatalf("second daemonID = %q, %v; want the stored %q", again, err, id)
		}
	}
	if other, err := daemonID(t.TempDir()); err != nil || other == id {
		t.Errorf("another state dir got id %q (%v), want its own", other, err)
	}
}

func TestDaemonIDCorrupt(t *testing.T) {
	for _, content := range []string{"", "xyz\n", "blockd:0123456789abcdef\n", "0123456789ABCDEF"} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "daemon-id"), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := daemonID(dir)
		if err == nil || !strings.Contains(err.Error(), "daemon-id") || !strings.Contains(err.Error(), "remove it") {
			t.Errorf("daemon-id %q: err = %v, want a refusal naming the file and the way out", content, err)
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "daemon-id")); string(b) != content {
			t.Errorf("daemon-id %q rewritten to %q; the operator decides", content, b)
		}
	}
}

// A daemon keeps its id across restarts and passes it to its kernel
// attachments.
func TestDaemonIDAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	d, err := Start(Config{StateDir: dir, Logger: quietLog(), Kernel: attach.Options{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	id := d.cfg.Kernel.DaemonID
	if err := d.Shutdown(t.Context()); err != nil {
		t.Fatal(err)
	}
	if !validID(id) {
		t.Fatalf("daemon started with kernel id %q", id)
	}
	d2, _ := startTestDaemon(t, Config{StateDir: dir})
	if d2.cfg.Kernel.DaemonID != id {
		t.Fatalf("restarted daemon has id %q, want %q", d2.cfg.Kernel.DaemonID, id)
	}
}
