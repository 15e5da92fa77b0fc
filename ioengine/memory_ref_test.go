package ioengine_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

func TestMemoryReadRef(t *testing.T) {
	const mib = 1 << 20
	m, err := ioengine.NewMemory(8 * mib)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	p := make([]byte, 2*mib)
	for i := range p {
		p[i] = byte(i*7 + 1)
	}
	if _, err := m.WriteAt(p, mib); err != nil {
		t.Fatal(err)
	}
	join := func(refs [][]byte) []byte { return bytes.Join(refs, nil) }

	// [mib-100, 3mib+100): the unwritten tail of chunk 0, chunks 1 and 2,
	// the unwritten head of chunk 3.
	refs, ok := m.ReadRef(make([][]byte, 0, 4), mib-100, 2*mib+200)
	if !ok || len(refs) != 4 {
		t.Fatalf("ReadRef: ok %v, %d slices, want true and 4", ok, len(refs))
	}
	want := append(append(make([]byte, 100), p...), make([]byte, 100)...)
	if !bytes.Equal(join(refs), want) {
		t.Fatal("ReadRef data differs from what was written")
	}
	// Lent slices have no spare capacity: appending cannot write into
	// the engine.
	for i, r := range refs {
		if cap(r) != len(r) {
			t.Fatalf("slice %d: cap %d > len %d", i, cap(r), len(r))
		}
	}

	// Not enough room: refused, dst untouched.
	dst := make([][]byte, 0, 3)
	if got, ok := m.ReadRef(dst, mib-100, 2*mib+200); ok || len(got) != 0 {
		t.Fatalf("ReadRef with room for 3 of 4: ok %v len %d", ok, len(got))
	}

	// The terminal handler answers by reference only with FlagRef and
	// room, and fills Buf otherwise.
	h := ioengine.Handler(m)
	for _, tc := range []struct {
		flags pipeline.Flags
		room  int
		byRef bool
	}{{pipeline.FlagRef, 4, true}, {0, 4, false}, {pipeline.FlagRef, 2, false}} {
		r := pipeline.Request{Op: pipeline.OpRead, Flags: tc.flags, Offset: mib - 100, Length: 2*mib + 200,
			Buf: make([]byte, 2*mib+200), Ref: make([][]byte, 0, tc.room)}
		if err := h.Handle(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
		if (len(r.Ref) > 0) != tc.byRef {
			t.Fatalf("flags %v room %d: answered by reference %v, want %v", tc.flags, tc.room, len(r.Ref) > 0, tc.byRef)
		}
		got := r.Buf
		if tc.byRef {
			got = join(r.Ref)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("flags %v room %d: wrong data", tc.flags, tc.room)
		}
	}

	// Trim drops a chunk's array rather than reusing it: what was lent
	// before keeps that chunk's old bytes, a new read lends zeroes.
	old, _ := m.ReadRef(make([][]byte, 0, 1), mib, mib)
	if err := m.Trim(mib, mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(old[0], p[:mib]) {
		t.Fatal("a trim changed memory lent before it")
	}
	now, _ := m.ReadRef(make([][]byte, 0, 1), mib, mib)
	if !bytes.Equal(now[0], make([]byte, mib)) {
		t.Fatal("trimmed chunk does not read as zeroes")
	}
}

// TestMemoryLendWrite: a lent range is the engine's memory (what is put
// there reads back once WriteAt passes it), ranges across a chunk or
// outside the volume are not lent, and a chunk trimmed between the lend
// and the WriteAt still ends up with the payload.
func TestMemoryLendWrite(t *testing.T) {
	const memChunk = 1 << 20
	m, err := ioengine.NewMemory(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][2]int64{{memChunk - 10, 20}, {4<<20 - 10, 20}, {-1, 10}, {0, 0}} {
		if b := m.LendWrite(bad[0], int(bad[1])); b != nil {
			t.Fatalf("LendWrite(%d, %d) lent %d bytes", bad[0], bad[1], len(b))
		}
	}
	b := m.LendWrite(memChunk+100, 5000)
	if len(b) != 5000 || cap(b) != 5000 {
		t.Fatalf("lent len %d cap %d, want 5000", len(b), cap(b))
	}
	for i := range b {
		b[i] = byte(i%251) + 1
	}
	want := bytes.Clone(b)
	if _, err := m.WriteAt(b, memChunk+100); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5000)
	m.ReadAt(got, memChunk+100)
	if !bytes.Equal(got, want) {
		t.Fatal("lent write did not read back")
	}

	b = m.LendWrite(2*memChunk, 4096)
	copy(b, want)
	if err := m.Trim(2*memChunk, memChunk); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt(b, 2*memChunk); err != nil {
		t.Fatal(err)
	}
	got = got[:4096]
	m.ReadAt(got, 2*memChunk)
	if !bytes.Equal(got, want[:4096]) {
		t.Fatal("write lent before a trim lost its payload")
	}
}
