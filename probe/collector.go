package probe

import (
	"github.com/blockd/blockd/probe/podio"

	"math"

	"github.com/prometheus/client_golang/prometheus"
)

// Histogram slots exported to Prometheus: upper bounds 2^10 ns (about
// 1µs) to 2^36 ns (about 69s). Faster requests fall in the first bucket,
// slower ones only in +Inf.
const (
	promFirstSlot = 9
	promLastSlot  = 35
)

var podLabels = []string{"pod_uid", "namespace", "pod", "container", "device"}

type collector struct {
	source func() (podio.Snapshot, error)

	readBytes, writeBytes, reads, writes, latency, lost *prometheus.Desc
}

// NewCollector exports snapshots from source as Prometheus metrics:
// blockd_pod_{read,write}_bytes_total, blockd_pod_{reads,writes}_total and
// the blockd_pod_io_latency_seconds histogram (every op class), labelled
// {pod_uid, namespace, pod, container, device}, plus
// blockd_probe_lost_events_total{reason}. Only cgroups inside a pod are
// exported; several cgroups with the same labels (nested inside one
// container) are summed. A cgroup's series disappear with it, because
// source (Probe.Snapshot) drops removed cgroups.
func NewCollector(source func() (podio.Snapshot, error)) prometheus.Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return &collector{
		source:     source,
		readBytes:  d("blockd_pod_read_bytes_total", "Bytes read by the pod's container from the device.", podLabels...),
		writeBytes: d("blockd_pod_write_bytes_total", "Bytes written by the pod's container to the device.", podLabels...),
		reads:      d("blockd_pod_reads_total", "Read requests completed for the pod's container.", podLabels...),
		writes:     d("blockd_pod_writes_total", "Write requests completed for the pod's container.", podLabels...),
		latency:    d("blockd_pod_io_latency_seconds", "Block request latency, start to completion, every op class.", podLabels...),
		lost:       d("blockd_probe_lost_events_total", "Completions the probes could not account.", "reason"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.readBytes, c.writeBytes, c.reads, c.writes, c.latency, c.lost} {
		ch <- d
	}
}

type podSeries struct {
	e      podio.Entry // summed counters; identity from the first entry
	labels []string
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	snap, err := c.source()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.reads, err)
		return
	}
	series := map[[5]string]*podSeries{}
	var order [][5]string
	for _, e := range snap.Entries {
		if e.PodUID == "" {
			continue
		}
		k := [5]string{e.PodUID, e.Namespace, e.Pod, e.Container, e.Device}
		s := series[k]
		if s == nil {
			s = &podSeries{labels: k[:], e: podio.Entry{Latency: make([]uint64, Slots)}}
			series[k] = s
			order = append(order, k)
		}
		s.e.Reads += e.Reads
		s.e.Writes += e.Writes
		s.e.ReadBytes += e.ReadBytes
		s.e.WriteBytes += e.WriteBytes
		s.e.LatencySumNs += e.LatencySumNs
		for i, n := range e.Latency {
			if i < Slots {
				s.e.Latency[i] += n
			}
		}
	}
	for _, k := range order {
		s := series[k]
		counter := func(d *prometheus.Desc, v uint64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), s.labels...)
		}
		counter(c.readBytes, s.e.ReadBytes)
		counter(c.writeBytes, s.e.WriteBytes)
		counter(c.reads, s.e.Reads)
		counter(c.writes, s.e.Writes)
		buckets := make(map[float64]uint64, promLastSlot-promFirstSlot+1)
		var cum, total uint64
		for i, n := range s.e.Latency {
			total += n
			cum += n
			if i >= promFirstSlot && i <= promLastSlot {
				buckets[math.Ldexp(1, i+1)/1e9] = cum
			}
		}
		ch <- prometheus.MustNewConstHistogram(c.latency, total, float64(s.e.LatencySumNs)/1e9, buckets, s.labels...)
	}
	ch <- prometheus.MustNewConstMetric(c.lost, prometheus.CounterValue, float64(snap.StatsFull), "stats_full")
	ch <- prometheus.MustNewConstMetric(c.lost, prometheus.CounterValue, float64(snap.Unmatched), "unmatched")
	ch <- prometheus.MustNewConstMetric(c.lost, prometheus.CounterValue, float64(snap.NoSlot), "no_slot")
}
