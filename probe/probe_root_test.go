package probe

import (
	"github.com/blockd/blockd/internal/leakcheck"
	"github.com/blockd/blockd/probe/podio"

	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The tests in this file load real BPF programs and drive real I/O through
// loop devices from processes placed in a kubelet-like cgroup v2 tree, so
// they need root; everything they create is removed by t.Cleanup, also
// when they fail.

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (BPF, loop devices, cgroups)")
	}
}

// loopDev is a loop device over a tmpfs file.
type loopDev struct {
	path string
	dev  uint32   // kernel dev_t
	fd   *os.File // held open until cleanup, which detaches the device
}

func newLoop(t testing.TB, size int64) loopDev {
	t.Helper()
	f, err := os.CreateTemp("/dev/shm", "blockd-probe-*.img")
	if err != nil {
		t.Fatal(err)
	}
	name := f.Name()
	t.Cleanup(func() { os.Remove(name) })
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// The loop ioctls directly rather than losetup(8), whose flags differ
	// between util-linux and busybox (the test also runs in a VM).
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	// Other processes may grab the free device between GET_FREE and
	// SET_FD (EBUSY): retry a bounded number of times.
	for range 20 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			t.Fatalf("LOOP_CTL_GET_FREE: %v", err)
		}
		path := fmt.Sprintf("/dev/loop%d", n)
		ld, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.IoctlSetInt(int(ld.Fd()), unix.LOOP_SET_FD, int(f.Fd()))
		if errors.Is(err, unix.EBUSY) {
			ld.Close()
			continue
		}
		if err != nil {
			ld.Close()
			t.Fatalf("LOOP_SET_FD %s: %v", path, err)
		}
		t.Cleanup(func() {
			defer ld.Close()
			if _, _, e := unix.Syscall(unix.SYS_IOCTL, ld.Fd(), unix.LOOP_CLR_FD, 0); e != 0 {
				t.Errorf("LOOP_CLR_FD %s: %v", path, e)
			}
		})
		var st unix.Stat_t
		if err := unix.Fstat(int(ld.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		return loopDev{path: path, dev: Dev(unix.Major(st.Rdev), unix.Minor(st.Rdev)), fd: ld}
	}
	t.Fatal("no free loop device after 20 tries")
	return loopDev{}
}

// mkCgroups creates the directories of rel (below base) and removes them,
// deepest first, at cleanup.
func mkCgroups(t *testing.T, base string, rels ...string) {
	t.Helper()
	for _, rel := range rels {
		parts := strings.Split(rel, "/")
		for i := range parts {
			dir := filepath.Join(base, filepath.Join(parts[:i+1]...))
			if err := os.Mkdir(dir, 0o755); err != nil {
				if errors.Is(err, os.ErrExist) {
					continue
				}
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
					t.Errorf("remove cgroup: %v", err)
				}
			})
		}
	}
}

// enableIO turns on the io and memory controllers down to the leaves of
// rels where cgroup v2 has them (pure v2 hosts; not hybrid ones, where io
// is a v1 controller), so that bios carry the leaf's blkcg as on a kubelet
// node. It reports whether the leaves have both controllers.
func enableIO(t *testing.T, base string, rels ...string) bool {
	t.Helper()
	ok := true
	for _, rel := range rels {
		dirs := []string{base}
		parts := strings.Split(rel, "/")
		for i := range parts {
			dirs = append(dirs, filepath.Join(base, filepath.Join(parts[:i+1]...)))
		}
		for _, d := range dirs[:len(dirs)-1] {
			have, _ := os.ReadFile(filepath.Join(d, "cgroup.controllers"))
			for _, c := range []string{"io", "memory"} {
				if slices.Contains(strings.Fields(string(have)), c) {
					// Ignore errors: already enabled, or refused; the
					// leaf check below is what matters.
					os.WriteFile(filepath.Join(d, "cgroup.subtree_control"), []byte("+"+c), 0)
				}
			}
		}
		have, _ := os.ReadFile(filepath.Join(dirs[len(dirs)-1], "cgroup.controllers"))
		f := strings.Fields(string(have))
		ok = ok && slices.Contains(f, "io") && slices.Contains(f, "memory")
	}
	return ok
}

