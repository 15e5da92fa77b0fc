package encryption

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

// writeKEK writes a random KEK file of mode 0600 and returns its path.
func writeKEK(t *testing.T, dir, name string) string {
	t.Helper()
	k := make([]byte, KEKSize)
	rand.Read(k)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, k, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadKEKFile(t *testing.T) {
	dir := t.TempDir()
	raw := writeKEK(t, dir, "raw")
	k1, err := LoadKEKFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(raw)
	hexPath := filepath.Join(dir, "hex")
	os.WriteFile(hexPath, []byte(hex.EncodeToString(b)+"\n"), 0o400)
	k2, err := LoadKEKFile(hexPath)
	if err != nil {
		t.Fatal(err)
	}
	if k1.ID() != k2.ID() || len(k1.ID()) != 16 {
		t.Fatalf("the same key raw and in hex: ids %q and %q", k1.ID(), k2.ID())
	}
	if strings.Contains(hex.EncodeToString(b), k1.ID()) {
		t.Fatal("the KEK id is part of the key")
	}
	for _, tc := range []struct {
		name, want string
		prep       func(p string)
	}{
		{"group-readable", "mode 0640", func(p string) { os.Chmod(p, 0o640) }},
		{"world-readable", "mode 0644", func(p string) { os.Chmod(p, 0o644) }},
		{"short", "raw bytes", func(p string) { os.WriteFile(p, []byte("short"), 0o600) }},
		{"long", "longer than a key", func(p string) { os.WriteFile(p, bytes.Repeat([]byte("a"), 200), 0o600) }},
		{"other owner", "owned by uid", func(p string) {
			if os.Geteuid() != 0 {
				t.Skip("needs root to chown")
			}
			os.Chown(p, 65534, 65534)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeKEK(t, t.TempDir(), "kek")
			tc.prep(p)
			if _, err := LoadKEKFile(p); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one saying %q", err, tc.want)
			}
		})
	}
	if _, err := LoadKEKFile(dir); err == nil {
		t.Fatal("a directory was taken as a KEK file")
	}
}

func TestWrap(t *testing.T) {
	a, _ := NewKEK(bytes.Repeat([]byte{1}, KEKSize))
	b, _ := NewKEK(bytes.Repeat([]byte{2}, KEKSize))
	key := NewDataKey()
	w := a.Wrap("vol", key)
	if bytes.Contains(w, key[:16]) {
		t.Fatal("the wrapped key contains the key")
	}
	got, err := a.Unwrap("vol", w)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("unwrap: %v", err)
	}
	if _, err := b.Unwrap("vol", w); !errors.Is(err, ErrKey) {
		t.Fatalf("another KEK unwrapped it: %v", err)
	}
	if _, err := a.Unwrap("other", w); !errors.Is(err, ErrKey) {
		t.Fatalf("the wrapped key opened for another volume: %v", err)
	}
	w[20] ^= 1
	if _, err := a.Unwrap("vol", w); !errors.Is(err, ErrKey) {
		t.Fatalf("a damaged wrapped key unwrapped: %v", err)
	}
	if KeyCheck(key) == KeyCheck(NewDataKey()) || len(KeyCheck(key)) != 16 {
		t.Fatal("key check values")
	}
}

