package volume

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/blockd/blockd/api"

	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/profile"
)

// TestVolumeMap: a volume maps its engine's holes and data, and a write
// that completed into the sequential profile's write-back buffer, not yet
// in the engine, is data all the same (a copier that skipped it as a hole
// would lose it).
func TestVolumeMap(t *testing.T) {
	const mib = 1 << 20
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	for _, spec := range []api.Spec{
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
			// hole, data around the write, hole: whether the write is
			// in the buffer or in the engine.
			holeDataHole := func(when string) {
				t.Helper()
				ext := mapOf(0, 16*mib)
				var off int64
				for _, x := range ext {
					if !x.Hole && (off > 8*mib || off+x.Length < 8*mib+4096) {
						t.Errorf("%s: data extent [%d, %d) is not around the write at 8 MiB: %+v", when, off, off+x.Length, ext)
					}
					off += x.Length
				}
				if off != 16*mib || len(ext) != 3 || !ext[0].Hole || ext[1].Hole || !ext[2].Hole {
					t.Fatalf("%s: %+v, want hole, data, hole over 16 MiB", when, ext)
				}
			}
			holeDataHole("write completed")
			do(pipeline.Request{Op: pipeline.OpFlush})
			if st := v.prof.Stats(); st.BufferedBytes != 0 {
				t.Fatalf("flush left %d bytes buffered", st.BufferedBytes)
			}
			holeDataHole("after flush")
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

func TestOverlayData(t *testing.T) {
	h := func(n int64) pipeline.Extent { return pipeline.Extent{Length: n, Hole: true} }
	d := func(n int64) pipeline.Extent { return pipeline.Extent{Length: n} }
	for _, tc := range []struct {
		name string
		ext  []pipeline.Extent
		data []profile.Range
		room int
		want []pipeline.Extent
	}{
		{"inside a hole", []pipeline.Extent{h(100)}, []profile.Range{{Off: 1030, End: 1040}}, 8,
			[]pipeline.Extent{h(30), d(10), h(60)}},
		{"at both ends", []pipeline.Extent{h(100)}, []profile.Range{{Off: 1000, End: 1010}, {Off: 1090, End: 1100}}, 8,
			[]pipeline.Extent{d(10), h(80), d(10)}},
		{"over data and holes", []pipeline.Extent{h(10), d(10), h(10)}, []profile.Range{{Off: 1005, End: 1025}}, 8,
			[]pipeline.Extent{h(5), d(20), h(5)}},
		{"joins data extents", []pipeline.Extent{d(10), h(10), d(10)}, []profile.Range{{Off: 1010, End: 1020}}, 8,
			[]pipeline.Extent{d(30)}},
		{"across holes", []pipeline.Extent{h(10), d(10), h(10), d(10)}, []profile.Range{{Off: 1025, End: 1030}}, 8,
			[]pipeline.Extent{h(10), d(10), h(5), d(15)}},
		{"room for two", []pipeline.Extent{h(100)}, []profile.Range{{Off: 1030, End: 1040}, {Off: 1050, End: 1060}}, 2,
			[]pipeline.Extent{h(30), d(10)}},
		{"room for one", []pipeline.Extent{h(100)}, []profile.Range{{Off: 1030, End: 1040}}, 1,
			[]pipeline.Extent{h(30)}},
	} {
		got := overlayData(make([]pipeline.Extent, 0, tc.room), tc.ext, 1000, tc.data)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
