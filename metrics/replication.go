package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/api"
)

var (
	replicaStateDesc = prometheus.NewDesc("blockd_replica_state",
		"1 for the state each replica of a volume owned by this node is in (in-sync, resyncing, out-of-sync, unreachable), 0 for the others.",
		[]string{"volume", "replica", "state"}, nil)
	replicaLeftDesc = prometheus.NewDesc("blockd_replica_resync_bytes_left",
		"Bytes a replica still has to receive (or compare) before it is in sync.", []string{"volume", "replica"}, nil)
	replicaRateDesc = prometheus.NewDesc("blockd_replica_resync_rate_bytes",
		"Bytes per second a replica's resync copied over its last second.", []string{"volume", "replica"}, nil)
	replicaCopiedDesc = prometheus.NewDesc("blockd_replica_resync_bytes_total",
		"Bytes resyncs sent to a replica since this daemon started.", []string{"volume", "replica"}, nil)
	replicaEpochDesc = prometheus.NewDesc("blockd_volume_epoch",
		"The owner epoch of a replicated volume as this node knows it.", []string{"volume", "role"}, nil)
	replicaGenDesc = prometheus.NewDesc("blockd_volume_generation",
		"The in-sync generation of a replicated volume as this node knows it.", []string{"volume", "role"}, nil)
)

// ReplicatedVolume is what the replication collector reports of a
// volume.
type ReplicatedVolume struct {
	Name     string
	State    api.Replication
	Replicas []api.ReplicaStatus
	Copied   map[string]int64 // resync bytes sent, by replica
}

// Replication returns a collector of every replicated volume's state,
// read from volumes at scrape time.
func Replication(volumes func() []ReplicatedVolume) prometheus.Collector {
	return replCollector{volumes}
}

type replCollector struct{ volumes func() []ReplicatedVolume }

func (c replCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{replicaStateDesc, replicaLeftDesc, replicaRateDesc, replicaCopiedDesc, replicaEpochDesc, replicaGenDesc} {
		ch <- d
	}
}

var replicaStates = []string{api.ReplicaInSync, api.ReplicaResyncing, api.ReplicaOutOfSync, api.ReplicaUnreachable}

func (c replCollector) Collect(ch chan<- prometheus.Metric) {
	for _, v := range c.volumes() {
		ch <- prometheus.MustNewConstMetric(replicaEpochDesc, prometheus.GaugeValue, float64(v.State.Epoch), v.Name, v.State.Role)
		ch <- prometheus.MustNewConstMetric(replicaGenDesc, prometheus.GaugeValue, float64(v.State.Generation), v.Name, v.State.Role)
		for _, r := range v.Replicas {
			for _, s := range replicaStates {
				val := 0.0
				if r.State == s {
					val = 1
				}
				ch <- prometheus.MustNewConstMetric(replicaStateDesc, prometheus.GaugeValue, val, v.Name, r.Node, s)
			}
			ch <- prometheus.MustNewConstMetric(replicaLeftDesc, prometheus.GaugeValue, float64(r.BytesLeft), v.Name, r.Node)
			ch <- prometheus.MustNewConstMetric(replicaRateDesc, prometheus.GaugeValue, float64(r.RateBytes), v.Name, r.Node)
			ch <- prometheus.MustNewConstMetric(replicaCopiedDesc, prometheus.CounterValue, float64(v.Copied[r.Node]), v.Name, r.Node)
		}
	}
}

// ReplicationLatency is the histogram of replica round trips: from
// sending a replicated request to a replica to its answer.
func ReplicationLatency(reg prometheus.Registerer) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "blockd_replica_request_duration_seconds",
		Help:    "Time from sending a replicated request to a replica to its answer, by volume and replica.",
		Buckets: prometheus.ExponentialBuckets(20e-6, 2, 18), // 20µs .. ~2.6s
	}, []string{"volume", "replica"})
	reg.MustRegister(h)
	return h
}
