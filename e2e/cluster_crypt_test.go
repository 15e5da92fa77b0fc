package e2e

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// An encrypted cluster volume (repl 2, every node with the same KEK
// file): the cluster keeps one wrapped data key for both copies, neither
// backing file holds the plaintext written through NBD (the replica gets
// ciphertext), no API view shows the wrapped key, and after a kill -9 of
// the owner the other node takes the volume over and reads the data back
// with its own copy of the KEK.
func TestClusterEncrypted(t *testing.T) {
	kek := kekFile(t)
	c := newEtcdCluster(t, 2, append(clusterFlags, "--kek-file", kek)...)
	a, b := c.nodes[0], c.nodes[1]
	c.startAll()
	if _, err := b.api().CreateVolume(api.Spec{Name: "v", Size: replVolSize, Repl: 2, Profile: "none", Encryption: &api.Encryption{}}); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.nodes {
		vi := n.volume("v")
		if e := vi.Encryption; e == nil || e.KEKID == "" || e.WrappedKey != "" || e.Salt != "" {
			t.Fatalf("%s shows the volume's encryption as %+v: want a cipher and KEK id, no key material", n.name, e)
		}
	}
	const pat = 0x5a
	data := bytes.Repeat([]byte{pat}, 1<<20)
	ca, err := a.dial(context.Background(), "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.WriteAt(data, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := ca.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := ca.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back at the owner: %v (equal %v)", err, bytes.Equal(got, data))
	}
	for _, n := range c.nodes {
		noPlaintext(t, filepath.Join(n.dir, "data", "v.img"), pat)
	}
	a.kill9()
	cb, took := takeOver(t, b, "v", 6*leaseTTL)
	t.Logf("%s took the encrypted volume over after %s", b.name, took.Round(time.Millisecond))
	clear(got)
	if _, err := cb.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back at %s after the take-over: %v (equal %v)", b.name, err, bytes.Equal(got, data))
	}
	noPlaintext(t, filepath.Join(b.dir, "data", "v.img"), pat)
}
