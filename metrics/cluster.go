package metrics

import "github.com/prometheus/client_golang/prometheus"

// ClusterMetrics are a cluster node's counters.
type ClusterMetrics struct {
	// OwnerChanges counts the volumes this node took over, by volume and
	// by what the previous owner did ("clean": it handed the volume
	// over; "failover": its lease expired).
	OwnerChanges *prometheus.CounterVec
	// ReplicasReplaced counts replicas this node, as owner, replaced by a
	// new one on another node.
	ReplicasReplaced *prometheus.CounterVec
}

// Cluster registers a cluster node's metrics; the lease figures are read
// from the session when scraped.
func Cluster(reg prometheus.Registerer, renewFailures, leasesLost, leaseLeft func() float64, owned func() float64) *ClusterMetrics {
	m := &ClusterMetrics{
		OwnerChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blockd_cluster_owner_changes_total",
			Help: "Volumes this node took over, by volume and how the previous owner let go (clean: handed over; failover: its lease expired).",
		}, []string{"volume", "kind"}),
		ReplicasReplaced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blockd_cluster_replicas_replaced_total",
			Help: "Replicas this node, as owner, replaced by a new copy on another node after they were unreachable for --replica-replace-after.",
		}, []string{"volume"}),
	}
	reg.MustRegister(m.OwnerChanges, m.ReplicasReplaced,
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "blockd_cluster_lease_renew_failures_total",
			Help: "Keep-alives of the node's etcd lease that failed (etcd unreachable or slow).",
		}, renewFailures),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "blockd_cluster_leases_lost_total",
			Help: "Leases of this node that etcd expired: every volume it owned was fenced.",
		}, leasesLost),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "blockd_cluster_lease_valid_seconds",
			Help: "How long the node's lease counts as valid without another renewal (0: expired; owned volumes wait).",
		}, leaseLeft),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "blockd_cluster_owned_volumes",
			Help: "Volumes this node owns.",
		}, owned),
	)
	return m
}
