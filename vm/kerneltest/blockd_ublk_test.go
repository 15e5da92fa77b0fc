//go:build vmtest

package kerneltest

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/ublk"
	"github.com/blockd/blockd/vm/guest"
)

// Daemon-level tests of the ublk frontend: the same scenarios as the NBD
// ones in blockd_test.go (whose daemon helpers they use), with volumes
// attached as /dev/ublkbN by `blockd attach --frontend ublk`.

// requireUblk loads ublk_drv. Debian's 6.1 kernel does not ship it, so
// there (and only there) a missing driver is a skip; on any other kernel
// it is a failure.
func requireUblk(t *testing.T) {
	t.Helper()
	guest.RequireVM(t)
	err := module.Load("ublk_drv")
	if err == nil && module.Loaded("ublk_drv") {
		return
	}
	rel := unameRelease(t)
	if strings.HasPrefix(rel, "6.1.") && !module.Loaded("ublk_drv") {
		t.Skip("kernel 6.1 has no ublk_drv (ublk needs 6.0+ with the module; Debian 6.1 does not ship it)")
	}
	t.Fatalf("kernel %s: ublk_drv not loadable: %v", rel, err)
}

func unameRelease(t *testing.T) string {
	t.Helper()
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var rel []byte
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		rel = append(rel, byte(c))
	}
	return string(rel)
}

// ublkAttachment is the attachment as `volume get -o json` shows it, with
// the ublk fields volumeJSON leaves out.
type ublkAttachment struct {
	Frontend string `json:"frontend"`
	Device   string `json:"device"`
	Index    int    `json:"index"`
	Queues   int    `json:"queues"`
	Depth    int    `json:"depth"`
}

func (d *blockd) ublkAttachment(name string) *ublkAttachment {
	d.t.Helper()
	var v struct {
		Attachment *ublkAttachment `json:"attachment"`
	}
	out := d.must("volume", "get", name, "-o", "json")
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		d.t.Fatalf("volume get %s -o json: %v\n%s", name, err, out)
	}
	return v.Attachment
}

// attachUblk attaches name with --frontend ublk and checks what the daemon
// reports and the kernel shows. queues or depth 0 leave the default.
func (d *blockd) attachUblk(name string, queues, depth int) string {
	d.t.Helper()
	args := []string{"attach", name, "--frontend", "ublk"}
	if queues > 0 {
		args = append(args, "--queues", strconv.Itoa(queues))
	}
	if depth > 0 {
		args = append(args, "--depth", strconv.Itoa(depth))
	}
	dev := strings.TrimSpace(d.must(args...))
	id, err := strconv.Atoi(strings.TrimPrefix(dev, "/dev/ublkb"))
	if err != nil || !strings.HasPrefix(dev, "/dev/ublkb") {
		d.t.Fatalf("attach --frontend ublk printed %q, want /dev/ublkbN", dev)
	}
	a := d.ublkAttachment(name)
	if a == nil || a.Frontend != "ublk" || a.Device != dev || a.Index != id ||
		(queues > 0 && a.Queues != queues) || (depth > 0 && a.Depth != depth) || a.Queues < 1 || a.Depth < 1 {
		d.t.Fatalf("volume get %s after attach: attachment %+v, want ublk %s (index %d) with queues %d depth %d", name, a, dev, id, queues, depth)
	}
	size := d.get(name).Size
	guest.WaitFor(d.t, dev+" size", 10*time.Second, func() bool {
		n, _ := guest.DeviceSize(dev)
		return n == size
	})
	if qs, _ := filepath.Glob("/sys/block/" + filepath.Base(dev) + "/mq/*"); len(qs) != a.Queues {
		d.t.Errorf("%s has %d hardware queues, attachment says %d", dev, len(qs), a.Queues)
	}
	return dev
}

