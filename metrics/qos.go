package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/qos"
)

var (
	throttledDesc = prometheus.NewDesc("blockd_volume_qos_throttled_seconds_total",
		"Total time requests of the volume spent waiting in QoS.", []string{"volume"}, nil)
	waitingDesc = prometheus.NewDesc("blockd_volume_qos_waiting_requests",
		"Requests of the volume waiting in QoS now.", []string{"volume"}, nil)
	limitDesc = prometheus.NewDesc("blockd_volume_qos_limit",
		"QoS limits in force, by kind (iops, read_iops, write_iops, bps, read_bps, write_bps: caps, 0 none; "+
			"burst: seconds; iops_reservation, bps_reservation: floors, 0 none; weight).",
		[]string{"volume", "kind"}, nil)
	capacityDesc = prometheus.NewDesc("blockd_qos_capacity",
		"Node capacity QoS schedules against, by kind (iops, bps; 0 unlimited).", []string{"kind"}, nil)
)

// QoS returns a prometheus.Collector exporting the QoS state of every
// volume on n at scrape time: register it once with the daemon's registry.
func QoS(n *qos.Node) prometheus.Collector { return qosCollector{n} }

type qosCollector struct{ n *qos.Node }

func (c qosCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- throttledDesc
	ch <- waitingDesc
	ch <- limitDesc
	ch <- capacityDesc
}

func (c qosCollector) Collect(ch chan<- prometheus.Metric) {
	cp := c.n.Capacity()
	ch <- prometheus.MustNewConstMetric(capacityDesc, prometheus.GaugeValue, float64(cp.IOPS), "iops")
	ch <- prometheus.MustNewConstMetric(capacityDesc, prometheus.GaugeValue, float64(cp.BPS), "bps")
	for _, st := range c.n.Stats() {
		ch <- prometheus.MustNewConstMetric(throttledDesc, prometheus.CounterValue, st.Throttled.Seconds(), st.Volume)
		ch <- prometheus.MustNewConstMetric(waitingDesc, prometheus.GaugeValue, float64(st.Waiting), st.Volume)
		for _, l := range st.LimitKinds() {
			ch <- prometheus.MustNewConstMetric(limitDesc, prometheus.GaugeValue, l.Value, st.Volume, l.Kind)
		}
	}
}
