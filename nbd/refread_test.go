package nbd

import (
	"bytes"
	"context"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/pipeline"
)

// refSeen records whether reads reached the handler with FlagRef and room
// in Ref, and whether they were answered by reference.
type refSeen struct {
	next     pipeline.Handler
	offered  atomic.Int64
	answered atomic.Int64
}

func (h *refSeen) Handle(ctx context.Context, r *pipeline.Request) error {
	if r.Op == pipeline.OpRead && r.Flags&pipeline.FlagRef != 0 && cap(r.Ref) > 0 {
		h.offered.Add(1)
	}
	err := h.next.Handle(ctx, r)
	if r.Op == pipeline.OpRead && len(r.Ref) > 0 {
		h.answered.Add(1)
	}
	return err
}

// TestReadByReference reads through the memory engine lending its chunks:
// spans across 1 MiB chunk boundaries, pieces too small for their own
// iovec, never-written chunks (lent as the shared zero chunk), and a write
// that completed before the read, on both reply formats.
func TestReadByReference(t *testing.T) {
	for _, structured := range []bool{false, true} {
		e, _ := memExport(t, testSize)
		seen := &refSeen{next: e.Handler}
		e.Handler = seen
		_, addr := startServer(t, exportSet{"vol": e}, Options{})
		c := connect(t, addr, "vol", structured)

		p := pattern(3<<20, 3)
		c.mustOK(cmdWrite, 0, 1<<20, uint32(len(p)), p)
		// 3 MiB starting 1000 bytes before a chunk boundary: 4 pieces.
		mustEqual(t, c.mustOK(cmdRead, 0, 1<<20-1000, 3<<20, nil).data,
			append(make([]byte, 1000), p[:3<<20-1000]...))
		// 1500 bytes straddling a boundary: both pieces copied.
		mustEqual(t, c.mustOK(cmdRead, 0, 2<<20-700, 1500, nil).data, p[1<<20-700:1<<20+800])
		// Never written: zeroes.
		mustEqual(t, c.mustOK(cmdRead, 0, 5<<20, 2<<20, nil).data, make([]byte, 2<<20))
		// A completed overwrite is seen by the next read.
		q := pattern(8192, 7)
		c.mustOK(cmdWrite, 0, 2<<20-4096, uint32(len(q)), q)
		want := bytes.Clone(p[1<<20-8192 : 1<<20+8192])
		copy(want[4096:], q)
		mustEqual(t, c.mustOK(cmdRead, 0, 2<<20-8192, 16384, nil).data, want)
		if seen.offered.Load() != 4 || seen.answered.Load() != 4 {
			t.Fatalf("structured=%v: %d reads offered FlagRef, %d answered by reference, want 4 and 4", structured, seen.offered.Load(), seen.answered.Load())
		}
	}
}

// copyOnly is a stage that needs the data in Buf: it clears FlagRef.
type copyOnly struct{ next pipeline.Handler }

func (h copyOnly) Handle(ctx context.Context, r *pipeline.Request) error {
	r.Flags &^= pipeline.FlagRef
	return h.next.Handle(ctx, r)
}

// TestReadRefDeclined: a pipeline that clears FlagRef gets its reads
// answered from Buf.
func TestReadRefDeclined(t *testing.T) {
	e, _ := memExport(t, testSize)
	seen := &refSeen{next: e.Handler}
	e.Handler = copyOnly{next: seen}
	_, addr := startServer(t, exportSet{"vol": e}, Options{})
	c := connect(t, addr, "vol", false)
	p := pattern(2<<20, 5)
	c.mustOK(cmdWrite, 0, 4096, uint32(len(p)), p)
	mustEqual(t, c.mustOK(cmdRead, 0, 4096, uint32(len(p)), nil).data, p)
	if seen.offered.Load() != 0 || seen.answered.Load() != 0 {
		t.Fatalf("offered %d answered %d, want 0 and 0", seen.offered.Load(), seen.answered.Load())
	}
}
