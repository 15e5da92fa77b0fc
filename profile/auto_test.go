package profile

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// waitEffective drives load until the stage's effective profile is want,
// for at most 200 rounds of load (a bounded loop, not a timing assertion).
func waitEffective(t *testing.T, st *Stage, want Profile, load func()) {
	t.Helper()
	for i := 0; i < 200; i++ {
		load()
		if st.Effective() == want {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("effective profile %s after 200 rounds of load, want %s", st.Effective(), want)
}

// auto follows the workload: random reads -> random, sequential reads ->
// sequential, random writes each followed by a flush -> db, and back.
func TestAutoFollowsWorkload(t *testing.T) {
	e, _ := ioengine.NewMemory(64 << 20)
	var changes []Profile
	opts := testOptions(e)
	opts.OnChange = func(p Profile) { changes = append(changes, p) }
	st := New(Auto, opts)
	h := st.Wrap(ioengine.Handler(e))
	defer st.Close()
	ctx := context.Background()
	buf := make([]byte, 128<<10)
	pos := int64(0)
	seqRead := func() {
		for i := 0; i < 16; i++ {
			r := pipeline.Request{Op: pipeline.OpRead, Offset: pos, Length: 128 << 10, Buf: buf}
			if err := h.Handle(ctx, &r); err != nil {
				t.Fatal(err)
			}
			pos = (pos + 128<<10) % (64 << 20)
		}
	}
	n := int64(0)
	randRead := func() {
		for i := 0; i < 16; i++ {
			n = (n*6364136223846793005 + 1442695040888963407) & (1<<62 - 1)
			r := pipeline.Request{Op: pipeline.OpRead, Offset: n % (16383) * 4096, Length: 4096, Buf: buf[:4096]}
			if err := h.Handle(ctx, &r); err != nil {
				t.Fatal(err)
			}
		}
	}
	randWriteFlush := func() {
		for i := 0; i < 16; i++ {
			n = (n*6364136223846793005 + 1442695040888963407) & (1<<62 - 1)
			w := pipeline.Request{Op: pipeline.OpWrite, Offset: n % (16383) * 4096, Length: 4096, Buf: buf[:4096]}
			f := pipeline.Request{Op: pipeline.OpFlush}
			if err := h.Handle(ctx, &w); err != nil {
				t.Fatal(err)
			}
			if err := h.Handle(ctx, &f); err != nil {
				t.Fatal(err)
			}
		}
	}
	waitEffective(t, st, Random, randRead)
	waitEffective(t, st, Sequential, seqRead)
	if st.Stats().PrefetchHitBytes == 0 {
		seqRead()
		if st.Stats().PrefetchHitBytes == 0 {
			t.Error("sequential reads under the learned sequential profile never hit the prefetch cache")
		}
	}
	waitEffective(t, st, Random, randRead)
	waitEffective(t, st, DB, randWriteFlush)
	waitEffective(t, st, Sequential, seqRead)
	st.Close()
	// OnChange reported each switch (the first call is the initial one).
	want := []Profile{Random, Sequential, Random, DB, Sequential}
	var got []Profile
	for _, p := range changes {
		if len(got) == 0 || got[len(got)-1] != p {
			got = append(got, p)
		}
	}
	i := 0
	for _, p := range got {
		if i < len(want) && p == want[i] {
			i++
		}
	}
	if i < len(want) {
		t.Fatalf("OnChange saw %v, want the switches %v in order", got, want)
	}
}

// Prefetched data is invalidated by writes, trims and zeroing, and by
// drained write-back data: a read after any of them returns the new data.
func TestPrefetchInvalidation(t *testing.T) {
	const size = 32 << 20
	e, _ := ioengine.NewMemory(size)
	opts := testOptions(e)
	opts.CacheBytes = 16 << 20
	opts.WriteBackAge = time.Hour // only flushes and overlaps drain
	st := New(Sequential, opts)
	h := st.Wrap(ioengine.Handler(e))
	defer st.Close()
	ctx := context.Background()
	model := make([]byte, size)
	for i := range model {
		model[i] = byte(i / 4096)
	}
	e.WriteAt(model, 0)
	buf := make([]byte, 64<<10)
	read := func(off int64, n int) {
		t.Helper()
		r := pipeline.Request{Op: pipeline.OpRead, Offset: off, Length: uint32(n), Buf: buf[:n]}
		if err := h.Handle(ctx, &r); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:n], model[off:off+int64(n)]) {
			t.Fatalf("read %d at %d: stale data", n, off)
		}
	}
	do := func(r pipeline.Request) {
		t.Helper()
		if err := h.Handle(ctx, &r); err != nil {
			t.Fatal(err)
		}
	}
	// A sequential stream from 0: prefetch runs ahead.
	for off := int64(0); off < 4<<20; off += 64 << 10 {
		read(off, 64<<10)
	}
	if st.Stats().PrefetchedBytes == 0 {
		t.Fatal("a 4 MiB sequential read stream prefetched nothing")
	}
	// Change ranges ahead of the stream, which are (being) prefetched.
	big := bytes.Repeat([]byte{0xee}, 256<<10) // larger than the write-back takes
	do(pipeline.Request{Op: pipeline.OpWrite, Offset: 5 << 20, Length: uint32(len(big)), Buf: big})
	copy(model[5<<20:], big)
	small := bytes.Repeat([]byte{0xdd}, 4096) // buffered
	do(pipeline.Request{Op: pipeline.OpWrite, Offset: 6<<20 + 4096, Length: 4096, Buf: small})
	copy(model[6<<20+4096:], small)
	do(pipeline.Request{Op: pipeline.OpTrim, Offset: 7 << 20, Length: 8192})
	clear(model[7<<20 : 7<<20+8192])
	do(pipeline.Request{Op: pipeline.OpWriteZeroes, Offset: 4<<20 + 100, Length: 5000})
	clear(model[4<<20+100 : 4<<20+5100])
	for off := int64(4 << 20); off < 8<<20; off += 64 << 10 {
		read(off, 64<<10)
	}
	// The buffered write drains (flush); the cache must not hold the
	// pre-write data for it afterwards.
	do(pipeline.Request{Op: pipeline.OpFlush})
	for off := int64(4 << 20); off < 8<<20; off += 64 << 10 {
		read(off, 64<<10)
	}
	if st.Stats().PrefetchHitBytes == 0 {
		t.Error("no read was served from the prefetch cache")
	}
}
