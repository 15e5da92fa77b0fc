package blockd

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// Metrics holds the per-volume Prometheus series. A volume's children are
// resolved once when it opens, so the data path does only atomic adds.
type Metrics struct {
	ops      [pipeline.OpCache + 1]*prometheus.CounterVec // blockd_volume_reads_total, ...
	bytes    [pipeline.OpCache + 1]*prometheus.CounterVec // blockd_volume_read_bytes_total, ...
	errors   *prometheus.CounterVec
	inflight *prometheus.GaugeVec
	latency  *prometheus.HistogramVec
	size     *prometheus.GaugeVec
	profile  *prometheus.GaugeVec // blockd_volume_effective_profile (see profile.go)
}

// metricOps names each op in metric names: ops counters are
// blockd_volume_<plural>_total, byte counters blockd_volume_<name>_bytes_total.
var metricOps = []struct {
	op            pipeline.Op
	name, plural  string
	countsBytes   bool
	bytesHelpNoun string
}{
	{pipeline.OpRead, "read", "reads", true, "read"},
	{pipeline.OpWrite, "write", "writes", true, "written"},
	{pipeline.OpFlush, "flush", "flushes", false, ""},
	{pipeline.OpTrim, "trim", "trims", true, "trimmed"},
	{pipeline.OpWriteZeroes, "write_zeroes", "write_zeroes", true, "zeroed"},
	{pipeline.OpCache, "cache", "caches", false, ""},
}

// NewMetrics registers the volume metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blockd_volume_errors_total", Help: "Requests that failed, by volume and op.",
		}, []string{"volume", "op"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "blockd_volume_inflight_requests", Help: "Requests in the volume pipeline now.",
		}, []string{"volume"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "blockd_volume_request_duration_seconds",
			Help:    "Time from a request entering the volume pipeline to its completion, by volume and op.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2, 20), // 10µs .. ~5s
		}, []string{"volume", "op"}),
		size: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "blockd_volume_size_bytes", Help: "Volume size.",
		}, []string{"volume"}),
	}
	m.profile = newProfileGauge()
	reg.MustRegister(m.errors, m.inflight, m.latency, m.size, m.profile)
	for _, o := range metricOps {
		m.ops[o.op] = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blockd_volume_" + o.plural + "_total", Help: "Completed " + o.name + " requests, by volume.",
		}, []string{"volume"})
		reg.MustRegister(m.ops[o.op])
		if o.countsBytes {
			m.bytes[o.op] = prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "blockd_volume_" + o.name + "_bytes_total", Help: "Bytes " + o.bytesHelpNoun + " by completed requests, by volume.",
			}, []string{"volume"})
			reg.MustRegister(m.bytes[o.op])
		}
	}
	return m
}

type opSeries struct {
	ops, bytes, errors prometheus.Counter // bytes is nil for flush and cache
	latency            prometheus.Observer
}

type volumeSeries struct {
	byOp     [pipeline.OpCache + 1]*opSeries
	inflight prometheus.Gauge
}

// stage returns the pipeline stage that records vol's metrics.
func (m *Metrics) stage(vol string, e ioengine.Engine) pipeline.Stage {
	vs := &volumeSeries{inflight: m.inflight.WithLabelValues(vol)}
	for _, o := range metricOps {
		s := &opSeries{
			ops:     m.ops[o.op].WithLabelValues(vol),
			errors:  m.errors.WithLabelValues(vol, o.name),
			latency: m.latency.WithLabelValues(vol, o.name),
		}
		if m.bytes[o.op] != nil {
			s.bytes = m.bytes[o.op].WithLabelValues(vol)
		}
		vs.byOp[o.op] = s
	}
	m.size.WithLabelValues(vol).Set(float64(e.Size()))
	return func(next pipeline.Handler) pipeline.Handler {
		return &metricsHandler{next: next, s: vs}
	}
}

type metricsHandler struct {
	next pipeline.Handler
	s    *volumeSeries
}

func (h *metricsHandler) Handle(ctx context.Context, r *pipeline.Request) error {
	h.s.inflight.Inc()
	start := time.Now()
	err := h.next.Handle(ctx, r)
	h.s.inflight.Dec()
	if int(r.Op) >= len(h.s.byOp) || h.s.byOp[r.Op] == nil {
		return err
	}
	s := h.s.byOp[r.Op]
	if err != nil {
		s.errors.Inc()
		return err
	}
	s.ops.Inc()
	if s.bytes != nil {
		s.bytes.Add(float64(r.Length))
	}
	s.latency.Observe(time.Since(start).Seconds())
	return nil
}

func (m *Metrics) setSize(vol string, size int64) { m.size.WithLabelValues(vol).Set(float64(size)) }

// forget drops a deleted volume's series.
func (m *Metrics) forget(vol string) {
	l := prometheus.Labels{"volume": vol}
	for i := range m.ops {
		if m.ops[i] != nil {
			m.ops[i].Delete(l)
		}
		if m.bytes[i] != nil {
			m.bytes[i].Delete(l)
		}
	}
	m.errors.DeletePartialMatch(l)
	m.latency.DeletePartialMatch(l)
	m.inflight.Delete(l)
	m.size.Delete(l)
	m.profile.DeletePartialMatch(l)
}
