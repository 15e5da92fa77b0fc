package metrics

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blockd/blockd/qos"
)

func TestCollector(t *testing.T) {
	n, err := qos.NewNode(qos.Capacity{IOPS: 50000})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	v, err := n.Volume("vol1", qos.Limits{IOPS: 1, IOPSReservation: 1, Burst: 2})
	if err != nil {
		t.Fatal(err)
	}
	v.Wait(context.Background(), false, 0)
	v.Wait(context.Background(), false, 0) // burst 2: both pass at once
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(QoS(n))
	want := `
# HELP blockd_volume_qos_waiting_requests Requests of the volume waiting in QoS now.
# TYPE blockd_volume_qos_waiting_requests gauge
blockd_volume_qos_waiting_requests{volume="vol1"} 0
# HELP blockd_qos_capacity Node capacity QoS schedules against, by kind (iops, bps; 0 unlimited).
# TYPE blockd_qos_capacity gauge
blockd_qos_capacity{kind="bps"} 0
blockd_qos_capacity{kind="iops"} 50000
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "blockd_volume_qos_waiting_requests", "blockd_qos_capacity"); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "blockd_volume_qos_limit" {
			continue
		}
		for _, m := range mf.Metric {
			for _, lp := range m.Label {
				if lp.GetName() == "kind" {
					got[lp.GetValue()] = m.GetGauge().GetValue()
				}
			}
		}
	}
	for kind, v := range map[string]float64{"iops": 1, "read_iops": 0, "burst": 2, "iops_reservation": 1, "weight": qos.DefaultWeight} {
		if got[kind] != v {
			t.Errorf("blockd_volume_qos_limit{kind=%q} = %v, want %v (all: %v)", kind, got[kind], v, got)
		}
	}
	if len(got) != 10 {
		t.Errorf("%d limit kinds exported, want 10: %v", len(got), got)
	}
}
