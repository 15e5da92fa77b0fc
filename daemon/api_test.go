package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/volume"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startTestDaemon runs a daemon in this process on a fresh state dir, with
// no TCP listeners, no probes and no kernel devices (it never loads a
// module nor touches the host's nbd or ublk devices), and returns it with
// its API client.
func startTestDaemon(t *testing.T, cfg Config) (*Daemon, *api.Client) {
	t.Helper()
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = quietLog()
	}
	cfg.Kernel.Disabled = true
	cfg.Kernel.LoadModule = func(name string) error {
		t.Errorf("kernel devices are off, yet the daemon loaded module %s", name)
		return errors.New("test: no modules")
	}
	d, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown(context.Background()) })
	return d, api.NewClient(filepath.Join(cfg.StateDir, "blockd.sock"))
}

func TestAPIClientErrors(t *testing.T) {
	_, c := startTestDaemon(t, Config{})
	if _, err := c.CreateVolume(api.Spec{Name: "v1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		code api.Code
		text string
	}{
		{"dup", func() error { _, err := c.CreateVolume(api.Spec{Name: "v1", Size: 1 << 20}); return err }(), api.CodeExists, "volume v1 already exists"},
		{"bad name", func() error { _, err := c.CreateVolume(api.Spec{Name: "UPPER", Size: 1 << 20}); return err }(), api.CodeInvalid, `volume name "UPPER"`},
		{"missing", func() error { _, err := c.GetVolume("nope"); return err }(), api.CodeNotFound, "volume nope not found"},
		{"shrink", func() error { _, err := c.ResizeVolume("v1", 4096); return err }(), api.CodeInvalid, "shrinking is not supported"},
		{"delete missing", c.DeleteVolume("nope"), api.CodeNotFound, "volume nope not found"},
		{"bad qos", func() error {
			_, err := c.UpdateVolume("v1", api.UpdateRequest{QoS: json.RawMessage(`{"iops_limit": "lots"}`)})
			return err
		}(), api.CodeInvalid, "iops_limit"},
	} {
		var ae *api.Error
		if !errors.As(tc.err, &ae) || ae.Code != tc.code || !strings.HasPrefix(ae.Message, tc.text) && !strings.Contains(ae.Message, tc.text) {
			t.Errorf("%s: %v, want API error code %s saying %q", tc.name, tc.err, tc.code, tc.text)
		}
		for _, prefix := range []string{"invalid argument", "not found:", "conflict:", "already exists:"} {
			if ae != nil && strings.HasPrefix(ae.Message, prefix) {
				t.Errorf("%s: message %q starts with an internal sentinel", tc.name, ae.Message)
			}
		}
	}
}

// TestAPISameJSON: a volume is created from the JSON `volume get -o json`
// prints (sizes and QoS values as strings with units, or as numbers), and
// unknown fields are refused.
func TestAPISameJSON(t *testing.T) {
	_, c := startTestDaemon(t, Config{})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", c.Socket())
	}}}
	post := func(body string) (*http.Response, api.Volume) {
		t.Helper()
		resp, err := hc.Post("http://blockd/v1/volumes", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var vi api.Volume
		json.NewDecoder(resp.Body).Decode(&vi)
		return resp, vi
	}
	resp, vi := post(`{"name":"s","size":"2MiB","qos":{"iops_limit":"5k","bps_limit":"200MiB"}}`)
	if resp.StatusCode != http.StatusCreated || vi.Size != 2<<20 || vi.QoS.IOPS != 5000 || vi.QoS.BPS != 200<<20 {
		t.Fatalf("create with units: %s %+v", resp.Status, vi)
	}
	// What get printed creates the same volume under another name.
	printed, err := json.Marshal(vi)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.Unmarshal(printed, &m)
	for _, k := range []string{"size_human", "state", "path", "allocated_bytes", "effective_profile", "profile_stats"} {
		delete(m, k) // status fields: not part of a spec
	}
	m["name"] = "s2"
	again, _ := json.Marshal(m)
	resp, vi2 := post(string(again))
	if resp.StatusCode != http.StatusCreated || vi2.Size != vi.Size || vi2.QoS != vi.QoS || vi2.Profile != vi.Profile {
		t.Fatalf("create from printed JSON %s: %s %+v", again, resp.Status, vi2)
	}
	resp, _ = post(`{"name":"t","size":"2MiB","colour":"red"}`)
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("unknown field accepted: %s", resp.Status)
	}
}

// A live `volume set --profile` reaches the stage: volume get and the
// metric show the new effective profile, and writes buffered under
// sequential survive a switch to none and a restart.
func TestProfileLiveChange(t *testing.T) {
	dir := t.TempDir()
	d, c := startTestDaemon(t, Config{StateDir: dir})
	if _, err := c.CreateVolume(api.Spec{Name: "v", Size: 16 << 20, Profile: "random"}); err != nil {
		t.Fatal(err)
	}
	vi, err := c.GetVolume("v")
	if err != nil || vi.EffectiveProfile != "random" {
		t.Fatalf("effective profile after create = %q, %v", vi.EffectiveProfile, err)
	}
	seq := "sequential"
	if _, err := c.UpdateVolume("v", api.UpdateRequest{Profile: &seq}); err != nil {
		t.Fatal(err)
	}
	vi, err = c.GetVolume("v")
	if err != nil || vi.EffectiveProfile != "sequential" || vi.ProfileStats == nil || vi.ProfileStats.Configured != "sequential" {
		t.Fatalf("after set --profile sequential: %+v, %v", vi, err)
	}
	want := `
# HELP blockd_volume_effective_profile 1 for the io_profile in force on the volume (for auto, the one it learned), 0 for the others.
# TYPE blockd_volume_effective_profile gauge
blockd_volume_effective_profile{profile="db",volume="v"} 0
blockd_volume_effective_profile{profile="db_remote",volume="v"} 0
blockd_volume_effective_profile{profile="journal",volume="v"} 0
blockd_volume_effective_profile{profile="none",volume="v"} 0
blockd_volume_effective_profile{profile="random",volume="v"} 0
blockd_volume_effective_profile{profile="sequential",volume="v"} 1
`
	if err := testutil.GatherAndCompare(d.reg, strings.NewReader(want), "blockd_volume_effective_profile"); err != nil {
		t.Error(err)
	}
	v, _ := d.Volumes().Get("v")
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = 0xab
	}
	w := pipeline.Request{Op: pipeline.OpWrite, Offset: 8192, Length: 4096, Buf: buf}
	if err := v.Handle(context.Background(), &w); err != nil {
		t.Fatal(err)
	}
	none := "none"
	if _, err := c.UpdateVolume("v", api.UpdateRequest{Profile: &none}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	r := pipeline.Request{Op: pipeline.OpRead, Offset: 8192, Length: 4096, Buf: got}
	if err := v.Handle(context.Background(), &r); err != nil || got[0] != 0xab || got[4095] != 0xab {
		t.Fatalf("read after switching sequential -> none: %x..., %v", got[:4], err)
	}
	if err := d.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	m, err := volume.Open(volume.Options{Dir: dir, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	v2, _ := m.Get("v")
	clear(got)
	r = pipeline.Request{Op: pipeline.OpRead, Offset: 8192, Length: 4096, Buf: got}
	if err := v2.Handle(context.Background(), &r); err != nil || got[0] != 0xab {
		t.Fatalf("after close and reopen: %x..., %v; buffered write lost", got[:4], err)
	}
}
