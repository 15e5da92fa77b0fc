package blockd

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blockd/blockd/pipeline"
)

// Every profile: small adjacent writes (merged by sequential's write-back
// buffer), a FLUSH, then kill -9: every flushed write is on disk after the
// restart, and reads before the kill saw the new data.
func TestProfileFlushedWritesSurviveKill9(t *testing.T) {
	need(t, "qemu-io")
	for _, p := range Profiles {
		t.Run(p, func(t *testing.T) {
			dir := t.TempDir()
			addr := freePort(t)
			d := startDaemon(t, dir, addr)
			if _, err := d.client().CreateVolume(CreateRequest{Name: "v", Size: 64 << 20, Profile: p}); err != nil {
				t.Fatal(err)
			}
			var cmds []string
			for i := 0; i < 64; i++ { // 256 KiB of 4 KiB writes, each its own pattern
				cmds = append(cmds, fmt.Sprintf("write -P %d %d 4k", i+1, i*4096))
			}
			cmds = append(cmds, "write -P 0x77 1M 3k", "write -P 0x78 2052k 4k", "read -P 0x77 1M 3k")
			for i := 0; i < 64; i++ {
				cmds = append(cmds, fmt.Sprintf("read -P %d %d 4k", i+1, i*4096))
			}
			cmds = append(cmds, "flush")
			qemuIOWriteback(t, d.uri("v"), cmds...)
			if p == "sequential" {
				vi, err := d.client().GetVolume("v")
				if err != nil || vi.ProfileStats.BufferedWrites == 0 {
					t.Fatalf("no write went through the write-back buffer: %+v, %v", vi.ProfileStats, err)
				}
			}
			d.kill9()
			d = startDaemon(t, dir, addr)
			cmds = cmds[:0]
			for i := 0; i < 64; i++ {
				cmds = append(cmds, fmt.Sprintf("read -P %d %d 4k", i+1, i*4096))
			}
			cmds = append(cmds, "read -P 0x77 1M 3k", "read -P 0x78 2052k 4k", "read -P 0 4M 60M")
			qemuIO(t, d.uri("v"), cmds...)
		})
	}
}

// fio writes with crc32c checksums and a FLUSH every few writes, then reads
// everything back and verifies it, over NBD, under every profile; the
// sequential job's verify pass is a sequential read stream (prefetch).
func TestProfileFIOVerify(t *testing.T) {
	need(t, "fio")
	dir := t.TempDir()
	d := startDaemon(t, dir, freePort(t))
	for _, p := range Profiles {
		t.Run(p, func(t *testing.T) {
			name := "f-" + strings.ReplaceAll(p, "_", "-")
			if _, err := d.client().CreateVolume(CreateRequest{Name: name, Size: 64 << 20, Profile: p}); err != nil {
				t.Fatal(err)
			}
			for _, rw := range []string{"write", "randwrite"} {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				cmd := exec.CommandContext(ctx, "fio", "--name=verify", "--ioengine=nbd",
					"--uri="+d.uri(name), "--rw="+rw, "--bsrange=4k-64k", "--size=16M",
					"--iodepth=8", "--verify=crc32c", "--do_verify=1", "--fsync=7",
					"--verify_fatal=1", "--verify_state_save=0", "--randseed=42", "--output-format=terse")
				cmd.Dir = t.TempDir() // fio leaves state files in its working directory
				out, err := cmd.CombinedOutput()
				cancel()
				if err != nil || strings.Contains(string(out), "verify:") || strings.Contains(string(out), "bad magic") {
					t.Fatalf("fio %s under %s: %v\n%s", rw, p, err, out)
				}
			}
		})
	}
}

// A live `volume set --profile` reaches the stage: volume get and the
// metric show the new effective profile.
func TestProfileLiveChange(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := OpenManager(t.TempDir(), quietLog(), NewMetrics(reg))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	sock := startAPI(t, m)
	c := NewClient(sock)
	if _, err := c.CreateVolume(CreateRequest{Name: "v", Size: 16 << 20, Profile: "random"}); err != nil {
		t.Fatal(err)
	}
	vi, err := c.GetVolume("v")
	if err != nil || vi.EffectiveProfile != "random" {
		t.Fatalf("effective profile after create = %q, %v", vi.EffectiveProfile, err)
	}
	if out, errOut, code := run(t, sock, "volume", "set", "v", "--profile", "sequential"); code != 0 {
		t.Fatalf("volume set: %s%s", out, errOut)
	}
	vi, err = c.GetVolume("v")
	if err != nil || vi.EffectiveProfile != "sequential" || vi.ProfileStats == nil || vi.ProfileStats.Configured != "sequential" {
		t.Fatalf("after set --profile sequential: %+v, %v", vi, err)
	}
	g := m.metrics.profile
	if got := testutil.ToFloat64(g.WithLabelValues("v", "sequential")); got != 1 {
		t.Errorf(`blockd_volume_effective_profile{volume="v",profile="sequential"} = %v, want 1`, got)
	}
	if got := testutil.ToFloat64(g.WithLabelValues("v", "random")); got != 0 {
		t.Errorf(`blockd_volume_effective_profile{volume="v",profile="random"} = %v, want 0`, got)
	}
	// Writes buffered under sequential survive a switch to none and a
	// close of the volume.
	v, _ := m.Get("v")
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = 0xab
	}
	w := pipeline.Request{Op: pipeline.OpWrite, Offset: 8192, Length: 4096, Buf: buf}
	if err := v.Handle(context.Background(), &w); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UpdateVolume("v", UpdateRequest{Profile: ptr("none")}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	r := pipeline.Request{Op: pipeline.OpRead, Offset: 8192, Length: 4096, Buf: got}
	if err := v.Handle(context.Background(), &r); err != nil || got[0] != 0xab || got[4095] != 0xab {
		t.Fatalf("read after switching sequential -> none: %x..., %v", got[:4], err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m2, err := OpenManager(m.dir, quietLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	v2, _ := m2.Get("v")
	clear(got)
	if _, err := v2.engine.ReadAt(got, 8192); err != nil || got[0] != 0xab {
		t.Fatalf("after close and reopen: %x..., %v; buffered write lost", got[:4], err)
	}
}

// qemuIOWriteback is qemuIO with qemu's write-back cache mode: writes are
// not FUA, flushes are explicit (qemu-io's default, writethrough, makes
// every write FUA).
func qemuIOWriteback(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw", "--cache=writeback"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "qemu-io", args...).CombinedOutput()
	s := string(out)
	if err != nil || strings.Contains(s, "Pattern verification failed") || strings.Contains(s, "failed:") {
		t.Fatalf("qemu-io %v: %v\n%s", cmds, err, s)
	}
	return s
}

func ptr[T any](v T) *T { return &v }
