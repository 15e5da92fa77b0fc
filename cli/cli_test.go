package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/attach"
	"github.com/blockd/blockd/daemon"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// errNoModules stands in for a host without the kernel modules: the tests
// never load or touch the host's nbd or ublk driver.
var errNoModules = errors.New("load module: not found in /lib/modules/6.99-test")

// startDaemon runs a daemon in this process (no TCP listeners, no probes,
// no kernel modules) and returns its API socket.
func startDaemon(t *testing.T, dir string) string {
	t.Helper()
	d, err := daemon.Start(daemon.Config{StateDir: dir, Logger: quietLog(),
		Kernel: attach.Options{LoadModule: func(string) error { return errNoModules }}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown(context.Background()) })
	return filepath.Join(dir, "blockd.sock")
}

// run runs the blockd command line against the daemon on sock.
func run(t *testing.T, sock string, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	if sock != "" {
		args = append(args, "--api-socket", sock)
	}
	code := Main(args, &out, &errb)
	return out.String(), errb.String(), code
}

func TestCLI(t *testing.T) {
	sock := startDaemon(t, t.TempDir())

	out, errs, code := run(t, sock, "volume", "create", "demo", "--size", "1GiB")
	if code != 0 || !strings.Contains(out, "demo") || !strings.Contains(out, "1GiB") {
		t.Fatalf("create: code %d out %q err %q", code, out, errs)
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"volume", "create", "demo", "--size", "1GiB"}, 1, "volume demo already exists"},
		{[]string{"volume", "create", "x", "--size", "lots"}, 2, `--size: size "lots"`},
		{[]string{"volume", "create", "x"}, 2, "--size is required"},
		{[]string{"volume", "create", "x", "--size", "1GiB", "--engine", "tape"}, 1, `unknown engine "tape" (want file or memory)`},
		{[]string{"volume", "create", "x", "--size", "1GiB", "--iops-limit", "lots"}, 2, `iops-limit "lots" is not a whole number`},
		{[]string{"volume", "create", "--size", "1GiB"}, 2, "takes one volume NAME"},
		{[]string{"volume", "resize", "demo", "--size", "512MiB"}, 1, "shrinking is not supported"},
		{[]string{"volume", "set", "demo"}, 2, "nothing to change"},
		{[]string{"volume", "get", "nope"}, 1, "volume nope not found"},
		{[]string{"volume", "list", "-o", "yaml"}, 2, `--output "yaml"`},
		{[]string{"volume", "frobnicate"}, 2, `unknown command "frobnicate" for "blockd volume"`},
		{[]string{"volume", "craete"}, 2, "did you mean create?"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate" for "blockd"`},
		{[]string{"volume", "move", "demo"}, 2, "--to NODE is required"},
		{[]string{"volume", "move", "demo", "--to", "n2"}, 1, "this daemon is not in a cluster"},
		{[]string{"node", "list", "-o", "json"}, 1, "this daemon is not in a cluster"},
	} {
		s := sock
		if len(tc.args) < 3 {
			s = "" // a group command has no --api-socket
		}
		_, errs, code := run(t, s, tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.want) {
			t.Errorf("blockd %v: code %d, stderr %q; want code %d mentioning %q", tc.args, code, errs, tc.code, tc.want)
		}
		for _, sentinel := range []string{"invalid argument:", "conflict:", "not found:", "already exists:"} {
			if strings.Contains(errs, sentinel) {
				t.Errorf("blockd %v: stderr %q carries an internal sentinel", tc.args, errs)
			}
		}
	}
	out, _, code = run(t, sock, "volume", "resize", "demo", "--size", "2GiB", "-o", "json")
	var vi api.Volume
	if code != 0 || json.Unmarshal([]byte(out), &vi) != nil || vi.Size != 2<<30 {
		t.Fatalf("resize: code %d out %q", code, out)
	}
	out, _, code = run(t, sock, "volume", "set", "demo", "--profile", "db", "--read-only")
	if code != 0 || !strings.Contains(out, "db") || !strings.Contains(out, "ro") {
		t.Fatalf("set: code %d out %q", code, out)
	}
	out, _, code = run(t, sock, "volume", "list", "-o", "json")
	var vs []api.Volume
	if code != 0 || json.Unmarshal([]byte(out), &vs) != nil || len(vs) != 1 || vs[0].Profile != "db" || !vs[0].ReadOnly || vs[0].State != api.StateOK {
		t.Fatalf("list: code %d out %q", code, out)
	}
	out, _, code = run(t, sock, "volume", "set", "demo", "--read-only=false", "-o", "json")
	if code != 0 || json.Unmarshal([]byte(out), &vi) != nil || vi.ReadOnly {
		t.Fatalf("set --read-only=false: code %d out %q", code, out)
	}
	out, _, code = run(t, sock, "volume", "get", "demo")
	if code != 0 || !strings.Contains(out, "NAME") || !strings.Contains(out, "2GiB") {
		t.Fatalf("get: code %d out %q", code, out)
	}
	out, _, code = run(t, sock, "volume", "delete", "demo")
	if code != 0 || !strings.Contains(out, "deleted") {
		t.Fatalf("delete: code %d out %q", code, out)
	}
	_, errs, code = run(t, sock, "volume", "get", "demo")
	if code != 1 || !strings.Contains(errs, "not found") {
		t.Fatalf("get after delete: code %d err %q", code, errs)
	}
}

