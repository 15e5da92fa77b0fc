package volume

import (
	"bytes"
	"context"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/metrics"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/qos"
)

// TestFastPathsFollowPipeline: only a memory volume whose QoS lets
// everything through runs reads and plain writes on the NBD reader, and
// only a memory volume answers reads by reference.
func TestFastPathsFollowPipeline(t *testing.T) {
	qn, err := qos.NewNode(qos.Capacity{})
	if err != nil {
		t.Fatal(err)
	}
	defer qn.Close()
	m, err := Open(Options{Dir: t.TempDir(), Log: quietLog(), Metrics: metrics.NewVolumes(prometheus.NewRegistry()), QoS: qn})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, s := range []api.Spec{{Name: "mem", Size: 8 << 20, Engine: "memory"}, {Name: "file", Size: 8 << 20, Engine: "file"}} {
		if _, err := m.Create(s); err != nil {
			t.Fatal(err)
		}
	}
	mem, _ := m.Get("mem")
	file, _ := m.Get("file")
	read := &pipeline.Request{Op: pipeline.OpRead, Length: 4096}
	write := &pipeline.Request{Op: pipeline.OpWrite, Length: 4096}
	fua := &pipeline.Request{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Length: 4096}
	flush := &pipeline.Request{Op: pipeline.OpFlush}
	for _, tc := range []struct {
		v    *Volume
		r    *pipeline.Request
		want bool
	}{{mem, read, true}, {mem, write, true}, {mem, fua, false}, {mem, flush, false}, {file, read, false}, {file, write, false}} {
		if got := tc.v.Inline(tc.r); got != tc.want {
			t.Errorf("%s: Inline(%v flags %d) = %v, want %v", tc.v.Name(), tc.r.Op, tc.r.Flags, got, tc.want)
		}
	}
	// With a cap, a request runs inline only while QoS admits it at once
	// (the bucket starts with 100 ms of credit: 100 requests), marked so
	// that the stage does not take a token for it again; then requests go
	// to the workers, where the stage makes them wait.
	if _, err := m.Update("mem", func(s *api.Spec) error { s.QoS = qos.Limits{IOPS: 1000}; return nil }); err != nil {
		t.Fatal(err)
	}
	admitted := 0
	for ; admitted < 1000; admitted++ {
		r := &pipeline.Request{Op: pipeline.OpRead, Length: 4096, Buf: make([]byte, 4096)}
		if !mem.Inline(r) {
			break
		}
		if r.Flags&pipeline.FlagAdmitted == 0 {
			t.Fatal("Inline admitted a capped request without marking it FlagAdmitted")
		}
		if err := mem.Handle(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	if admitted < 90 || admitted > 150 {
		t.Fatalf("a 1000 IOPS cap admitted %d requests inline at once, want about its 100 requests of burst", admitted)
	}
	if got := mem.qos.Stats().Passed; got != uint64(admitted) {
		t.Fatalf("QoS counted %d requests for %d admitted ones: an admitted request went through the scheduler twice", got, admitted)
	}

	for _, tc := range []struct {
		v     *Volume
		byRef bool
	}{{mem, true}, {file, false}} {
		r := pipeline.Request{Op: pipeline.OpRead, Flags: pipeline.FlagRef, Offset: 0, Length: 4096,
			Buf: make([]byte, 4096), Ref: make([][]byte, 0, 4)}
		if err := tc.v.Handle(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
		if (len(r.Ref) > 0) != tc.byRef {
			t.Errorf("%s: read answered by reference %v, want %v", tc.v.Name(), len(r.Ref) > 0, tc.byRef)
		}
	}

	// A memory volume lends its memory to a write's payload; what lands
	// there and passes the pipeline reads back. A file volume lends none.
	if b := file.LendWrite(&pipeline.Request{Op: pipeline.OpWrite, Offset: 4096, Length: 4096}); b != nil {
		t.Fatal("a file volume lent memory for a write")
	}
	w := &pipeline.Request{Op: pipeline.OpWrite, Offset: 8192, Length: 4096}
	w.Buf = mem.LendWrite(w)
	if len(w.Buf) != 4096 {
		t.Fatalf("memory volume lent %d bytes for a 4096-byte write", len(w.Buf))
	}
	copy(w.Buf, bytes.Repeat([]byte{0xab}, 4096))
	w.Flags |= pipeline.FlagAdmitted
	if err := mem.Handle(context.Background(), w); err != nil {
		t.Fatal(err)
	}
	got := &pipeline.Request{Op: pipeline.OpRead, Offset: 8192, Length: 4096, Buf: make([]byte, 4096)}
	if err := mem.Handle(context.Background(), got); err != nil || !bytes.Equal(got.Buf, bytes.Repeat([]byte{0xab}, 4096)) {
		t.Fatalf("lent write did not read back (err %v)", err)
	}
}