// detachUblk detaches by name or device path and checks that the block
// and character devices are gone.
func (d *blockd) detachUblk(arg, name, dev string) {
	d.t.Helper()
	d.must("detach", arg)
	if a := d.ublkAttachment(name); a != nil {
		d.t.Errorf("volume get %s after detach still shows attachment %+v", name, a)
	}
	id := strings.TrimPrefix(dev, "/dev/ublkb")
	for _, p := range []string{dev, "/dev/ublkc" + id, "/sys/block/ublkb" + id, "/sys/class/ublk-char/ublkc" + id} {
		guest.WaitFor(d.t, p+" removed after detach", 10*time.Second, func() bool {
			_, err := os.Stat(p)
			return errors.Is(err, os.ErrNotExist)
		})
	}
}

// ublkDevices lists the ublk devices in the kernel, by /dev and by sysfs.
func ublkDevices() []string {
	var out []string
	for _, g := range []string{"/dev/ublkb*", "/dev/ublkc*", "/sys/class/ublk-char/*", "/sys/block/ublkb*"} {
		m, _ := filepath.Glob(g)
		out = append(out, m...)
	}
	return out
}

// procFDs lists a process's open files (the targets of /proc/PID/fd).
func procFDs(pid int) []string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join(dir, e.Name()))
		out = append(out, e.Name()+"->"+l)
	}
	return out
}

