package blockd

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// startAPI serves the control API of m on a unix socket and returns it.
func startAPI(t *testing.T, m *Manager) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: newAPIHandler(m, nil, nil, nil)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func run(t *testing.T, sock string, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(append(args, "--api-socket", sock), &out, &errb)
	return out.String(), errb.String(), code
}

func TestAPIClientErrors(t *testing.T) {
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	c := NewClient(startAPI(t, m))
	if _, err := c.CreateVolume(CreateRequest{Name: "v1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		code string
	}{
		{"dup", func() error { _, err := c.CreateVolume(CreateRequest{Name: "v1", Size: 1 << 20}); return err }(), CodeExists},
		{"bad name", func() error { _, err := c.CreateVolume(CreateRequest{Name: "UPPER", Size: 1 << 20}); return err }(), CodeInvalid},
		{"missing", func() error { _, err := c.GetVolume("nope"); return err }(), CodeNotFound},
		{"shrink", func() error { _, err := c.ResizeVolume("v1", 4096); return err }(), CodeInvalid},
		{"delete missing", c.DeleteVolume("nope"), CodeNotFound},
	} {
		var ae *APIError
		if !errors.As(tc.err, &ae) || ae.Code != tc.code {
			t.Errorf("%s: %v, want API error code %s", tc.name, tc.err, tc.code)
		}
	}
}

func TestAPISizeAsString(t *testing.T) {
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	sock := startAPI(t, m)
	hc := NewClient(sock).hc
	resp, err := hc.Post("http://blockd/v1/volumes", "application/json", strings.NewReader(`{"name":"s","size":"2MiB"}`))
	if err != nil {
		t.Fatal(err)
	}
	var vi VolumeInfo
	json.NewDecoder(resp.Body).Decode(&vi)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated || vi.Size != 2<<20 {
		t.Fatalf("create with size string: %s %+v", resp.Status, vi)
	}
	resp, err = hc.Post("http://blockd/v1/volumes", "application/json", strings.NewReader(`{"name":"t","size":"2MiB","colour":"red"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("unknown field accepted: %s", resp.Status)
	}
}

func TestCLI(t *testing.T) {
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	sock := startAPI(t, m)

	out, errs, code := run(t, sock, "volume", "create", "demo", "--size", "1GiB")
	if code != 0 || !strings.Contains(out, "demo") || !strings.Contains(out, "1GiB") {
		t.Fatalf("create: code %d out %q err %q", code, out, errs)
	}
	_, errs, code = run(t, sock, "volume", "create", "demo", "--size", "1GiB")
	if code != 1 || !strings.Contains(errs, "already exists") {
		t.Fatalf("duplicate create: code %d err %q", code, errs)
	}
	_, errs, code = run(t, sock, "volume", "create", "x", "--size", "lots")
	if code != 1 || !strings.Contains(errs, "size") {
		t.Fatalf("bad size: code %d err %q", code, errs)
	}
	_, errs, code = run(t, sock, "volume", "create", "x")
	if code != 1 || !strings.Contains(errs, "--size is required") {
		t.Fatalf("missing size: code %d err %q", code, errs)
	}
	_, errs, code = run(t, sock, "volume", "create", "x", "--size", "1GiB", "--engine", "tape")
	if code != 1 || !strings.Contains(errs, "unknown engine") {
		t.Fatalf("unknown engine: code %d err %q", code, errs)
	}
	out, _, code = run(t, sock, "volume", "resize", "demo", "--size", "2GiB", "-o", "json")
	var vi VolumeInfo
	if code != 0 || json.Unmarshal([]byte(out), &vi) != nil || vi.Size != 2<<30 {
		t.Fatalf("resize: code %d out %q", code, out)
	}
	_, errs, code = run(t, sock, "volume", "resize", "demo", "--size", "1GiB")
	if code != 1 || !strings.Contains(errs, "shrinking is not supported") {
		t.Fatalf("shrink: code %d err %q", code, errs)
	}
	out, _, code = run(t, sock, "volume", "set", "demo", "--profile", "db", "--read-only")
	if code != 0 || !strings.Contains(out, "db") || !strings.Contains(out, "ro") {
		t.Fatalf("set: code %d out %q", code, out)
	}
	out, _, code = run(t, sock, "volume", "list", "-o", "json")
	var vs []VolumeInfo
	if code != 0 || json.Unmarshal([]byte(out), &vs) != nil || len(vs) != 1 || vs[0].Profile != "db" || !vs[0].ReadOnly {
		t.Fatalf("list: code %d out %q", code, out)
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
	_, errs, code = run(t, sock, "volume", "frobnicate")
	if code != 2 || !strings.Contains(errs, "unknown volume command") {
		t.Fatalf("unknown subcommand: code %d err %q", code, errs)
	}
}

func TestCLINoDaemon(t *testing.T) {
	var out, errb bytes.Buffer
	code := Main([]string{"volume", "list", "--api-socket", filepath.Join(t.TempDir(), "none.sock")}, &out, &errb)
	if code != 1 || !strings.Contains(errb.String(), "is `blockd serve` running?") {
		t.Fatalf("no daemon: code %d err %q", code, errb.String())
	}
}

func TestCLIQoS(t *testing.T) {
	dir := t.TempDir()
	d, err := Start(Config{StateDir: dir, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(t.Context())
	sock := filepath.Join(dir, "blockd.sock")
	_, errs, code := run(t, sock, "volume", "create", "q", "--size", "1GiB", "--iops-limit", "5000", "--bps-limit", "200MiB")
	if code != 0 {
		t.Fatalf("create with QoS: %d %s", code, errs)
	}
	out, errs, code := run(t, sock, "volume", "set", "q", "--iops-reservation", "1000", "--weight", "3", "-o", "json")
	var vi VolumeInfo
	if code != 0 || json.Unmarshal([]byte(out), &vi) != nil {
		t.Fatalf("set: %d %s %s", code, out, errs)
	}
	if vi.QoS.IOPS != 5000 || vi.QoS.BPS != 200<<20 || vi.QoS.IOPSReservation != 1000 || vi.QoS.Weight != 3 {
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
	got, err := NewClient(sock).GetVolume("q")
	if err != nil || got.QoS != vi.QoS {
		t.Fatalf("refused changes altered the limits: %+v, %v", got.QoS, err)
	}
	if _, _, code := run(t, sock, "volume", "set", "q", "--iops-limit", "none", "--iops-reservation", "0"); code != 0 {
		t.Fatal("clearing limits failed")
	}
	d.Shutdown(t.Context())
	// Limits are persisted.
	d, err = Start(Config{StateDir: dir, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	got, err = NewClient(sock).GetVolume("q")
	if err != nil || got.QoS.IOPS != 0 || got.QoS.BPS != 200<<20 || got.QoS.Weight != 3 {
		t.Fatalf("limits after restart: %+v, %v", got.QoS, err)
	}
}
