package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// TestBlockStatusThroughDaemon: a libnbd client (nbdsh) writes 4 KiB into
// a sequential volume of a running daemon and, on the same connection and
// before any flush, asks BLOCK_STATUS: the write, still in the write-back
// buffer, is data; a file volume's never-written ranges are holes; after a
// flush the write is data in the engine and the rest is hole. The same
// on an encrypted volume: its holes stay holes.
func TestBlockStatusThroughDaemon(t *testing.T) {
	need(t, "nbdsh")
	d := startDaemonWith(t, t.TempDir(), freePort(t), "--kek-file", kekFile(t))
	for _, vol := range []string{"seq", "encrypted"} {
		t.Run(vol, func(t *testing.T) { blockStatus(t, d, vol) })
	}
}

func blockStatus(t *testing.T, d *daemonProc, vol string) {
	spec := api.Spec{Name: vol, Size: 16 << 20, Profile: "sequential"}
	if vol == "encrypted" {
		spec.Encryption = &api.Encryption{}
	}
	if _, err := d.client().CreateVolume(spec); err != nil {
		t.Fatal(err)
	}
	// Prints one line per extent, "offset length flags", for each query.
	script := `
import sys
def show(tag):
    off = [0]
    def cb(meta, offset, entries, err):
        for i in range(0, len(entries), 2):
            print(tag, off[0] + offset, entries[i], entries[i+1])
            off[0] += entries[i]
    h.block_status(h.get_size(), 0, cb)
h.pwrite(b"\x5a" * 4096, 8 << 20)
show("buffered")
h.flush()
show("flushed")
`
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nbdsh", "--base-allocation", "-u", d.uri(vol), "-c", script)
	// The libnbd bindings live in the system python3.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nbdsh: %v\n%s", err, out)
	}
	type ext struct {
		off, n int64
		flags  string
	}
	got := map[string][]ext{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var tag, flags string
		var off, n int64
		if _, err := fmt.Sscan(line, &tag, &off, &n, &flags); err != nil {
			t.Fatalf("nbdsh output line %q: %v\n%s", line, err, out)
		}
		got[tag] = append(got[tag], ext{off, n, flags})
	}
	covers := func(tag string, at int64, wantFlags string) {
		t.Helper()
		for _, x := range got[tag] {
			if x.off <= at && at < x.off+x.n {
				if x.flags != wantFlags {
					t.Errorf("%s: byte %d is in extent %+v, want flags %s\n%s", tag, at, x, wantFlags, out)
				}
				return
			}
		}
		t.Errorf("%s: no extent covers byte %d\n%s", tag, at, out)
	}
	covers("buffered", 8<<20, "0")
	covers("buffered", 0, "3")
	covers("buffered", 12<<20, "3")
	covers("flushed", 8<<20, "0")
	covers("flushed", 0, "3")
	covers("flushed", 12<<20, "3")
}