// TestHelp: --help at every level prints to stdout and exits 0; usage
// lists every flag with its unit.
func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"Usage:", "serve", "volume", "attach", "version", "completion"}},
		{[]string{}, []string{"Usage:", "serve"}},
		{[]string{"help", "volume"}, []string{"create", "list"}},
		{[]string{"volume", "--help"}, []string{"create", "delete", "resize", "set"}},
		{[]string{"volume", "create", "--help"}, []string{"--size", "10GiB", "--iops-limit", "5k", "--engine", "--profile", "db_remote"}},
		{[]string{"volume", "set", "--help"}, []string{"--burst", "seconds", "--bps-limit", "200MiB", "--weight", "--read-only"}},
		{[]string{"serve", "--help"}, []string{"--state-dir", "--kernel-devices", "pure network NBD server", "--nbd-timeout", "--qos-capacity-iops", "50k", "--qos-capacity-bps", "--log-format"}},
		{[]string{"attach", "-h"}, []string{"--frontend", "--connections"}},
	} {
		out, errs, code := run(t, "", tc.args...)
		if code != 0 || errs != "" {
			t.Errorf("blockd %v: code %d, stderr %q; want 0 and nothing on stderr", tc.args, code, errs)
		}
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("blockd %v: stdout lacks %q:\n%s", tc.args, w, out)
			}
		}
	}
}

func TestVersion(t *testing.T) {
	out, errs, code := run(t, "", "version")
	if code != 0 || !strings.HasPrefix(out, "blockd "+version+" (commit ") || errs != "" {
		t.Fatalf("version: code %d out %q err %q", code, out, errs)
	}
}

func TestCompletion(t *testing.T) {
	out, _, code := run(t, "", "completion", "bash")
	if code != 0 || !strings.Contains(out, "__start_blockd") {
		t.Fatalf("completion bash: code %d, %d bytes", code, len(out))
	}
}

func TestCLINoDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, errs, code := run(t, sock, "volume", "list")
	want := "blockd is not running at " + sock + " (start it with `blockd serve`"
	if code != 1 || !strings.Contains(errs, want) {
		t.Fatalf("no daemon: code %d err %q, want %q", code, errs, want)
	}
}

func TestCLIQoS(t *testing.T) {
	dir := t.TempDir()
	sock := startDaemon(t, dir)
	_, errs, code := run(t, sock, "volume", "create", "q", "--size", "1GiB", "--iops-limit", "5k", "--bps-limit", "200MiB")
	if code != 0 {
		t.Fatalf("create with QoS: %d %s", code, errs)
	}
	out, errs, code := run(t, sock, "volume", "set", "q", "--iops-reservation", "1000", "--weight", "3", "--burst", "1.5", "-o", "json")
	var vi api.Volume
	if code != 0 || json.Unmarshal([]byte(out), &vi) != nil {
		t.Fatalf("set: %d %s %s", code, out, errs)
	}
	if vi.QoS.IOPS != 5000 || vi.QoS.BPS != 200<<20 || vi.QoS.IOPSReservation != 1000 || vi.QoS.Weight != 3 || vi.QoS.Burst != 1.5 {
		t.Fatalf("limits after set: %+v", vi.QoS)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--iops-limit", "-5"}, "negative"},
		{[]string{"--iops-limit", "lots"}, "iops-limit"},
		{[]string{"--iops-reservation", "6000"}, "exceeds"},
	} {
		_, errs, code := run(t, sock, append([]string{"volume", "set", "q"}, tc.args...)...)
		if code == 0 || !strings.Contains(errs, tc.want) {
			t.Errorf("volume set %v: code %d, stderr %q; want refusal mentioning %q", tc.args, code, errs, tc.want)
		}
	}
	got, err := api.NewClient(sock).GetVolume("q")
	if err != nil || got.QoS != vi.QoS {
		t.Fatalf("refused changes altered the limits: %+v, %v", got.QoS, err)
	}
	if _, _, code := run(t, sock, "volume", "set", "q", "--iops-limit", "none", "--iops-reservation", "0"); code != 0 {
		t.Fatal("clearing limits failed")
	}
	out, _, _ = run(t, sock, "volume", "get", "q")
	if !strings.Contains(out, "bps-limit=200MiB/s") || !strings.Contains(out, "burst=1.5s") || strings.Contains(out, "iops-limit=") {
		t.Fatalf("QOS column: %s", out)
	}
}

// blockd top needs the probes; with them off it says so.
func TestTopWithoutProbes(t *testing.T) {
	sock := startDaemon(t, t.TempDir())
	_, errs, code := run(t, sock, "top")
	if code != 1 || !strings.Contains(errs, "probes are off") {
		t.Fatalf("blockd top with probes off: code %d, stderr %q", code, errs)
	}
}

// The cluster flags of serve are checked before anything starts.
func TestServeClusterFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--cluster", "etcd=http://127.0.0.1:1"}, "--peer and --cluster need --node"},
		{[]string{"--node", "n1", "--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c", "--cluster", "http://127.0.0.1:1"}, "want etcd=URL[,URL...]"},
		{[]string{"--node", "n1", "--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c", "--cluster", "etcd=127.0.0.1:2379"}, "is not an http:// or https:// URL"},
		{[]string{"--node", "n1", "--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c", "--cluster", "etcd=http://x:1", "--lease-ttl", "1s"}, "--lease-ttl 1s: want at least 2s"},
		{[]string{"--node", "n1", "--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c", "--cluster", "etcd=http://x:1", "--label", "zone"}, `--label "zone": want key=value`},
		{[]string{"--label", "zone=a"}, "--label needs --cluster"},
		{[]string{"--etcd-ca", "ca.crt"}, "need --cluster"},
	} {
		_, errs, code := run(t, "", append([]string{"serve", "--state-dir", dir}, tc.args...)...)
		if code != 2 || !strings.Contains(errs, tc.want) {
			t.Errorf("serve %v: code %d, stderr %q; want code 2 mentioning %q", tc.args, code, errs, tc.want)
		}
	}
}
