//go:build vmtest

package kerneltest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/probe/podio"
	"github.com/blockd/blockd/vm/guest"
)

// The per-pod probes on a device blockd serves: I/O from two fake pods'
// containers and from a host cgroup goes to /dev/nbdN; blockd's
// /v1/io/pods must charge each pod exactly what it issued.

// Environment of the I/O child (this test binary re-executed).
const (
	ioChildDev    = "BLOCKD_VMTEST_IO_DEV"
	ioChildCgroup = "BLOCKD_VMTEST_IO_CGROUP"
	ioChildBlocks = "BLOCKD_VMTEST_IO_BLOCKS"
	ioChildOffset = "BLOCKD_VMTEST_IO_OFFSET"
)

// init runs the I/O child: join the cgroup first, then issue O_DIRECT 4 KiB
// writes one at a time (no merging), then exit.
func init() {
	dev := os.Getenv(ioChildDev)
	if dev == "" {
		return
	}
	fail := func(err error) { fmt.Fprintln(os.Stderr, "io child:", err); os.Exit(1) }
	if err := os.WriteFile(filepath.Join(os.Getenv(ioChildCgroup), "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		fail(err)
	}
	blocks, _ := strconv.Atoi(os.Getenv(ioChildBlocks))
	off, _ := strconv.ParseInt(os.Getenv(ioChildOffset), 10, 64)
	fd, err := unix.Open(dev, unix.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		fail(err)
	}
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		fail(err)
	}
	for i := range blocks {
		buf[0] = byte(i)
		if _, err := unix.Pwrite(fd, buf, off+int64(i)*4096); err != nil {
			fail(err)
		}
	}
	os.Exit(0)
}

func mountCgroup2(t *testing.T) string {
	t.Helper()
	const root = "/sys/fs/cgroup"
	b, _ := os.ReadFile("/proc/mounts")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[2] == "cgroup2" {
			return f[1]
		}
	}
	os.MkdirAll(root, 0o755)
	if err := unix.Mount("cgroup2", root, "cgroup2", 0, ""); err != nil {
		t.Fatalf("mount cgroup2: %v", err)
	}
	return root
}

func TestBlockdProbesNBD(t *testing.T) {
	guest.RequireVM(t)
	cg := mountCgroup2(t)
	const (
		uidA = "1f0c6a52-7d0e-4a53-9a4e-0b7c1a2d3e01"
		uidB = "2e1d7b63-8e1f-4b64-8b5f-1c8d2b3e4f02"
	)
	// Pod A in kubelet's cgroupfs layout, pod B in its systemd layout.
	ctrA := filepath.Join(cg, "kubepods", "besteffort", "pod"+uidA, "0123456789abcdef0123456789abcdef")
	ctrB := filepath.Join(cg, "kubepods.slice", "kubepods-burstable.slice",
		"kubepods-burstable-pod"+strings.ReplaceAll(uidB, "-", "_")+".slice",
		"cri-containerd-fedcba9876543210fedcba9876543210.scope")
	host := filepath.Join(cg, "system.slice", "backup.service")
	// As on a kubelet node, the io controller is on down to the
	// containers, so bios carry the pod's blkcg: on 6.1 the request is
	// issued by a kworker and only the blkcg names the pod.
	for _, d := range []string{ctrA, ctrB, host} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		var chain []string // root first: a child can enable only what its parent did
		for p := filepath.Dir(d); strings.HasPrefix(p, cg); p = filepath.Dir(p) {
			chain = append([]string{p}, chain...)
		}
		for _, p := range chain {
			if err := os.WriteFile(filepath.Join(p, "cgroup.subtree_control"), []byte("+io"), 0); err != nil {
				t.Fatalf("enable io controller in %s: %v", p, err)
			}
		}
	}

	d := startBlockd(t, t.TempDir(), "--probes", "on", "--probe-devices", "ours")
	defer d.stop()
	if !strings.Contains(d.p.Output(), "per-pod I/O probes on") {
		t.Fatalf("probes did not load in the guest:\n%s", d.p.Output())
	}
	d.must("volume", "create", "pods", "--size", "64MiB")
	dev := strings.TrimSpace(d.must("attach", "pods"))
	defer d.must("detach", "pods")
	time.Sleep(time.Second) // let the kernel's partition scan finish before counting

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	issue := func(cgroup string, blocks int, off int64) {
		t.Helper()
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), ioChildDev+"="+dev, ioChildCgroup+"="+cgroup,
			ioChildBlocks+"="+strconv.Itoa(blocks), ioChildOffset+"="+strconv.FormatInt(off, 10))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("I/O from %s: %v\n%s", cgroup, err, out)
		}
	}
	issue(ctrA, 300, 0)
	issue(ctrB, 500, 8<<20)
	issue(host, 200, 16<<20)

	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", d.sock())
	}}}
	resp, err := hc.Get("http://blockd/v1/io/pods")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var snap podio.Snapshot
	if err := json.NewDecoder(resp.Body).Decode(&snap); err != nil {
		t.Fatal(err)
	}
	byPod := map[string]podio.Entry{}
	for _, e := range snap.Entries {
		t.Logf("entry: pod=%q container=%q cgroup=%s device=%s writes=%d write_bytes=%d", e.PodUID, e.Container, e.Cgroup, e.Device, e.Writes, e.WriteBytes)
		if e.PodUID != "" && e.Device == filepath.Base(dev) {
			byPod[e.PodUID] = e
		}
	}
	for uid, want := range map[string]uint64{uidA: 300, uidB: 500} {
		e, ok := byPod[uid]
		switch {
		case !ok:
			t.Errorf("pod %s: no I/O accounted on %s", uid, dev)
		case e.Writes != want || e.WriteBytes != want*4096:
			// Exact: each pod issued want 4 KiB O_DIRECT writes, one at a
			// time, and the host cgroup's 200 must not leak into it.
			t.Errorf("pod %s: %d writes, %d bytes; issued %d writes, %d bytes", uid, e.Writes, e.WriteBytes, want, want*4096)
		default:
			var hist uint64
			for _, n := range e.Latency {
				hist += n
			}
			if hist != e.Ops() {
				t.Errorf("pod %s: latency histogram holds %d requests, ops %d", uid, hist, e.Ops())
			}
		}
	}
	if byPod[uidA].Container != "0123456789abcdef0123456789abcdef" || !strings.HasPrefix(byPod[uidB].Container, "fedcba98") {
		t.Errorf("container ids: A %q, B %q", byPod[uidA].Container, byPod[uidB].Container)
	}
}
