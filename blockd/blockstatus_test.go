package blockd

import (
	"bytes"
	"testing"

	"github.com/blockd/blockd/pipeline"
)

// TestVolumeMap: a volume maps its engine's holes and data, and a write
// that completed into the sequential profile's write-back buffer, not yet
// in the engine, is data all the same (a copier that skipped it as a hole
// would lose it).
func TestVolumeMap(t *testing.T) {
	const mib = 1 << 20
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	for _, spec := range []Spec{
		{Name: "seq", Size: 16 * mib, Profile: "sequential"},
		{Name: "mem", Size: 16 * mib, Engine: "memory"},
	} {
		t.Run(spec.Name, func(t *testing.T) {
			if _, err := m.Create(spec); err != nil {
				t.Fatal(err)
			}
			v, err := m.Get(spec.Name)
			if err != nil {
				t.Fatal(err)
			}
			do := func(r pipeline.Request) {
				t.Helper()
				if err := v.Handle(t.Context(), &r); err != nil {
					t.Fatalf("%v at %d: %v", r.Op, r.Offset, err)
				}
			}
			mapOf := func(off, n int64) []pipeline.Extent {
				t.Helper()
				ext, err := v.Map(make([]pipeline.Extent, 0, 64), off, n)
				if err != nil {
					t.Fatalf("Map(%d, %d): %v", off, n, err)
				}
				return ext
			}
			isHole := func(ext []pipeline.Extent) bool { return len(ext) == 1 && ext[0].Hole }

			if ext := mapOf(0, 16*mib); !isHole(ext) || ext[0].Length != 16*mib {
				t.Fatalf("new volume maps as %+v", ext)
			}
			do(pipeline.Request{Op: pipeline.OpWrite, Offset: 8 * mib, Length: 4096, Buf: bytes.Repeat([]byte{3}, 4096)})
			if spec.Name == "seq" {
				if st := v.prof.Stats(); st.BufferedBytes == 0 {
					t.Fatalf("the write was not buffered (stats %+v): the test needs it there", st)
				}
			}
			if ext := mapOf(8*mib, 4096); isHole(ext) {
				t.Fatalf("a completed write maps as a hole: %+v", ext)
			}
			if ext := mapOf(0, 16*mib); isHole(ext) {
				t.Fatalf("the volume with a completed write maps as one hole: %+v", ext)
			}
			if ext := mapOf(0, mib); !isHole(ext) {
				t.Fatalf("[0, 1 MiB), never written, maps as %+v", ext)
			}
			do(pipeline.Request{Op: pipeline.OpFlush})
			if st := v.prof.Stats(); st.BufferedBytes != 0 {
				t.Fatalf("flush left %d bytes buffered", st.BufferedBytes)
			}
			ext := mapOf(0, 16*mib)
			var off int64
			for _, x := range ext {
				if !x.Hole && (off > 8*mib || off+x.Length < 8*mib+4096) {
					t.Errorf("data extent [%d, %d) is not around the write at 8 MiB: %+v", off, off+x.Length, ext)
				}
				off += x.Length
			}
			if off != 16*mib || len(ext) != 3 || !ext[0].Hole || ext[1].Hole || !ext[2].Hole {
				t.Fatalf("after flush: %+v, want hole, data, hole over 16 MiB", ext)
			}
			do(pipeline.Request{Op: pipeline.OpTrim, Offset: 8 * mib, Length: mib})
			if ext := mapOf(0, 16*mib); !isHole(ext) {
				t.Fatalf("after trimming the data: %+v", ext)
			}
			if _, err := v.Map(nil, 16*mib-4096, 8192); err != pipeline.ErrOutOfRange {
				t.Fatalf("Map past the end: %v", err)
			}
		})
	}
}
