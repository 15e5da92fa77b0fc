//go:build vmtest

package kerneltest

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/blockd/blockd/vm/guest"
)

// TestBlockdEncryptedExt4 puts ext4 on encrypted volumes attached as
// kernel devices, over nbd and over ublk (6.12): files with checksums
// across umount, fsck and mount, detach and attach; the device shows the
// ext4 superblock magic (0xEF53 at byte 1080), the backing file does not.
func TestBlockdEncryptedExt4(t *testing.T) {
	guest.RequireVM(t)
	loadExt4(t)
	key := make([]byte, 32)
	rand.Read(key)
	kek := filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(kek, key, 0o600); err != nil {
		t.Fatal(err)
	}
	d := startBlockd(t, t.TempDir(), "--kek-file", kek, "--nbd-timeout", "10s")
	for _, fe := range []string{"nbd", "ublk"} {
		t.Run(fe, func(t *testing.T) {
			if fe == "ublk" {
				requireUblk(t)
			}
			name := "enc-" + fe
			d.must("volume", "create", name, "--size", "256MiB", "--engine", "file", "--encrypt")
			attach := func() string {
				if fe == "nbd" {
					return d.attach(name, 2)
				}
				return d.attachUblk(name, 2, 64)
			}
			detach := func(dev string) {
				if fe == "nbd" {
					d.detach(name, dev)
				} else {
					d.detachUblk(name, name, dev)
				}
			}
			dev := attach()
			t.Logf("attached encrypted %s as %s", name, dev)
			sums := ext4RoundTrip(t, dev)
			if !ext4Magic(t, dev) {
				t.Fatalf("%s shows no ext4 superblock magic after mkfs", dev)
			}
			detach(dev)
			img := d.get(name).Path
			if ext4Magic(t, img) {
				t.Fatalf("the backing file %s holds the ext4 superblock magic: plaintext on disk", img)
			}
			dev = attach()
			mnt := guest.Mount(t, dev, "ext4")
			guest.VerifyFiles(t, mnt, sums)
			guest.Umount(t, mnt)
			detach(dev)
		})
	}
	d.stop()
}

// ext4Magic reports whether path holds 0xEF53 (little-endian) at byte
// 1080: the magic of an ext4 superblock at 1024.
func ext4Magic(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 2)
	if _, err := f.ReadAt(b, 1080); err != nil {
		t.Fatal(err)
	}
	return b[0] == 0x53 && b[1] == 0xef
}
