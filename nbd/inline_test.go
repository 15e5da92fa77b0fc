package nbd

import (
	"bytes"
	"encoding/binary"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// inlineExport vouches for reads and writes, counting how many it let the
// reader run.
type inlineExport struct {
	*testExport
	inlined atomic.Int64
}

func (e *inlineExport) Inline(r *pipeline.Request) bool {
	if r.Op == pipeline.OpRead || r.Op == pipeline.OpWrite {
		e.inlined.Add(1)
		return true
	}
	return false
}

func newInlineExport(t *testing.T) *inlineExport {
	e, _ := memExport(t, testSize)
	return &inlineExport{testExport: e}
}

// TestInlineRoundTrips: a lone request run by the reader is answered
// without a later request to push it out (the client waits for each
// reply; a missing flush runs into the client's deadline).
func TestInlineRoundTrips(t *testing.T) {
	for _, structured := range []bool{false, true} {
		e := newInlineExport(t)
		_, addr := startServer(t, exportSet{"vol": e}, Options{})
		c := connect(t, addr, "vol", structured)
		p := pattern(3<<20, 4)
		c.mustOK(cmdWrite, 0, 4096, uint32(len(p)), p)
		mustEqual(t, c.mustOK(cmdRead, 0, 4096, uint32(len(p)), nil).data, p)
		for i := range 50 {
			off := uint64(i) * 8192
			q := pattern(4096, byte(i))
			c.mustOK(cmdWrite, 0, off, 4096, q)
			mustEqual(t, c.mustOK(cmdRead, 0, off, 4096, nil).data, q)
		}
		c.mustOK(cmdFlush, 0, 0, 0, nil) // not inline: a worker runs it
		if got := e.inlined.Load(); got != 102 {
			t.Fatalf("structured=%v: %d requests ran inline, want 102", structured, got)
		}
	}
}

// TestInlinePipelined sends bursts of requests before reading any reply,
// with fewer slots and less payload budget than the burst needs: replies
// held in the batch (large reads reference their data until written) must
// be written before the reader waits for a slot or for budget.
func TestInlinePipelined(t *testing.T) {
	e := newInlineExport(t)
	_, addr := startServer(t, exportSet{"vol": e}, Options{MaxInFlight: 4, MaxBufferBytes: 3 << 20})
	c := connect(t, addr, "vol", false)
	const n = 64
	data := make([][]byte, n)
	for i := range n {
		data[i] = pattern(1<<20, byte(i+1))
	}
	// Writes, each to its own MiB, then reads of them, all in flight.
	go func() {
		for i := range n {
			c.send(cmdWrite, 0, uint64(i), uint64(i%8)<<20, 1<<20, data[i])
		}
	}()
	for range n {
		if r := c.readReply(); r.errno != 0 {
			t.Fatalf("write %d: errno %d", r.cookie, r.errno)
		}
	}
	want := data[n-8:] // the last write to each MiB
	go func() {
		for i := range n {
			c.send(cmdRead, 0, uint64(1000+i), uint64(i%8)<<20, 1<<20, nil)
		}
	}()
	for range n {
		r := c.readReply()
		if r.errno != 0 {
			t.Fatalf("read %d: errno %d", r.cookie, r.errno)
		}
		if !bytes.Equal(r.data, want[(r.cookie-1000)%8]) {
			t.Fatalf("read %d: wrong data", r.cookie)
		}
	}
	if got := e.inlined.Load(); got != 2*n {
		t.Fatalf("%d requests ran inline, want %d", got, 2*n)
	}
}

// lendExport also receives vouched writes in place, in its memory engine.
type lendExport struct {
	*inlineExport
	m     *ioengine.Memory
	lent  atomic.Int64
	asked atomic.Int64
}

func (e *lendExport) LendWrite(r *pipeline.Request) []byte {
	e.asked.Add(1)
	b := e.m.LendWrite(r.Offset, int(r.Length))
	if b != nil {
		e.lent.Add(1)
	}
	return b
}

// TestInlineWriteInPlace: payloads of vouched writes that fit in one engine
// chunk are received into the engine's memory; the others (across a chunk
// boundary) go through a buffer. Both read back, whatever the mix, and a
// payload cut short by a vanishing client leaves the server serving.
func TestInlineWriteInPlace(t *testing.T) {
	const size = 16 << 20
	m, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	te := &testExport{Handler: ioengine.Handler(m)}
	te.size.Store(size)
	e := &lendExport{inlineExport: &inlineExport{testExport: te}, m: m}
	_, addr := startServer(t, exportSet{"vol": e}, Options{})
	c := connect(t, addr, "vol", true)

	type w struct {
		off uint64
		n   int
	}
	writes := []w{{0, 1 << 20}, {4096, 4096}, {1<<20 - 512, 1024}, {3 << 20, 2 << 20}, {(5 << 20) + 7, 100}}
	want := make([]byte, 6<<20)
	for i, x := range writes {
		p := pattern(x.n, byte(i+9))
		c.mustOK(cmdWrite, 0, x.off, uint32(x.n), p)
		copy(want[x.off:], p)
	}
	mustEqual(t, c.mustOK(cmdRead, 0, 0, uint32(len(want)), nil).data, want)
	if e.asked.Load() != int64(len(writes)) || e.lent.Load() != 3 {
		t.Fatalf("asked %d lent %d, want %d and 3 (two writes cross a chunk boundary)", e.asked.Load(), e.lent.Load(), len(writes))
	}

	// A client that sends half a payload and goes away gets no reply and
	// takes nothing else down.
	raw := connect(t, addr, "vol", false)
	hdr := make([]byte, 28)
	binary.BigEndian.PutUint32(hdr[0:], requestMagic)
	binary.BigEndian.PutUint16(hdr[6:], cmdWrite)
	binary.BigEndian.PutUint64(hdr[16:], 8<<20)
	binary.BigEndian.PutUint32(hdr[24:], 65536)
	if _, err := raw.nc.Write(append(hdr, make([]byte, 1000)...)); err != nil {
		t.Fatal(err)
	}
	raw.nc.Close()
	q := pattern(4096, 77)
	c.mustOK(cmdWrite, 0, 9<<20, 4096, q)
	mustEqual(t, c.mustOK(cmdRead, 0, 9<<20, 4096, nil).data, q)
}
