package probe

import (
	"github.com/blockd/blockd/probe/podio/podiotest"

	"github.com/blockd/blockd/probe/podio"

	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func TestCollector(t *testing.T) {
	_, cur := podiotest.Snapshots()
	// A nested cgroup inside web-0's container must add to its series.
	nested := cur.Entries[0]
	nested.CgroupID, nested.Cgroup = 101, nested.Cgroup+"/sub"
	nested.Reads, nested.ReadBytes, nested.Writes, nested.WriteBytes = 10, 40960, 1, 512
	nested.Latency, nested.LatencySumNs = podiotest.Hist(map[int]uint64{8: 11}), 3000
	cur.Entries = append(cur.Entries, nested)
	cur.StatsFull = 7

	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(NewCollector(func() (podio.Snapshot, error) { return cur, nil })); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]map[string]*dto.Metric{} // family -> pod/device -> metric
	for _, mf := range mfs {
		got[mf.GetName()] = map[string]*dto.Metric{}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			got[mf.GetName()][l["pod_uid"]+"|"+l["device"]+"|"+l["reason"]] = m
		}
	}
	web := "0b7d8a4c|nbd0|"
	if v := got["blockd_pod_reads_total"][web].GetCounter().GetValue(); v != 6010 {
		t.Errorf("web reads %v, want 6010 (two cgroups summed)", v)
	}
	if v := got["blockd_pod_read_bytes_total"][web].GetCounter().GetValue(); v != 6000*4096+40960 {
		t.Errorf("web read bytes %v", v)
	}
	if v := got["blockd_pod_writes_total"][web].GetCounter().GetValue(); v != 1 {
		t.Errorf("web writes %v, want 1", v)
	}
	if v := got["blockd_pod_write_bytes_total"]["5f3c2b1a-7d6e-4c8b-9a0f-bbbbbbbbbbbb|ublkb1|"].GetCounter().GetValue(); v != 2010*131072 {
		t.Errorf("db write bytes %v", v)
	}
	for _, lp := range got["blockd_pod_reads_total"][web].GetLabel() {
		want := map[string]string{"pod_uid": "0b7d8a4c", "namespace": "team-a", "pod": "web-0",
			"container": "1111111111111111", "device": "nbd0"}[lp.GetName()]
		if lp.GetValue() != want {
			t.Errorf("label %s=%q, want %q", lp.GetName(), lp.GetValue(), want)
		}
	}
	h := got["blockd_pod_io_latency_seconds"][web].GetHistogram()
	if h.GetSampleCount() != 6011 {
		t.Errorf("histogram count %d, want 6011", h.GetSampleCount())
	}
	if h.GetSampleSum() != 3000e-9 {
		t.Errorf("histogram sum %v", h.GetSampleSum())
	}
	for _, b := range h.GetBucket() {
		var want uint64
		switch ub := b.GetUpperBound(); {
		case ub < 131072e-9: // below slot 16's upper bound: the 11 fast ones
			want = 11
		case ub < 2097152e-9: // slot 16
			want = 11 + 5950
		default:
			want = 6011
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("bucket le=%g: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
		}
	}
	if _, ok := got["blockd_pod_reads_total"]["|nbd0|"]; ok {
		t.Error("host cgroup exported as a pod")
	}
	if v := got["blockd_probe_lost_events_total"]["||stats_full"].GetCounter().GetValue(); v != 7 {
		t.Errorf("lost stats_full %v, want 7", v)
	}
}

func TestCollectorSourceError(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(func() (podio.Snapshot, error) { return podio.Snapshot{}, errors.New("maps gone") }))
	if _, err := reg.Gather(); err == nil {
		t.Error("gather succeeded although the snapshot failed")
	}
}

func TestStatsEntriesFitTheBudget(t *testing.T) {
	for _, c := range []struct {
		ncpu int
		want uint32
	}{{2, 16384}, {8, 16384}, {64, 3048}, {128, 1524}, {1024, 1024}} {
		if got := statsEntries(16384, 344, c.ncpu); got != c.want {
			t.Errorf("statsEntries(16384, 344, %d) = %d, want %d", c.ncpu, got, c.want)
		}
	}
}
