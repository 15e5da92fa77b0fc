package volume

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/encryption"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/replication/repltest"
)

// newKEKFile writes a random KEK file (mode 0600) and loads it.
func newKEKFile(t *testing.T) (string, *encryption.KEK) {
	t.Helper()
	k := make([]byte, encryption.KEKSize)
	rand.Read(k)
	p := filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(p, k, 0o600); err != nil {
		t.Fatal(err)
	}
	kek, err := encryption.LoadKEKFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return p, kek
}

func openKeyed(t *testing.T, dir string, keys *encryption.Keyring) *Registry {
	t.Helper()
	m, err := Open(Options{Dir: dir, Log: quietLog(), Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

var plain = bytes.Repeat([]byte("KNOWN-PLAINTEXT-"), 4096) // 64 KiB

// An encrypted file volume: its backing file holds no plaintext, its
// data survives a restart with the KEK, and with the wrong KEK the
// volume is failed with the reason and nothing is written.
func TestEncryptedVolume(t *testing.T) {
	dir := t.TempDir()
	kekPath, kek := newKEKFile(t)
	m := openKeyed(t, dir, encryption.NewKeyring(kek))
	s, err := m.Create(api.Spec{Name: "e", Size: 8 << 20, Encryption: &api.Encryption{}})
	if err != nil {
		t.Fatal(err)
	}
	e := s.Encryption
	if e == nil || e.Cipher != api.CipherAES256XTS || e.KEKID != kek.ID() || e.WrappedKey == "" || e.KeyCheck == "" {
		t.Fatalf("encryption metadata %+v", e)
	}
	writeVolume(t, m, "e", plain)
	v, _ := m.Get("e")
	odd := []byte("unaligned bytes")
	if err := rw(t, v, pipeline.OpWrite, 70000, odd); err != nil {
		t.Fatal(err)
	}
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(m.DataPath("e"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(img, []byte("KNOWN-PLAINTEXT")) || bytes.Contains(img, odd) {
		t.Fatal("plaintext in the backing file")
	}
	if !bytes.Equal(readVolume(t, m, "e", len(plain)), plain) {
		t.Fatal("read back differs")
	}
	// The map still sees holes where nothing was written.
	ext, err := v.Map(make([]pipeline.Extent, 0, 8), 1<<20, 1<<20)
	if err != nil || len(ext) != 1 || !ext[0].Hole {
		t.Fatalf("a never-written MiB maps as %+v, %v", ext, err)
	}
	meta := filepath.Join(dir, "volumes", "e.json")
	mb, _ := os.ReadFile(meta)
	if !bytes.Contains(mb, []byte(e.WrappedKey)) || !bytes.Contains(mb, []byte(kek.ID())) {
		t.Fatal("the metadata does not keep the wrapped key and the KEK id")
	}
	m.Close()

	m = openKeyed(t, dir, encryption.NewKeyring(kek))
	if !bytes.Equal(readVolume(t, m, "e", len(plain)), plain) {
		t.Fatal("read back after a restart differs")
	}
	got := make([]byte, len(odd))
	v, _ = m.Get("e")
	if err := rw(t, v, pipeline.OpRead, 70000, got); err != nil || !bytes.Equal(got, odd) {
		t.Fatalf("unaligned write after a restart: %q, %v", got, err)
	}
	m.Close()

	// The wrong KEK in the KEK file the metadata names, and a daemon
	// with another KEK of its own.
	imgSum, metaSum := fileSum(t, m.DataPath("e")), fileSum(t, meta)
	_, other := newKEKFile(t)
	wrong := make([]byte, encryption.KEKSize)
	rand.Read(wrong)
	os.WriteFile(kekPath, wrong, 0o600)
	m = openKeyed(t, dir, encryption.NewKeyring(other))
	wantFailed(t, m, "e", "the wrong key")
	m.Close()
	os.Remove(kekPath)
	m = openKeyed(t, dir, encryption.NewKeyring(other))
	wantFailed(t, m, "e", kek.ID())
	if fileSum(t, m.DataPath("e")) != imgSum || fileSum(t, meta) != metaSum {
		t.Fatal("opening with the wrong KEK changed the backing file or the metadata")
	}
	// A failed encrypted volume can still be deleted.
	if err := m.Delete("e"); err != nil {
		t.Fatal(err)
	}
}

// Delete destroys the wrapped key in place before anything else: a
// crash right after leaves metadata that cannot open the data, as a
// failed volume that delete removes.
func TestCryptoShredding(t *testing.T) {
	dir := t.TempDir()
	_, kek := newKEKFile(t)
	m := openKeyed(t, dir, encryption.NewKeyring(kek))
	s, err := m.Create(api.Spec{Name: "e", Size: 4 << 20, Encryption: &api.Encryption{}})
	if err != nil {
		t.Fatal(err)
	}
	writeVolume(t, m, "e", plain)
	meta := filepath.Join(dir, "volumes", "e.json")
	before, _ := os.Stat(meta)
	v, _ := m.Get("e")
	if err := m.shredKey(v); err != nil { // what Delete does first
		t.Fatal(err)
	}
	after, _ := os.Stat(meta)
	mb, _ := os.ReadFile(meta)
	if bytes.Contains(mb, []byte(s.Encryption.WrappedKey)) || bytes.Contains(mb, []byte(s.Encryption.KeyCheck)) {
		t.Fatal("the wrapped key survived the shredding")
	}
	if after.Size() != before.Size() || !os.SameFile(before, after) {
		t.Fatal("the metadata was not overwritten in place")
	}
	m.Close() // the "crash"
	m = openKeyed(t, dir, encryption.NewKeyring(kek))
	wantFailed(t, m, "e", "destroyed")
	if err := m.Delete("e"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(meta); !os.IsNotExist(err) {
		t.Fatal("metadata left after delete")
	}
}

// A volume whose KEK is derived from a secret handed in (a CSI
// node-stage secret): never stored; after a restart the volume waits,
// failed, until an unlock brings the secret.
func TestEncryptedWithSecret(t *testing.T) {
	dir := t.TempDir()
	secret := "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA=="
	m := openKeyed(t, dir, nil)
	if _, err := m.Create(api.Spec{Name: "s", Size: 4 << 20, Encryption: &api.Encryption{Secret: secret}}); err != nil {
		t.Fatal(err)
	}
	writeVolume(t, m, "s", plain)
	mb, _ := os.ReadFile(filepath.Join(dir, "volumes", "s.json"))
	if bytes.Contains(mb, []byte(secret)) || !bytes.Contains(mb, []byte(`"kek": "secret"`)) {
		t.Fatalf("metadata: %s", mb)
	}
	if _, err := m.Create(api.Spec{Name: "x", Size: 4 << 20, Encryption: &api.Encryption{}}); !api.IsCode(err, api.CodeInvalid) {
		t.Fatalf("create under the node KEK of a daemon without one: %v", err)
	}
	m.Close()
	m = openKeyed(t, dir, nil)
	wantFailed(t, m, "s", "secret")
	if _, err := m.Unlock("s", strings.Repeat("not it ", 6)); !api.IsCode(err, api.CodeInvalid) {
		t.Fatalf("unlock with a wrong secret: %v", err)
	}
	if _, err := m.Unlock("s", secret); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readVolume(t, m, "s", len(plain)), plain) {
		t.Fatal("read back after unlock differs")
	}
}

// Rekey rewraps the data key under a new KEK file without touching the
// data: the old KEK no longer opens the volume, the new one does, and
// the new KEK is the daemon's for new volumes.
func TestRekey(t *testing.T) {
	dir := t.TempDir()
	_, kek1 := newKEKFile(t)
	p2, kek2 := newKEKFile(t)
	keys := encryption.NewKeyring(kek1)
	m := openKeyed(t, dir, keys)
	if _, err := m.Create(api.Spec{Name: "e", Size: 4 << 20, Encryption: &api.Encryption{}}); err != nil {
		t.Fatal(err)
	}
	writeVolume(t, m, "e", plain)
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	img := fileSum(t, m.DataPath("e"))
	s, err := m.Rekey("e", p2, "")
	if err != nil {
		t.Fatal(err)
	}
	if s.Encryption.KEKID != kek2.ID() || keys.Current().ID() != kek2.ID() {
		t.Fatalf("after rekey: %+v, current KEK %s", s.Encryption, keys.Current().ID())
	}
	if fileSum(t, m.DataPath("e")) != img {
		t.Fatal("rekey rewrote data")
	}
	if !bytes.Equal(readVolume(t, m, "e", len(plain)), plain) {
		t.Fatal("read after rekey differs")
	}
	if _, err := m.Rekey("e", "kek", ""); !api.IsCode(err, api.CodeInvalid) {
		t.Fatalf("rekey with a relative path: %v", err)
	}
	m.Close()
	os.Rename(p2, p2+".moved") // only the daemon's old KEK is left
	m = openKeyed(t, dir, encryption.NewKeyring(kek1))
	wantFailed(t, m, "e", kek2.ID())
	m.Close()
	m = openKeyed(t, dir, encryption.NewKeyring(kek2))
	if !bytes.Equal(readVolume(t, m, "e", len(plain)), plain) {
		t.Fatal("read with the new KEK differs")
	}
}

// A replicated encrypted volume: the replica holds ciphertext only and
// the encryption metadata, and once promoted on a node with the KEK it
// serves the plaintext.
func TestEncryptedReplica(t *testing.T) {
	_, kek := newKEKFile(t)
	net := repltest.NewNet()
	ns := startNodesWith(t, net, Options{Keys: encryption.NewKeyring(kek)}, "a", "b")
	a, b := ns["a"], ns["b"]
	s, err := a.reg.Create(api.Spec{Name: "v", Size: 4 << 20, Engine: "memory", Repl: 2, Encryption: &api.Encryption{}})
	if err != nil {
		t.Fatal(err)
	}
	va, _ := a.reg.Get("v")
	if err := rw(t, va, pipeline.OpWrite, 0, plain); err != nil {
		t.Fatal(err)
	}
	rv, err := b.reg.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	re := rv.Spec().Encryption
	if re == nil || re.WrappedKey != s.Encryption.WrappedKey || re.KEKID != kek.ID() {
		t.Fatalf("the replica's encryption metadata: %+v", re)
	}
	if got := readCopy(t, rv, 0, 4<<20); bytes.Contains(got, []byte("KNOWN-PLAINTEXT")) {
		t.Fatal("plaintext in the replica")
	} else if !bytes.Equal(got[:len(plain)], readCopy(t, va, 0, len(plain))) {
		t.Fatal("the replica does not hold the owner's ciphertext")
	}
	net.SetDown("a", true)
	if _, err := b.reg.Promote("v", false); err != nil {
		t.Fatal(err)
	}
	vb, err := b.reg.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(plain))
	if err := rw(t, vb, pipeline.OpRead, 0, got); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("the promoted replica reads back: %v, equal %v", err, bytes.Equal(got, plain))
	}
	if _, err := b.reg.Rekey("v", "", ""); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("rekey of a replicated volume: %v", err)
	}
}

// An encrypted memory volume runs aligned reads and writes of up to
// the stage's limit on the NBD reader (never a file volume's, an
// unaligned one or a larger one), lends no engine memory to a payload
// (it would hold plaintext), and its engine memory, which the stage
// encrypts into, holds only ciphertext.
func TestEncryptedMemoryFastPaths(t *testing.T) {
	_, kek := newKEKFile(t)
	m := openKeyed(t, t.TempDir(), encryption.NewKeyring(kek))
	defer m.Close()
	for _, s := range []api.Spec{{Name: "mem", Size: 8 << 20, Engine: "memory", Encryption: &api.Encryption{}},
		{Name: "file", Size: 8 << 20, Engine: "file", Encryption: &api.Encryption{}}} {
		if _, err := m.Create(s); err != nil {
			t.Fatal(err)
		}
	}
	mem, _ := m.Get("mem")
	file, _ := m.Get("file")
	for _, tc := range []struct {
		v    *Volume
		r    pipeline.Request
		want bool
	}{
		{mem, pipeline.Request{Op: pipeline.OpRead, Offset: 4096, Length: 4096}, true},
		{mem, pipeline.Request{Op: pipeline.OpWrite, Offset: 4096, Length: 4096}, true},
		{mem, pipeline.Request{Op: pipeline.OpWrite, Offset: 512, Length: 4096}, false},
		{mem, pipeline.Request{Op: pipeline.OpWrite, Offset: 0, Length: 4 << 20}, false},
		{file, pipeline.Request{Op: pipeline.OpRead, Offset: 4096, Length: 4096}, false},
	} {
		if got := tc.v.Inline(&tc.r); got != tc.want {
			t.Errorf("%s: Inline(%v of %d at %d) = %v, want %v", tc.v.Name(), tc.r.Op, tc.r.Length, tc.r.Offset, got, tc.want)
		}
	}
	if b := mem.LendWrite(&pipeline.Request{Op: pipeline.OpWrite, Offset: 4096, Length: 4096}); b != nil {
		t.Fatal("an encrypted memory volume lent its engine's memory to a payload")
	}
	w := pipeline.Request{Op: pipeline.OpWrite, Offset: 1 << 20, Length: uint32(len(plain)), Buf: bytes.Clone(plain)}
	if err := mem.Handle(t.Context(), &w); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(w.Buf, plain) {
		t.Fatal("the write's buffer was changed")
	}
	raw := make([]byte, 8<<20)
	if _, err := mem.engine.ReadAt(raw, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte("KNOWN-PLAINTEXT-")) {
		t.Fatal("plaintext in the engine's memory")
	}
	r := pipeline.Request{Op: pipeline.OpRead, Flags: pipeline.FlagRef, Offset: 1 << 20, Length: uint32(len(plain)),
		Buf: make([]byte, len(plain)), Ref: make([][]byte, 0, 4)}
	if err := mem.Handle(t.Context(), &r); err != nil || len(r.Ref) != 0 || !bytes.Equal(r.Buf, plain) {
		t.Fatalf("read back: %v, %d refs, equal %v", err, len(r.Ref), bytes.Equal(r.Buf, plain))
	}
}