// ddIn runs dd with O_DIRECT from a process created inside cgroup dir
// (clone3 CLONE_INTO_CGROUP), so every request it issues is its own.
func ddIn(t *testing.T, dir string, args ...string) {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	cmd := exec.Command("dd", append(args, "status=none")...)
	cmd.SysProcAttr = &unix.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("dd %v: %v: %s", args, err, out)
	}
}

func cgroupID(t *testing.T, dir string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

type ioCount struct{ reads, writes, readBytes, writeBytes uint64 }

func within1pct(got, want uint64) bool {
	d := int64(got) - int64(want)
	if d < 0 {
		d = -d
	}
	return float64(d) <= 0.01*float64(want)
}

func TestPodAttribution(t *testing.T) {
	needRoot(t)
	root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	loopA := newLoop(t, 64<<20)
	loopB := newLoop(t, 16<<20) // not accounted

	base := filepath.Join(root, fmt.Sprintf("blockd-probe-test-%d", os.Getpid()))
	const (
		uidA = "0b7d8a4c-1c2e-4f5a-9e3b-aaaaaaaaaaaa"
		cidA = "1111111111111111111111111111111111111111111111111111111111111111"
		uidB = "5f3c2b1a-7d6e-4c8b-9a0f-bbbbbbbbbbbb"
		cidB = "2222222222222222222222222222222222222222222222222222222222222222"
	)
	cgA := "kubepods/burstable/pod" + uidA + "/" + cidA
	cgB := "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" +
		strings.ReplaceAll(uidB, "-", "_") + ".slice/cri-containerd-" + cidB + ".scope"
	cgOther := "system.slice/other.service"
	mkCgroups(t, base, "")
	mkCgroups(t, base, cgA, cgB, cgOther)
	t.Logf("io controller at the leaves: %v", enableIO(t, base, cgA, cgB, cgOther))

	logs := t.TempDir()
	for _, d := range []string{"team-a_web-0_" + uidA, "team-b_db-7f9c_" + uidB} {
		if err := os.Mkdir(filepath.Join(logs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}

	for _, tp := range []string{"io", "rq"} {
		t.Run(tp, func(t *testing.T) {
			if tp == "io" && !kernelAtLeast(t, 6, 5) {
				t.Skip("block_io_start arrived in 6.5")
			}
			fds, gor := leakcheck.FDs(t), runtime.NumGoroutine()
			p, err := New(Options{PodLogDir: logs, Tracepoints: tp})
			if err != nil {
				t.Fatal(err)
			}
			closed := false
			defer func() {
				if !closed {
					p.Close()
				}
			}()
			if err := p.SetDevices([]uint32{loopA.dev}); err != nil {
				t.Fatal(err)
			}

			a, b, other := filepath.Join(base, cgA), filepath.Join(base, cgB), filepath.Join(base, cgOther)
			// conv=fsync: the loop device has a volatile write cache, so
			// this adds one flush request from pod A.
			ddIn(t, a, "if=/dev/zero", "of="+loopA.path, "bs=64k", "count=64", "oflag=direct", "conv=fsync")
			ddIn(t, a, "if="+loopA.path, "of=/dev/null", "bs=4k", "count=128", "iflag=direct")
			ddIn(t, a, "if="+loopB.path, "of=/dev/null", "bs=4k", "count=50", "iflag=direct")
			ddIn(t, b, "if=/dev/zero", "of="+loopA.path, "bs=128k", "count=32", "oflag=direct", "seek=100")
			ddIn(t, b, "if="+loopA.path, "of=/dev/null", "bs=16k", "count=96", "iflag=direct")
			ddIn(t, other, "if="+loopA.path, "of=/dev/null", "bs=8k", "count=77", "iflag=direct")

			snap, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			byCg := map[uint64]*podio.Entry{}
			for i := range snap.Entries {
				e := &snap.Entries[i]
				if e.Dev != loopA.dev {
					t.Errorf("entry for unaccounted device %s: %+v", e.Device, e)
				}
				if e.Ops() != sum(e.Latency) {
					t.Errorf("%s: latency histogram holds %d requests, ops %d", e.Cgroup, sum(e.Latency), e.Ops())
				}
				byCg[e.CgroupID] = e
			}
			check := func(name, dir string, want ioCount, uid, ns, pod, ctr string) {
				e := byCg[cgroupID(t, dir)]
				if e == nil {
					t.Errorf("%s: no entry (snapshot %+v)", name, snap.Entries)
					return
				}
				got := ioCount{e.Reads, e.Writes, e.ReadBytes, e.WriteBytes}
				// Exact: every request of dd's is its own, whichever
				// path (in-flight record or the request itself) the
				// completion took.
				if got != want {
					t.Errorf("%s: got %+v, want %+v", name, got, want)
				}
				if e.PodUID != uid || e.Namespace != ns || e.Pod != pod || e.Container != ctr {
					t.Errorf("%s: identity %q %q %q %q, want %q %q %q %q", name,
						e.PodUID, e.Namespace, e.Pod, e.Container, uid, ns, pod, ctr)
				}
				if e.Device != filepath.Base(loopA.path) {
					t.Errorf("%s: device %q, want %q", name, e.Device, filepath.Base(loopA.path))
				}
			}
			check("pod A", a, ioCount{128, 64, 128 * 4096, 64 * 65536}, uidA, "team-a", "web-0", cidA)
			// block_io_start sees the empty preflush write in dd's
			// context. With block_rq_issue only the flush machinery's
			// own request is issued, often from a kworker, so the flush
			// may be charged to whoever dispatched it.
			if e := byCg[cgroupID(t, a)]; tp == "io" && e != nil && e.Flushes == 0 {
				t.Errorf("pod A: no flush counted for its fsync")
			}
			var flushes uint64
			for _, e := range snap.Entries {
				flushes += e.Flushes
			}
			if flushes == 0 {
				t.Errorf("no flush counted anywhere for pod A's fsync")
			}
			check("pod B", b, ioCount{96, 32, 96 * 16384, 32 * 131072}, uidB, "team-b", "db-7f9c", cidB)
			check("other", other, ioCount{77, 0, 77 * 8192, 0}, "", "", "", "")
			// Nothing else may claim to be one of the pods.
			for _, e := range snap.Entries {
				if e.PodUID != "" && e.CgroupID != cgroupID(t, a) && e.CgroupID != cgroupID(t, b) {
					t.Errorf("unexpected pod entry %+v", e)
				}
			}

			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
			closed = true
			if _, err := p.Snapshot(); !errors.Is(err, os.ErrClosed) {
				t.Errorf("snapshot after close: %v, want os.ErrClosed", err)
			}
			if n := leakcheck.FDs(t); n != fds {
				t.Errorf("fd leak: %d open before New, %d after Close", fds, n)
			}
			// Goroutines of the test's own that are winding down (a
			// finalizer running counts as one) get a moment to finish.
			deadline := time.Now().Add(2 * time.Second)
			for runtime.NumGoroutine() > gor && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := runtime.NumGoroutine(); n > gor {
				buf := make([]byte, 1<<20)
				t.Errorf("goroutine leak: %d before New, %d after Close:\n%s", gor, n, buf[:runtime.Stack(buf, true)])
			}
		})
	}
}

// TestDroppedCgroup checks that the counters of a removed cgroup vanish.
func TestDroppedCgroup(t *testing.T) {
	needRoot(t)
	root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	loop := newLoop(t, 16<<20)
	base := filepath.Join(root, fmt.Sprintf("blockd-probe-drop-%d", os.Getpid()))
	mkCgroups(t, base, "")
	ctr := filepath.Join(base, "kubepods", "pod0b7d8a4c-1c2e-4f5a-9e3b-cccccccccccc", "ctr")
	mkCgroups(t, base, "kubepods/pod0b7d8a4c-1c2e-4f5a-9e3b-cccccccccccc/ctr")

	p, err := New(Options{PodLogDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.SetDevices([]uint32{loop.dev}); err != nil {
		t.Fatal(err)
	}
	id := cgroupID(t, ctr)
	ddIn(t, ctr, "if="+loop.path, "of=/dev/null", "bs=4k", "count=10", "iflag=direct")
	find := func() *podio.Entry {
		s, err := p.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		for i := range s.Entries {
			if s.Entries[i].CgroupID == id {
				return &s.Entries[i]
			}
		}
		return nil
	}
	e := find()
	if e == nil || e.Reads != 10 || e.PodUID != "0b7d8a4c-1c2e-4f5a-9e3b-cccccccccccc" || e.Container != "ctr" {
		t.Fatalf("before removal: %+v", e)
	}
	// The exited dd may linger as a zombie for a moment; rmdir fails
	// with EBUSY until it is reaped, so retry a bounded number of times.
	var rmErr error
	for range 50 {
		if rmErr = os.Remove(ctr); rmErr == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if rmErr != nil {
		t.Fatal(rmErr)
	}
	if e := find(); e != nil {
		t.Errorf("entry of removed cgroup still reported: %+v", e)
	}
}

func sum(h []uint64) uint64 {
	var n uint64
	for _, v := range h {
		n += v
	}
	return n
}

// TestSetDevicesAll checks the all-devices switch and that SetDevices
// replaces rather than extends the set.
func TestSetDevicesAll(t *testing.T) {
	needRoot(t)
	l1, l2 := newLoop(t, 8<<20), newLoop(t, 8<<20)
	p, err := New(Options{PodLogDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	read := func(l loopDev) {
		if out, err := exec.Command("dd", "if="+l.path, "of=/dev/null", "bs=4k", "count=5", "iflag=direct", "status=none").CombinedOutput(); err != nil {
			t.Fatalf("dd: %v: %s", err, out)
		}
	}
	reads := func() map[uint32]uint64 {
		s, err := p.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		m := map[uint32]uint64{}
		for _, e := range s.Entries {
			m[e.Dev] += e.Reads
		}
		return m
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	read(l1)
	read(l2)
	if m := reads(); m[l1.dev] != 0 || m[l2.dev] != 0 {
		t.Fatalf("empty device set accounted I/O: %v", m)
	}
	must(p.SetDevices([]uint32{l1.dev}))
	must(p.SetDevices([]uint32{l2.dev}))
	read(l1)
	read(l2)
	if m := reads(); m[l1.dev] != 0 || m[l2.dev] != 5 {
		t.Fatalf("after SetDevices(l2): %v, want only l2 with 5 reads", m)
	}
	// Many devices: every one must sit in its probe window of the BPF
	// table, and the I/O test below must still see l2.
	many := []uint32{l2.dev}
	for i := range uint32(300) {
		many = append(many, Dev(500, i))
	}
	must(p.SetDevices(many))
	var table [devtabSlots]uint32
	for i := range table {
		must(p.devices.Lookup(uint32(i), &table[i]))
	}
	for _, d := range many {
		found := false
		for i := range uint32(devtabProbes) {
			found = found || table[(devHash(d)+i)&(devtabSlots-1)] == d
		}
		if !found {
			t.Fatalf("device %d:%d not in its probe window", DevMajor(d), DevMinor(d))
		}
	}
	if n := len(slices.DeleteFunc(table[:], func(d uint32) bool { return d == 0 })); n != len(many) {
		t.Fatalf("table holds %d devices, want %d", n, len(many))
	}
	read(l2)
	if m := reads(); m[l2.dev] != 10 {
		t.Fatalf("after SetDevices(many): %v, want l2 with 10 reads", m)
	}
	if err := p.SetDevices([]uint32{0}); err == nil {
		t.Error("SetDevices accepted dev_t 0")
	}

	must(p.SetAllDevices(true))
	read(l1)
	if m := reads(); m[l1.dev] != 5 {
		t.Fatalf("all devices: %v, want l1 with 5 reads", m)
	}
}

func TestDevOfPathAndRun(t *testing.T) {
	needRoot(t)
	l := newLoop(t, 8<<20)
	d, err := DevOfPath(l.path)
	if err != nil || d != l.dev {
		t.Fatalf("DevOfPath(%s) = %d, %v; want %d", l.path, d, err, l.dev)
	}
	if _, err := DevOfPath("/dev/null"); err == nil {
		t.Error("DevOfPath accepted a character device")
	}

	p, err := New(Options{PodLogDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, time.Millisecond) }()
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel: %v", err)
	}
	p.Close()
	if err := p.Run(context.Background(), time.Millisecond); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Run after Close: %v, want os.ErrClosed", err)
	}
}

// TestWritebackAttribution checks that buffered writes are charged to the
// pod that dirtied the pages although another process (here the test, in
// another cgroup) makes them reach the device: the bio's blkcg names the
// owner. That needs cgroup writeback, i.e. the io and memory controllers
// on cgroup v2, which hybrid hosts lack (there io is the v1 blkio
// controller); the test skips on them and runs in the VM.
func TestWritebackAttribution(t *testing.T) {
	needRoot(t)
	root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(root, fmt.Sprintf("blockd-probe-wb-%d", os.Getpid()))
	rel := "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podwb_1.slice/cri-containerd-wb.scope"
	mkCgroups(t, base, "")
	mkCgroups(t, base, rel)
	if !enableIO(t, base, rel) {
		t.Skip("cgroup v2 has no io+memory controllers here (hybrid host): no cgroup writeback")
	}
	loop := newLoop(t, 32<<20)
	p, err := New(Options{PodLogDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.SetDevices([]uint32{loop.dev}); err != nil {
		t.Fatal(err)
	}
	ctr := filepath.Join(base, rel)
	// Buffered: dd only dirties the page cache. The test holds the device
	// open, so dd's close is not the last one and does not flush.
	ddIn(t, ctr, "if=/dev/zero", "of="+loop.path, "bs=64k", "count=64", "conv=notrunc")
	if err := unix.Fsync(int(loop.fd.Fd())); err != nil {
		t.Fatal(err)
	}
	snap, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	id := cgroupID(t, ctr)
	var pod, others uint64
	for _, e := range snap.Entries {
		if e.CgroupID == id {
			pod += e.WriteBytes
			if e.PodUID != "wb-1" || e.Container != "wb" {
				t.Errorf("identity %q %q", e.PodUID, e.Container)
			}
		} else {
			others += e.WriteBytes
			t.Logf("also written by %s: %d bytes", e.Cgroup, e.WriteBytes)
		}
	}
	if !within1pct(pod, 64*65536) {
		t.Errorf("pod charged %d bytes of writeback, want %d (others: %d)", pod, 64*65536, others)
	}
}

// kernelAtLeast compares the running kernel's version with major.minor.
func kernelAtLeast(t *testing.T, major, minor int) bool {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var ma, mi int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &ma, &mi); err != nil {
		t.Fatal(err)
	}
	return ma > major || ma == major && mi >= minor
}

// TestPickTracepoints checks the run-time choice of the start tracepoint:
// block_io_start from 6.5 on, block_rq_issue before.
func TestPickTracepoints(t *testing.T) {
	needRoot(t)
	p, err := New(Options{PodLogDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	want := "rq"
	if kernelAtLeast(t, 6, 5) {
		want = "io"
	}
	if got := p.Tracepoints(); got != want {
		t.Errorf("Tracepoints() = %q, want %q on this kernel", got, want)
	}
}
