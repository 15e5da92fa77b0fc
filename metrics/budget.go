package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/profile"
)

var (
	budgetDesc = prometheus.NewDesc("blockd_cache_memory_bytes",
		"Node-wide memory of the io_profile prefetch caches and write-back buffers, by kind "+
			"(limit: --cache-memory, 0 none; in_use; high_water: the most held at once).", []string{"kind"}, nil)
	denialsDesc = prometheus.NewDesc("blockd_cache_memory_denials_total",
		"Requests for cache memory the node budget refused (a prefetch skipped, a write written through instead of buffered).", nil, nil)
)

// CacheBudget returns a prometheus.Collector for the node's cache memory
// budget.
func CacheBudget(b *profile.Budget) prometheus.Collector { return budgetCollector{b} }

type budgetCollector struct{ b *profile.Budget }

func (c budgetCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- budgetDesc
	ch <- denialsDesc
}

func (c budgetCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.b.Stats()
	ch <- prometheus.MustNewConstMetric(budgetDesc, prometheus.GaugeValue, float64(st.Limit), "limit")
	ch <- prometheus.MustNewConstMetric(budgetDesc, prometheus.GaugeValue, float64(st.InUse), "in_use")
	ch <- prometheus.MustNewConstMetric(budgetDesc, prometheus.GaugeValue, float64(st.HighWater), "high_water")
	ch <- prometheus.MustNewConstMetric(denialsDesc, prometheus.CounterValue, float64(st.Denials))
}
