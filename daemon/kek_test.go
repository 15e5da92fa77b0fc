package daemon

import (
	"crypto/rand"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// serve --kek-dir reads a Kubernetes Secret volume as the kubelet lays it
// out (files are symlinks into a hidden timestamped directory through
// ..data); a missing directory holds no KEK; a loose file stops serve.
func TestLoadKEKDir(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := t.TempDir()
	ts := filepath.Join(dir, "..2026_12_06_03_00_00.123")
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	if err := os.WriteFile(filepath.Join(ts, "kek"), key, 0o400); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/kek", filepath.Join(dir, "kek")); err != nil {
		t.Fatal(err)
	}
	keys, err := loadKEKs(nil, dir, log)
	if err != nil {
		t.Fatal(err)
	}
	if ids := keys.IDs(); len(ids) != 1 || keys.Current() == nil || keys.Current().ID() != ids[0] {
		t.Fatalf("a Secret with one KEK gave the KEK ids %v (current %v)", ids, keys.Current())
	}

	keys, err = loadKEKs(nil, filepath.Join(dir, "nope"), log)
	if err != nil || len(keys.IDs()) != 0 {
		t.Fatalf("a missing --kek-dir: %v, KEKs %v; want none and no error", err, keys.IDs())
	}

	if err := os.WriteFile(filepath.Join(dir, "loose"), key, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadKEKs(nil, dir, log); err == nil || !strings.Contains(err.Error(), "--kek-dir") || !strings.Contains(err.Error(), "mode 0644") {
		t.Fatalf("a KEK file others can read in --kek-dir: %v", err)
	}
}