func TestKeyringFile(t *testing.T) {
	dir := t.TempDir()
	p1, p2 := writeKEK(t, dir, "kek1"), writeKEK(t, dir, "kek2")
	k1, _ := LoadKEKFile(p1)
	ring := NewKeyring(k1)
	e, err := ring.Create("vol", api.Encryption{})
	if err != nil {
		t.Fatal(err)
	}
	if e.Cipher != Cipher || e.KEK != api.KEKFile || e.KEKID != k1.ID() || e.KEKFile != p1 || e.WrappedKey == "" || e.KeyCheck == "" {
		t.Fatalf("metadata %+v", e)
	}
	key, err := ring.Open("vol", &e)
	if err != nil || KeyCheck(key) != e.KeyCheck {
		t.Fatalf("open: %v", err)
	}

	// Another daemon without any KEK reads the file the metadata names.
	other := NewKeyring()
	if got, err := other.Open("vol", &e); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("open through the recorded kek file: %v", err)
	}
	// The file now holds another key: refused, saying so.
	b, _ := os.ReadFile(p2)
	os.WriteFile(p1, b, 0o600)
	if _, err := NewKeyring().Open("vol", &e); !errors.Is(err, ErrKey) || !strings.Contains(err.Error(), "the wrong key") {
		t.Fatalf("open with the wrong KEK in the file: %v", err)
	}
	noFile := e
	noFile.KEKFile = ""
	if _, err := NewKeyring().Open("vol", &noFile); !errors.Is(err, ErrKey) || !strings.Contains(err.Error(), e.KEKID) {
		t.Fatalf("open without the KEK: %v", err)
	}

	// Rekey under kek2: same data key, new KEK, which becomes current.
	ne, commit, err := ring.Rekey("vol", e, p2, "")
	if err != nil {
		t.Fatal(err)
	}
	commit()
	k2, _ := LoadKEKFile(p2)
	if ne.KEKID != k2.ID() || ne.KEKFile != p2 || ne.KeyCheck != e.KeyCheck || ring.Current().ID() != k2.ID() {
		t.Fatalf("after rekey %+v, current %s", ne, ring.Current().ID())
	}
	if got, err := NewKeyring(k2).Open("vol", &ne); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("open after rekey: %v", err)
	}
	if _, _, err := ring.Rekey("vol", ne, "relative/kek", ""); err == nil {
		t.Fatal("a relative kek file path was taken")
	}

	// Destroyed wrapped key.
	ne.WrappedKey = ""
	if _, err := ring.Open("vol", &ne); !errors.Is(err, ErrKey) || !strings.Contains(err.Error(), "destroyed") {
		t.Fatalf("open of a shredded volume: %v", err)
	}
	if _, err := NewKeyring().Create("v2", api.Encryption{}); !errors.Is(err, ErrKey) {
		t.Fatalf("create without any KEK: %v", err)
	}
}

// A secret handed in per volume (a CSI StorageClass node-stage secret):
// never in the metadata; the volume opens again only with the secret.
func TestKeyringSecret(t *testing.T) {
	ring := NewKeyring()
	secret := strings.Repeat("s3cr3t-", 6)
	e, err := ring.Create("vol", api.Encryption{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	if e.KEK != api.KEKSecret || e.Secret != "" || e.Salt == "" {
		t.Fatalf("metadata %+v", e)
	}
	if _, err := ring.Open("vol", &e); err != nil {
		t.Fatal(err)
	}
	restarted := NewKeyring()
	if _, err := restarted.Open("vol", &e); !errors.Is(err, ErrKey) {
		t.Fatalf("opened without the secret: %v", err)
	}
	if err := restarted.Unlock("vol", &e, strings.Repeat("wrong-", 8)); !errors.Is(err, ErrKey) {
		t.Fatalf("unlocked with a wrong secret: %v", err)
	}
	if err := restarted.Unlock("vol", &e, secret); err != nil {
		t.Fatal(err)
	}
	if _, err := restarted.Open("vol", &e); err != nil {
		t.Fatal(err)
	}
	if _, err := ring.Create("short", api.Encryption{Secret: "short"}); !errors.Is(err, ErrKey) {
		t.Fatalf("a short secret was taken: %v", err)
	}
	ne, commit, err := restarted.Rekey("vol", e, "", strings.Repeat("n3w-", 10))
	if err != nil {
		t.Fatal(err)
	}
	commit()
	fresh := NewKeyring()
	if err := fresh.Unlock("vol", &ne, secret); err == nil {
		t.Fatal("the old secret still unlocks after a rekey")
	}
	if err := fresh.Unlock("vol", &ne, strings.Repeat("n3w-", 10)); err != nil {
		t.Fatal(err)
	}
}
