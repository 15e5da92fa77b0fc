package daemon

import (
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

func TestProbesAPI(t *testing.T) {
	d, c := startTestDaemon(t, Config{Probes: true, ProbeDevices: ProbeDevicesAll})
	if d.probe == nil {
		t.Fatal("probes did not load on a host where eBPF works (see probe tests)")
	}
	snap, err := c.IOPods()
	if err != nil {
		t.Fatalf("GET /v1/io/pods: %v", err)
	}
	if snap.Time.IsZero() {
		t.Fatalf("snapshot without a time: %+v", snap)
	}
}

func TestProbesOffAPI(t *testing.T) {
	_, c := startTestDaemon(t, Config{})
	if _, err := c.IOPods(); !api.IsCode(err, api.CodeUnavailable) || !strings.Contains(err.Error(), "probes are off") {
		t.Fatalf("GET /v1/io/pods with probes off: %v", err)
	}
}