// waitFDs waits until the daemon has want open files: the HTTP connection
// of the last CLI call closes asynchronously.
func (d *blockd) waitFDs(t *testing.T, want int, when string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		fds := procFDs(d.p.Pid())
		if len(fds) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("blockd has %d open files %s, want %d as before the attach:\n%s", len(fds), when, want, strings.Join(fds, "\n"))
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stableFDs returns the daemon's open-file count once two reads 200 ms
// apart agree (CLI connections from earlier commands have closed).
func (d *blockd) stableFDs() int {
	prev := -1
	for range 25 {
		n := len(procFDs(d.p.Pid()))
		if n == prev {
			return n
		}
		prev = n
		time.Sleep(200 * time.Millisecond)
	}
	return prev
}

// TestBlockdUblkAttachExt4 attaches a file-engine volume with ublk, puts
// ext4 on it, checks the files across umount/fsck/mount and across
// detach/attach (devices gone, no fd left in the daemon), and that
// blkdiscard frees space in the backing file.
func TestBlockdUblkAttachExt4(t *testing.T) {
	requireUblk(t)
	loadExt4(t)
	if devs := ublkDevices(); len(devs) != 0 {
		t.Fatalf("ublk devices present before the test: %v", devs)
	}
	d := startBlockd(t, t.TempDir())
	d.must("volume", "create", "uext", "--size", "512MiB", "--engine", "file")
	fds0 := d.stableFDs()
	ext4AcrossReattach(t, d, "uext",
		func(first bool) string {
			if first {
				dev := d.attachUblk("uext", 2, 64)
				t.Logf("attached uext as %s (2 queues of depth 64); blockd had %d open files before, %d now", dev, fds0, len(procFDs(d.p.Pid())))
				return dev
			}
			dev := d.attachUblk("uext", 0, 0)
			a := d.ublkAttachment("uext")
			t.Logf("re-attached as %s with the defaults: %d queues of depth %d", dev, a.Queues, a.Depth)
			return dev
		},
		func(dev string, last bool) {
			if last {
				d.detachUblk("uext", "uext", dev)
				d.waitFDs(t, fds0, "after the final detach")
				return
			}
			d.detachUblk(dev, "uext", dev) // by device path
			if devs := ublkDevices(); len(devs) != 0 {
				t.Errorf("ublk devices left after detach: %v", devs)
			}
			d.waitFDs(t, fds0, "after detach")
		})
	d.stop()
}

// TestBlockdUblkRestart proves that ublk devices survive the daemon: a
// kill -9 under O_DIRECT writes and a SIGTERM with I/O issued while no
// daemon runs both end with the I/O completed, without errors, once blockd
// is started again on the same state dir and recovers the device
// (START_USER_RECOVERY … END_USER_RECOVERY).
func TestBlockdUblkRestart(t *testing.T) {
	requireUblk(t)
	state := t.TempDir()
	d := startBlockd(t, state)
	d.must("volume", "create", "urs", "--size", "64MiB", "--engine", "file")
	dev := d.attachUblk("urs", 2, 0)

	ok := t.Run("KillDuringDirectWrites", func(t *testing.T) {
		killDuringDirectWrites(t, d, dev)
		if a := d.ublkAttachment("urs"); a == nil || a.Device != dev {
			t.Errorf("attachment after restart = %+v, want %s", a, dev)
		}
		if out := d.p.Output(); !strings.Contains(out, "recovered ublk device") {
			t.Errorf("restarted blockd did not log the recovery of %s:\n%s", dev, out)
		}
	})
	if !ok {
		t.FailNow()
	}
	t.Run("IOWhileStopped", func(t *testing.T) {
		d.stop()
		if t.Failed() {
			t.FailNow()
		}
		id, _ := strconv.Atoi(strings.TrimPrefix(dev, "/dev/ublkb"))
		infos, err := ublk.List(nil)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(infos, func(i ublk.DevInfo) bool { return int(i.DevID) == id })
		if i < 0 || infos[i].State != ublk.StateQuiesced {
			t.Fatalf("after SIGTERM the kernel's ublk devices are %+v; want %s left quiesced for the next daemon", infos, dev)
		}
		ioHeldWhileStopped(t, d, dev)
	})
	d.detachUblk("urs", "urs", dev)
	d.stop()
}

// TestBlockdUblkBadInput checks that wrong attach/detach/delete requests
// involving ublk fail with messages that say why, and change nothing.
func TestBlockdUblkBadInput(t *testing.T) {
	requireUblk(t)
	loadNBD(t)
	d := startBlockd(t, t.TempDir())
	d.must("volume", "create", "unb", "--size", "64MiB", "--engine", "file")
	d.must("volume", "create", "uub", "--size", "64MiB", "--engine", "file")
	d.must("volume", "create", "uidle", "--size", "16MiB", "--engine", "memory")
	nbdDev := d.attach("unb", 1)
	ublkDev := d.attachUblk("uub", 1, 16)

	// A ublk device that is not blockd's, served by the test itself.
	e, err := ioengine.NewMemory(16 << 20)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := ublk.Attach(context.Background(), ublk.Config{ID: -1, Queues: 1, Depth: 16, Size: 16 << 20, Handler: ioengine.Handler(e)})
	if err != nil {
		t.Fatalf("ublk device for the foreign-device case: %v", err)
	}
	defer foreign.Detach()
	foreignDev := foreign.Path()
	before := ublkDevices()

	d.fails([]string{"unb", "already attached", nbdDev}, "attach", "unb", "--frontend", "ublk")
	d.fails([]string{"uub", "already attached", ublkDev}, "attach", "uub", "--frontend", "nbd", "--connections", "1")
	d.fails([]string{"uub", "already attached", ublkDev}, "attach", "uub", "--frontend", "ublk")
	d.fails([]string{"uidle", "--queues 99"}, "attach", "uidle", "--frontend", "ublk", "--queues", "99")
	d.fails([]string{foreignDev, "not a device attached by blockd"}, "detach", foreignDev)
	d.fails([]string{"uub", "attached", ublkDev, "detach it first"}, "volume", "delete", "uub")

	// Nothing changed: the attachments, the kernel's devices, and every
	// device still reads and writes.
	if a := d.ublkAttachment("uub"); a == nil || a.Device != ublkDev || a.Queues != 1 || a.Depth != 16 {
		t.Errorf("uub attachment after the refused requests = %+v, want ublk %s, 1 queue of depth 16", a, ublkDev)
	}
	if a := d.ublkAttachment("unb"); a == nil || a.Frontend != "nbd" || a.Device != nbdDev {
		t.Errorf("unb attachment after the refused requests = %+v, want nbd %s", a, nbdDev)
	}
	if a := d.ublkAttachment("uidle"); a != nil {
		t.Errorf("uidle got attachment %+v from a refused attach", a)
	}
	if after := ublkDevices(); !slices.Equal(before, after) {
		t.Errorf("ublk devices changed by refused requests: before %v, after %v", before, after)
	}
	for _, x := range []string{nbdDev, ublkDev, foreignDev} {
		if err := writeRead(x, 8192); err != nil {
			t.Errorf("after the refused requests: %v", err)
		}
	}
	d.detachUblk("uub", "uub", ublkDev)
	d.detach("unb", nbdDev)
	d.must("volume", "delete", "uub")
	if err := foreign.Detach(); err != nil {
		t.Errorf("detach of the test's own ublk device: %v", err)
	}
	d.stop()
}

// TestBlockdUblkOrphanCleanup kills blockd with a ublk device attached,
// makes the record unusable, and checks that the next start deletes the
// device it cannot recover (and says so) instead of leaving it quiesced
// forever; the volume is detached with its data intact.
func TestBlockdUblkOrphanCleanup(t *testing.T) {
	requireUblk(t)
	for _, tc := range []struct {
		name string
		edit func(att map[string]any) map[string]any // nil: drop the attachment record
		logs []string
	}{
		{"BogusID", func(att map[string]any) map[string]any {
			att["index"], att["device"] = 77, "/dev/ublkb77"
			return att
		}, []string{"ublk device not recoverable", "/dev/ublkb77", "removed orphaned ublk device"}},
		{"RecordRemoved", nil, []string{"removed orphaned ublk device"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := t.TempDir()
			d := startBlockd(t, state)
			d.must("volume", "create", "uorph", "--size", "16MiB", "--engine", "file")
			dev := d.attachUblk("uorph", 1, 0)
			id := strings.TrimPrefix(dev, "/dev/ublkb")
			want := alignedBuf(writerBlock)
			pattern(want, 3, 42)
			f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			_, err = f.WriteAt(want, 3*writerBlock)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			d.kill()

			meta := filepath.Join(state, "volumes", "uorph.json")
			b, err := os.ReadFile(meta)
			if err != nil {
				t.Fatal(err)
			}
			var spec map[string]any
			if err := json.Unmarshal(b, &spec); err != nil {
				t.Fatalf("%s: %v", meta, err)
			}
			att, ok := spec["attachment"].(map[string]any)
			if !ok {
				t.Fatalf("%s records no attachment:\n%s", meta, b)
			}
			if tc.edit == nil {
				delete(spec, "attachment")
			} else {
				spec["attachment"] = tc.edit(att)
			}
			if b, err = json.Marshal(spec); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(meta, b, 0o644); err != nil {
				t.Fatal(err)
			}

			d.start()
			for _, p := range []string{dev, "/dev/ublkc" + id, "/sys/class/ublk-char/ublkc" + id} {
				if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s still there after blockd started (orphan not removed): %v", p, err)
				}
			}
			if devs := ublkDevices(); len(devs) != 0 {
				t.Errorf("ublk devices left after the start: %v", devs)
			}
			out := d.p.Output()
			for _, w := range tc.logs {
				if !strings.Contains(out, w) {
					t.Errorf("blockd start log does not say %q:\n%s", w, out)
				}
			}
			if !strings.Contains(out, "device="+dev) {
				t.Errorf("blockd start log does not name the removed device %s:\n%s", dev, out)
			}
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, "level=ERROR") && !strings.Contains(l, "ublk device not recoverable") {
					t.Errorf("blockd logged an unexpected error: %s", l)
				}
			}
			if a := d.ublkAttachment("uorph"); a != nil {
				t.Errorf("volume still records attachment %+v after its device was removed", a)
			}
			// The volume works again, with its data.
			dev = d.attachUblk("uorph", 1, 0)
			f, err = os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			got := alignedBuf(writerBlock)
			_, err = f.ReadAt(got, 3*writerBlock)
			f.Close()
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("re-attached %s: read %v, data match %v", dev, err, bytes.Equal(got, want))
			}
			d.detachUblk("uorph", "uorph", dev)
			if err := d.p.Stop(30 * time.Second); err != nil {
				t.Errorf("blockd stop: %v\n%s", err, d.p.Output())
			}
		})
	}
}

