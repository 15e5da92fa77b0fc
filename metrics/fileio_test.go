package metrics

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blockd/blockd/ioengine"
)

// The collector reports the file engines open by I/O path; an engine with
// system calls by choice is no fallback.
func TestFileEngines(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(FileEngines())
	e, err := ioengine.OpenFileWith(filepath.Join(t.TempDir(), "v"), 1<<20, ioengine.OpenFileOptions{Syscalls: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	st := ioengine.FileIO()
	want := `
# HELP blockd_file_engines Open file engines by how they do their I/O: io_uring (a ring per engine) or syscalls (pread/pwrite/fdatasync: io_uring unavailable or refused, or BLOCKD_IO_URING=0).
# TYPE blockd_file_engines gauge
blockd_file_engines{io="io_uring"} ` + itoa(st.URing) + `
blockd_file_engines{io="syscalls"} ` + itoa(st.Syscalls) + `
# HELP blockd_file_engine_uring_fallbacks_total File engines that wanted io_uring and got system calls (the log says why).
# TYPE blockd_file_engine_uring_fallbacks_total counter
blockd_file_engine_uring_fallbacks_total ` + itoa(st.Fallbacks) + `
`
	if st.Syscalls < 1 {
		t.Fatalf("FileIO with a syscalls engine open: %+v", st)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Fatal(err)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
