package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

// blockdCLI runs a blockd client command (this test binary doubles as
// blockd) against d and returns its stdout.
func (d *daemonProc) cli(args ...string) string {
	d.t.Helper()
	cmd := exec.Command(os.Args[0], append(args, "--api-socket", d.sock)...)
	cmd.Env = append(os.Environ(), "BLOCKD_TEST_AS_DAEMON=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		d.t.Fatalf("blockd %v: %v\n%s%s", args, err, out, stderr.Bytes())
	}
	return string(out)
}

// TestOperatorDamagedStateDir is the hardening acceptance as an operator
// would try it: with a daemon's volumes written, stop it, delete one
// volume's backing file and corrupt another's metadata, start it again:
// serve starts, both are listed as failed with their reasons, the third
// volume serves its data, and nothing was recreated or deleted.
func TestOperatorDamagedStateDir(t *testing.T) {
	need(t, "qemu-io")
	dir := t.TempDir()
	addr := freePort(t)
	d := startDaemon(t, dir, addr)
	for _, n := range []string{"nofile", "badmeta", "healthy"} {
		if _, err := d.client().CreateVolume(api.Spec{Name: n, Size: 16 << 20}); err != nil {
			t.Fatal(err)
		}
		qemuIO(t, d.uri(n), "write -P 0x3c 0 1M", "flush")
	}
	d.stop()

	img := filepath.Join(dir, "data", "nofile.img")
	meta := filepath.Join(dir, "volumes", "badmeta.json")
	if err := os.Remove(img); err != nil {
		t.Fatal(err)
	}
	garbage := []byte(`{"name": "badmeta", "size": ` + "\x00\x00garbage")
	if err := os.WriteFile(meta, garbage, 0o600); err != nil {
		t.Fatal(err)
	}
	before := listDir(t, dir)

	d = startDaemon(t, dir, addr)
	var vs []api.Volume
	if err := json.Unmarshal([]byte(d.cli("volume", "list", "-o", "json")), &vs); err != nil {
		t.Fatal(err)
	}
	state := map[string]api.Volume{}
	for _, v := range vs {
		state[v.Name] = v
	}
	if v := state["nofile"]; v.State != api.StateFailed || !strings.Contains(v.Reason, "backing file "+img+" is missing") {
		t.Errorf("nofile: %+v", v)
	}
	if v := state["badmeta"]; v.State != api.StateFailed || !strings.Contains(v.Reason, "badmeta.json is corrupt") {
		t.Errorf("badmeta: %+v", v)
	}
	if v := state["healthy"]; v.State != api.StateOK {
		t.Errorf("healthy: %+v", v)
	}
	table := d.cli("volume", "list")
	for _, want := range []string{"nofile  failed*", "badmeta  failed*", "* nofile: backing file", "* badmeta: metadata"} {
		if !strings.Contains(strings.Join(strings.Fields(table), "  "), strings.Join(strings.Fields(want), "  ")) {
			t.Errorf("volume list lacks %q:\n%s", want, table)
		}
	}
	qemuIO(t, d.uri("healthy"), "read -P 0x3c 0 1M", "write -P 0x4d 1M 1M", "flush", "read -P 0x4d 1M 1M")
	if after := listDir(t, dir); after != before {
		t.Errorf("the state dir changed at start:\nbefore %s\nafter  %s", before, after)
	}
	if b, err := os.ReadFile(meta); err != nil || !bytes.Equal(b, garbage) {
		t.Errorf("the corrupt metadata was rewritten: %q, %v", b, err)
	}
	if !strings.Contains(d.log.String(), `level=ERROR msg="volume failed to load; it serves no I/O until repaired or deleted" volume=nofile`) {
		t.Errorf("no error log line for nofile:\n%s", d.log)
	}
	// The operator deletes the damaged volumes; the healthy one stays.
	d.cli("volume", "delete", "nofile")
	d.cli("volume", "delete", "badmeta")
	if out := d.cli("volume", "list"); strings.Contains(out, "failed") || !strings.Contains(out, "healthy") {
		t.Errorf("after deleting the failed volumes:\n%s", out)
	}
}

// listDir lists the volume and data files of a state dir with their sizes.
func listDir(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	for _, sub := range []string{"volumes", "data"} {
		ents, err := os.ReadDir(filepath.Join(dir, sub))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			info, _ := e.Info()
			fmt.Fprintf(&b, "%s/%s:%d ", sub, e.Name(), info.Size())
		}
	}
	return b.String()
}