// randRead reads 4 KiB blocks at random offsets of the first span bytes
// of dev with O_DIRECT, qd at a time (one goroutine each), for dur, and
// checks each block against the pattern prefill wrote. It returns the
// reads done.
func randRead(t *testing.T, dev string, span int64, qd int, dur time.Duration) int64 {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var n atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, qd)
	stop := time.Now().Add(dur)
	for g := range qd {
		wg.Add(1)
		go func() { // owner: randRead; exits at the deadline, after 1e7 reads, or on an error
			defer wg.Done()
			buf := alignedBuf(4096)
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for i := 0; i < 10_000_000 && time.Now().Before(stop); i++ {
				off := r.Int64N(span/4096) * 4096
				if _, err := f.ReadAt(buf, off); err != nil {
					errs[g] = err
					return
				}
				blk, in := off/writerBlock, off%writerBlock
				if binary.LittleEndian.Uint64(buf) != uint64(blk) || binary.LittleEndian.Uint64(buf[8:]) != 1<<32|uint64(in) {
					errs[g] = fmt.Errorf("offset %d reads %x, not what prefill wrote", off, buf[:16])
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("%s: %v", dev, err)
	}
	return n.Load()
}

// fioRandRead runs fio's 4k randread at QD16 on dev when fio is in the
// guest (make test-kernel-ublk puts it there) and returns its IOPS.
func fioRandRead(t *testing.T, dev string, span int64, dur time.Duration) (float64, bool) {
	t.Helper()
	r, ok := runFio(t, dev, fioJob{"rr", "randread", "4k", 1, 16}, span, 0, dur)
	return r.IOPS, ok
}

// TestBlockdUblkVsNBDLoad reads the same volume through ublk and through
// NBD, 4 KiB random reads at queue depth 16, checking every block read,
// and logs both rates. Under TCG the numbers are only a sanity ratio;
// performance is measured on real hardware (bench/).
func TestBlockdUblkVsNBDLoad(t *testing.T) {
	requireUblk(t)
	loadNBD(t)
	const (
		span = 64 << 20
		qd   = 16
		dur  = 5 * time.Second
	)
	d := startBlockd(t, t.TempDir())
	d.must("volume", "create", "uload", "--size", "128MiB", "--engine", "file")
	dev := d.attachUblk("uload", 0, 0)
	f, err := os.OpenFile(dev, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(writerBlock)
	for blk := range span / writerBlock {
		pattern(buf, int(blk), 1)
		if _, err := f.WriteAt(buf, int64(blk)*writerBlock); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()

	type rate struct {
		dev       string
		iops, fio float64
		haveFio   bool
	}
	measure := func(dev string) rate {
		r := rate{dev: dev}
		r.iops = float64(randRead(t, dev, span, qd, dur)) / dur.Seconds()
		r.fio, r.haveFio = fioRandRead(t, dev, span, dur)
		return r
	}
	a := d.ublkAttachment("uload")
	u := measure(dev)
	d.detachUblk("uload", "uload", dev)
	const conns = 2 // the guest's CPUs: attach's default on 6.12
	dev = d.attach("uload", conns)
	n := measure(dev)
	d.detach("uload", dev)
	d.stop()

	t.Logf("4k randread QD%d, %v each, same volume (TCG: a sanity ratio only):", qd, dur)
	t.Logf("  Go O_DIRECT, %d threads: ublk %s (%d queues × %d) %.0f IOPS, nbd %s (%d connections) %.0f IOPS, ublk/nbd %.2f",
		qd, u.dev, a.Queues, a.Depth, u.iops, n.dev, conns, n.iops, u.iops/n.iops)
	if u.haveFio && n.haveFio {
		t.Logf("  fio libaio iodepth=16: ublk %.0f IOPS, nbd %.0f IOPS, ublk/nbd %.2f", u.fio, n.fio, u.fio/n.fio)
	} else {
		t.Logf("  fio not in the guest: `make test-kernel-ublk` adds it")
	}
}
