//go:build vmtest

package kerneltest

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/cluster/etcdtest"
	"github.com/blockd/blockd/transport"
	"github.com/blockd/blockd/vm/guest"
)

// A cluster in the guest: etcd and two blockd nodes on loopback (the
// guest has no other network), each daemon with its own state dir, node
// certificate and replication port, as two machines would have.

// etcdBin is Debian's etcd-server, put in the guest by vmrun's -tools.
const etcdBin = "/usr/bin/etcd"

// startEtcd runs a one-member etcd on loopback with its data in a temp
// dir and returns its client URL once it answers.
func startEtcd(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(etcdBin); err != nil {
		t.Fatalf("%s not in the guest (install etcd-server on the host: make deps): %v", etcdBin, err)
	}
	const url = "http://127.0.0.1:2379"
	p := guest.Start(t, etcdBin, etcdtest.Args("vm", t.TempDir(), url, "http://127.0.0.1:2380")...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("etcd's log:\n%s", p.Output())
		}
	})
	if err := etcdtest.WaitReady(url, time.Minute); err != nil {
		t.Fatalf("etcd did not answer: %v\n%s", err, p.Output())
	}
	return url
}

// clusterCerts writes a cluster CA (ca.crt) and a certificate and key per
// node (NAME.crt, NAME.key) into a temp dir and returns it.
func clusterCerts(t *testing.T, nodes ...string) string {
	t.Helper()
	dir := t.TempDir()
	ca, err := transport.GenerateCA("blockd-vm-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _, err := ca.PEM()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"ca.crt": caPEM}
	for _, n := range nodes {
		cert, err := ca.Issue(n, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if files[n+".crt"], files[n+".key"], err = transport.CertPEM(cert); err != nil {
			t.Fatal(err)
		}
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// clusterNodeFlags are the serve flags of node name, replicating on
// replAddr, in the cluster at etcdURL with a lease of leaseTTL.
func clusterNodeFlags(certs, etcdURL, name, replAddr, zone string, leaseTTL time.Duration) []string {
	return []string{"--node", name, "--repl-listen", replAddr,
		"--tls-ca", filepath.Join(certs, "ca.crt"),
		"--tls-cert", filepath.Join(certs, name+".crt"), "--tls-key", filepath.Join(certs, name+".key"),
		"--cluster", "etcd=" + etcdURL, "--lease-ttl", leaseTTL.String(), "--label", "zone=" + zone}
}

// TestBlockdClusterFailoverExt4 is issue 19's failover of a
// kernel-attached volume: ext4 on a volume with a copy on node a and on
// node b, attached on a (/dev/nbdN; a owns it) and filled with files; a's
// daemon dies (kill -9) with the filesystem mounted; b's attach is
// refused while a's lease lives, then b takes the volume over, and its
// device holds the filesystem: the journal replays at mount, e2fsck finds
// it clean, every file reads back as written.
func TestBlockdClusterFailoverExt4(t *testing.T) {
	nl := loadNBD(t)
	loadExt4(t)
	const leaseTTL = 5 * time.Second
	etcdURL := startEtcd(t)
	certs := clusterCerts(t, "a", "b")
	// Every write goes to both copies over QUIC, which costs CPU that TCG
	// makes scarce: a replica's answer or a kernel request may take
	// seconds here. The timeouts fit that; a replica dropped from the
	// in-sync set could not take over.
	common := []string{"--probes", "off", "--nbd-timeout", "30s", "--repl-timeout", "15s"}
	a := startBlockd(t, t.TempDir(), append(clusterNodeFlags(certs, etcdURL, "a", "127.0.0.1:10811", "za", leaseTTL), common...)...)
	b := startBlockd(t, t.TempDir(), append(clusterNodeFlags(certs, etcdURL, "b", "127.0.0.1:10812", "zb", leaseTTL), common...)...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("a's log:\n%s\nb's log:\n%s", a.p.Output(), b.p.Output())
		}
	})

	a.must("volume", "create", "v", "--size", "64MiB", "--repl", "2", "--engine", "file")
	devA := a.attach("v", 1)
	before := a.get("v").Placement
	if before == nil || before.Owner != "a" || before.Epoch == 0 || !slices.Equal(before.Nodes, []string{"a", "b"}) {
		t.Fatalf("placement after the attach on a: %+v, want copies on a and b, owned by a", before)
	}
	t0 := time.Now()
	guest.Run(t, mke2fs, "-t", "ext4", "-F", "-q", devA)
	mkfs := time.Since(t0)
	mntA := guest.Mount(t, devA, "ext4")
	sums := guest.WriteRandomFiles(t, mntA, 32, 64<<10)
	// sync(2) returns once the data, the journal and a device flush are
	// written, i.e. acknowledged by every in-sync copy.
	syscall.Sync()
	t.Logf("on a's %s: mkfs.ext4 %v, 32 files of 64 KiB written and synced %v", devA, mkfs.Round(time.Millisecond), (time.Since(t0) - mkfs).Round(time.Millisecond))
	if p := a.get("v").Placement; p == nil || !slices.Equal(p.InSync, []string{"a", "b"}) {
		t.Fatalf("placement before the kill: %+v, want a and b in sync (else b may not take the volume over)", p)
	}

	// Node a dies; its filesystem stays mounted on its device, whose
	// sockets are dead, as on a machine that crashed.
	a.kill()
	killed := time.Now()
	var out string
	refusals := 0
	for {
		var err error
		if out, err = b.cli("attach", "v", "--connections", "1"); err == nil {
			break
		}
		if !strings.Contains(out, "volume v is owned by node a") {
			t.Fatalf("attach on b %v after a's kill: %v, want a refusal naming owner a until a's lease expires\nb's log:\n%s",
				time.Since(killed).Round(time.Millisecond), err, b.p.Output())
		}
		refusals++
		if time.Since(killed) > 6*leaseTTL {
			t.Fatalf("attach on b still refused %v after a's kill (lease %v): %s\nb's log:\n%s", time.Since(killed).Round(time.Millisecond), leaseTTL, strings.TrimSpace(out), b.p.Output())
		}
		time.Sleep(250 * time.Millisecond)
	}
	takeover := time.Since(killed)
	devB := b.attached("v", out, 1)
	t.Logf("b took v over %v after a's kill -9 (lease TTL %v, %d refusals before): %s", takeover.Round(time.Millisecond), leaseTTL, refusals, devB)
	if refusals == 0 {
		t.Errorf("b's first attach after a's kill succeeded: a's lease of %v should still have held the volume", leaseTTL)
	}

	// What a node does after a crash: mount (ext4 replays its journal),
	// umount, then a forced check must find nothing to fix.
	if !ext4NeedsRecovery(t, devB) {
		t.Errorf("ext4 on b's %s is not marked for journal recovery: it was mounted on a when a died", devB)
	}
	mntB := guest.Mount(t, devB, "ext4")
	guest.Umount(t, mntB)
	guest.Run(t, e2fsck, "-f", "-n", devB)
	if err := syscall.Mount(devB, mntB, "ext4", syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount %s read-only: %v", devB, err)
	}
	guest.VerifyFiles(t, mntB, sums)
	guest.Umount(t, mntB)

	p := b.get("v").Placement
	switch {
	case p == nil:
		t.Error("volume get v on b shows no placement")
	case p.Owner != "b" || p.Epoch <= before.Epoch:
		t.Errorf("placement after the takeover: owner %q epoch %d, want b at an epoch after a's %d", p.Owner, p.Epoch, before.Epoch)
	case p.LastFailover == nil:
		t.Error("placement after the takeover shows no last_failover")
	default:
		f := p.LastFailover
		if f.From != "a" || f.To != "b" || f.Epoch != p.Epoch || f.Clean || f.By != "attach" {
			t.Errorf("last_failover = %+v, want from a to b at epoch %d, not clean, by attach", *f, p.Epoch)
		}
		t.Logf("last_failover: from %s to %s, epoch %d (a's was %d), clean %v, waited %s, by %s", f.From, f.To, f.Epoch, before.Epoch, f.Clean, f.Waited, f.By)
	}

	b.detach("v", devB)
	b.stop()
	// The dead node's device: a reboot would clear it; here a disconnect
	// fails what waits on it (EIO), so its filesystem can go.
	if err := nl.Disconnect(nbdIndex(t, devA)); err != nil {
		t.Errorf("disconnect a's %s: %v", devA, err)
	}
	if err := syscall.Unmount(mntA, syscall.MNT_DETACH); err != nil {
		t.Logf("umount -l of a's %s: %v", mntA, err)
	}
}

// ext4NeedsRecovery reports whether the ext4 superblock on dev has the
// journal's "needs recovery" feature (INCOMPAT_RECOVER, 0x4 at 0x60 in the
// superblock, which starts at byte 1024): the filesystem was mounted and
// never cleanly unmounted.
func ext4NeedsRecovery(t *testing.T, dev string) bool {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4)
	if _, err := f.ReadAt(b, 1024+0x60); err != nil {
		t.Fatalf("read %s superblock: %v", dev, err)
	}
	return binary.LittleEndian.Uint32(b)&0x4 != 0
}
