package nbd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// mappedExport is a test export whose BLOCK_STATUS answers come from mapFn.
type mappedExport struct {
	*testExport
	mapFn atomic.Pointer[mapFunc] // swapped by the test between requests
}

type mapFunc func(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error)

func (e *mappedExport) Map(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
	return (*e.mapFn.Load())(dst, off, n)
}

func (e *mappedExport) setMap(f mapFunc) { e.mapFn.Store(&f) }

// extentsOf decodes a base:allocation BLOCK_STATUS payload into
// (length, flags) pairs.
func extentsOf(t *testing.T, r reply) [][2]uint32 {
	t.Helper()
	if r.errno != 0 || r.chunkType != replyTypeBlockStatus || r.chunks != 1 {
		t.Fatalf("block status reply: errno %d (%s), chunk type %d, %d chunks", r.errno, r.msg, r.chunkType, r.chunks)
	}
	p := r.data
	if len(p) < 12 || (len(p)-4)%8 != 0 || binary.BigEndian.Uint32(p) != metaIDBaseAllocation {
		t.Fatalf("block status payload %x", p)
	}
	var out [][2]uint32
	for p = p[4:]; len(p) > 0; p = p[8:] {
		out = append(out, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
	}
	return out
}

func blockStatusConn(t *testing.T, e Export) *rawClient {
	t.Helper()
	_, addr := startServer(t, exportSet{"vol": e}, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	c.negotiateStructured()
	c.sendOpt(optSetMetaContext, metaData("vol", metaBaseAllocation))
	c.expectOpt(optSetMetaContext, repMetaContext)
	c.expectOpt(optSetMetaContext, repAck)
	c.goExport("vol")
	return c
}

// TestBlockStatusExtents: an export that maps its holes has them reported
// with the hole and zero flags, data with none, from the requested offset,
// one extent under REQ_ONE, at most maxExtents per reply; map errors are
// error replies and the connection carries on.
func TestBlockStatusExtents(t *testing.T) {
	const mib = 1 << 20
	m, err := ioengine.NewMemory(testSize)
	if err != nil {
		t.Fatal(err)
	}
	e := &mappedExport{testExport: &testExport{Handler: ioengine.Handler(m)}}
	e.setMap(m.Map)
	e.size.Store(testSize)
	c := blockStatusConn(t, e)

	const hz = stateHole | stateZero
	if got := extentsOf(t, c.mustOK(cmdBlockStatus, 0, 0, 4*mib, nil)); !slices.Equal(got, [][2]uint32{{4 * mib, hz}}) {
		t.Fatalf("fresh export maps as %v", got)
	}
	// Written through the connection: the chunk at 1 MiB becomes data.
	c.mustOK(cmdWrite, 0, mib+4096, 4096, bytes.Repeat([]byte{1}, 4096))
	want := [][2]uint32{{mib, hz}, {mib, 0}, {2 * mib, hz}}
	if got := extentsOf(t, c.mustOK(cmdBlockStatus, 0, 0, 4*mib, nil)); !slices.Equal(got, want) {
		t.Fatalf("after a write: %v, want %v", got, want)
	}
	want = [][2]uint32{{mib / 2, hz}, {mib / 2, 0}}
	if got := extentsOf(t, c.mustOK(cmdBlockStatus, 0, mib/2, mib, nil)); !slices.Equal(got, want) {
		t.Fatalf("from 512 KiB: %v, want %v", got, want)
	}
	want = [][2]uint32{{mib, hz}}
	if got := extentsOf(t, c.mustOK(cmdBlockStatus, cmdFlagReqOne, 0, 4*mib, nil)); !slices.Equal(got, want) {
		t.Fatalf("REQ_ONE: %v, want %v", got, want)
	}
	// Trimmed whole, the chunk is a hole again.
	c.mustOK(cmdTrim, 0, mib, mib, nil)
	if got := extentsOf(t, c.mustOK(cmdBlockStatus, 0, 0, 4*mib, nil)); !slices.Equal(got, [][2]uint32{{4 * mib, hz}}) {
		t.Fatalf("after trim: %v", got)
	}

	// A map with more extents than a reply holds is cut at maxExtents.
	e.setMap(func(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
		for i := 0; n >= 4096; i++ {
			var ok bool
			if dst, ok = pipeline.AppendExtent(dst, 4096, i%2 == 0); !ok {
				break
			}
			n -= 4096
		}
		return dst, nil
	})
	got := extentsOf(t, c.mustOK(cmdBlockStatus, 0, 0, 4*mib, nil))
	if len(got) != maxExtents {
		t.Fatalf("%d extents in a reply, want %d", len(got), maxExtents)
	}
	for i, x := range got {
		want := [2]uint32{4096, 0}
		if i%2 == 0 {
			want[1] = hz
		}
		if x != want {
			t.Fatalf("extent %d = %v, want %v", i, x, want)
		}
	}

	// Errors: the Mapper's own, and a Mapper that breaks its contract.
	e.setMap(func(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
		return dst, fmt.Errorf("volume going away: %w", pipeline.ErrShutdown)
	})
	c.expectErr(errShutdown, cmdBlockStatus, 0, 0, 4096, nil)
	for _, bad := range [][]pipeline.Extent{nil, {{Length: 0}}, {{Length: 8192}}} {
		e.setMap(func(dst []pipeline.Extent, off, n int64) ([]pipeline.Extent, error) {
			return append(dst, bad...), nil
		})
		c.expectErr(errIO, cmdBlockStatus, 0, 0, 4096, nil)
	}
	e.setMap(m.Map)
	c.mustOK(cmdRead, 0, 0, 4096, nil)
	if got := extentsOf(t, c.mustOK(cmdBlockStatus, 0, 0, 4096, nil)); !slices.Equal(got, [][2]uint32{{4096, hz}}) {
		t.Fatalf("after the errors: %v", got)
	}
}
