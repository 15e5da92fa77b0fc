// Package metrics is the volume pipeline's metrics stage and the
// Prometheus side of the stages that keep their own counters (qos, profile):
// per-volume request counters, bytes, errors, in-flight requests and
// latency histograms, the QoS scheduler's state and the io_profile in
// force. A volume's series are resolved once when it opens, so the data
// path does only atomic adds.
package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/profile"
)

// Volumes holds the per-volume Prometheus series.
type Volumes struct {
	ops      [pipeline.OpCache + 1]*prometheus.CounterVec // blockd_volume_reads_total, ...
	bytes    [pipeline.OpCache + 1]*prometheus.CounterVec // blockd_volume_read_bytes_total, ...
	errors   *prometheus.CounterVec
	inflight *prometheus.GaugeVec
	latency  *prometheus.HistogramVec
	size     *prometheus.GaugeVec
	profile  *prometheus.GaugeVec // blockd_volume_effective_profile
	state    *prometheus.GaugeVec // blockd_volume_failed
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

// NewVolumes registers the volume metrics with reg.
func NewVolumes(reg prometheus.Registerer) *Volumes {
	m := &Volumes{
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
	m.profile = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "blockd_volume_effective_profile",
		Help: "1 for the io_profile in force on the volume (for auto, the one it learned), 0 for the others.",
	}, []string{"volume", "profile"})
	m.state = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "blockd_volume_failed",
		Help: "1 while the volume is failed (it serves no I/O; `blockd volume get` says why), 0 otherwise.",
	}, []string{"volume"})
	reg.MustRegister(m.errors, m.inflight, m.latency, m.size, m.profile, m.state)
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

// Stage returns the pipeline stage that records vol's metrics, and sets
// its size gauge.
func (m *Volumes) Stage(vol string, size int64) pipeline.Stage {
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
	m.size.WithLabelValues(vol).Set(float64(size))
	m.state.WithLabelValues(vol).Set(0)
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

// SetSize updates vol's size gauge.
func (m *Volumes) SetSize(vol string, size int64) { m.size.WithLabelValues(vol).Set(float64(size)) }

// SetFailed sets vol's failed gauge: a failed volume has no pipeline, so
// this is its only series.
func (m *Volumes) SetFailed(vol string, failed bool) {
	v := 0.0
	if failed {
		v = 1
	}
	m.state.WithLabelValues(vol).Set(v)
}

// SetProfile records the io_profile in force on vol.
func (m *Volumes) SetProfile(vol string, eff profile.Profile) {
	for _, n := range profile.Names() {
		if n == "auto" {
			continue
		}
		v := 0.0
		if n == eff.String() {
			v = 1
		}
		m.profile.WithLabelValues(vol, n).Set(v)
	}
}

// Forget drops a deleted volume's series.
func (m *Volumes) Forget(vol string) {
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
	m.state.Delete(l)
}
