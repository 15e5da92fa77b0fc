package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/ioengine"
)

var (
	fileEnginesDesc = prometheus.NewDesc("blockd_file_engines",
		"Open file engines by how they do their I/O: io_uring (a ring per engine) or syscalls "+
			"(pread/pwrite/fdatasync: io_uring unavailable or refused, or BLOCKD_IO_URING=0).", []string{"io"}, nil)
	fileFallbacksDesc = prometheus.NewDesc("blockd_file_engine_uring_fallbacks_total",
		"File engines that wanted io_uring and got system calls (the log says why).", nil, nil)
)

// FileEngines returns a prometheus.Collector for how the process's file
// engines do their I/O (ioengine.FileIO).
func FileEngines() prometheus.Collector { return fileCollector{} }

type fileCollector struct{}

func (fileCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- fileEnginesDesc
	ch <- fileFallbacksDesc
}

func (fileCollector) Collect(ch chan<- prometheus.Metric) {
	st := ioengine.FileIO()
	ch <- prometheus.MustNewConstMetric(fileEnginesDesc, prometheus.GaugeValue, float64(st.URing), "io_uring")
	ch <- prometheus.MustNewConstMetric(fileEnginesDesc, prometheus.GaugeValue, float64(st.Syscalls), "syscalls")
	ch <- prometheus.MustNewConstMetric(fileFallbacksDesc, prometheus.CounterValue, float64(st.Fallbacks))
}
