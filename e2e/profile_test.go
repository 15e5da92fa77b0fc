package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/profile"
)

// Every profile: small adjacent writes (merged by sequential's write-back
// buffer), a FLUSH, then kill -9: every flushed write is on disk after the
// restart, and reads before the kill saw the new data.
func TestProfileFlushedWritesSurviveKill9(t *testing.T) {
	need(t, "qemu-io")
	for _, p := range profile.Names() {
		t.Run(p, func(t *testing.T) {
			dir := t.TempDir()
			addr := freePort(t)
			d := startDaemon(t, dir, addr)
			if _, err := d.client().CreateVolume(api.Spec{Name: "v", Size: 64 << 20, Profile: p}); err != nil {
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
	for _, p := range profile.Names() {
		t.Run(p, func(t *testing.T) {
			name := "f-" + strings.ReplaceAll(p, "_", "-")
			if _, err := d.client().CreateVolume(api.Spec{Name: name, Size: 64 << 20, Profile: p}); err != nil {
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
