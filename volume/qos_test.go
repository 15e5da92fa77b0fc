package volume

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/metrics"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/qos"
)

func openQoSManager(t *testing.T, c qos.Capacity, log *slog.Logger) *Registry {
	t.Helper()
	qn, err := qos.NewNode(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qn.Close() })
	m, err := Open(Options{Dir: t.TempDir(), Log: log, Metrics: metrics.NewVolumes(prometheus.NewRegistry()), QoS: qn})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// The journal io_profile has priority in the QoS stage, set at create and
// following live profile changes.
func TestJournalProfileHasQoSPriority(t *testing.T) {
	m := openQoSManager(t, qos.Capacity{IOPS: 10000}, quietLog())
	if _, err := m.Create(api.Spec{Name: "j", Size: 1 << 20, Engine: "memory", Profile: "journal"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(api.Spec{Name: "r", Size: 1 << 20, Engine: "memory", Profile: "random"}); err != nil {
		t.Fatal(err)
	}
	prio := func(name string) bool {
		v, err := m.Get(name)
		if err != nil {
			t.Fatal(err)
		}
		return v.qos.Priority()
	}
	if !prio("j") || prio("r") {
		t.Fatalf("priority: journal volume %v, random volume %v; want true, false", prio("j"), prio("r"))
	}
	for _, step := range []struct {
		name, profile string
		want          bool
	}{{"j", "random", false}, {"r", "journal", true}} {
		if _, err := m.Update(step.name, func(s *api.Spec) error { s.Profile = step.profile; return nil }); err != nil {
			t.Fatal(err)
		}
		if got := prio(step.name); got != step.want {
			t.Fatalf("%s after set --profile %s: priority %v, want %v", step.name, step.profile, got, step.want)
		}
	}
}

// A reservation or weight on a node with unlimited capacity cannot act:
// the daemon says so in its log instead of accepting it silently.
func TestReservationWithoutCapacityWarns(t *testing.T) {
	var buf bytes.Buffer
	m := openQoSManager(t, qos.Capacity{}, slog.New(slog.NewTextHandler(&buf, nil)))
	if _, err := m.Create(api.Spec{Name: "v", Size: 1 << 20, Engine: "memory", QoS: qos.Limits{IOPSReservation: 500}}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "iops reservation has no effect") {
		t.Fatalf("no warning for a reservation without node capacity; log:\n%s", buf.String())
	}
	buf.Reset()
	if _, err := m.Update("v", func(s *api.Spec) error { s.QoS = qos.Limits{IOPS: 1000}; return nil }); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "no effect") {
		t.Fatalf("a cap warned, but caps work without node capacity; log:\n%s", buf.String())
	}
}
