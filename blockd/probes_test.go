package blockd

import (
	"path/filepath"
	"testing"
)

func TestProbesAPI(t *testing.T) {
	dir := t.TempDir()
	d, err := Start(Config{StateDir: dir, Logger: quietLog(), Probes: true, ProbeDevices: ProbeDevicesAll})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(t.Context())
	if d.probe == nil {
		t.Fatal("probes did not load on a host where eBPF works (see probe tests)")
	}
	snap, err := NewClient(filepath.Join(dir, "blockd.sock")).IOPods()
	if err != nil {
		t.Fatalf("GET /v1/io/pods: %v", err)
	}
	if snap.Time.IsZero() {
		t.Fatalf("snapshot without a time: %+v", snap)
	}
}

func TestProbesOffAPI(t *testing.T) {
	dir := t.TempDir()
	d, err := Start(Config{StateDir: dir, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown(t.Context())
	_, errs, code := run(t, filepath.Join(dir, "blockd.sock"), "top")
	if code != 1 || errs == "" {
		t.Fatalf("blockd top with probes off: code %d, stderr %q", code, errs)
	}
}
