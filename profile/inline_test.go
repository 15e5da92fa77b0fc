package profile

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// TestInlineHint: Stage.Inline says yes exactly for the requests the stage
// answers from its own memory or the page cache, and each yes is followed
// by a Handle that returns the right data.
func TestInlineHint(t *testing.T) {
	const size = 32 << 20
	ctx := context.Background()
	req := func(op pipeline.Op, off int64, n int, flags pipeline.Flags) *pipeline.Request {
		return &pipeline.Request{Op: op, Flags: flags, Offset: off, Length: uint32(n), Buf: make([]byte, n)}
	}

	t.Run("sequential", func(t *testing.T) {
		e, _ := ioengine.NewMemory(size) // not InMemory to the stage: it prefetches
		model := make([]byte, size)
		for i := range model {
			model[i] = byte(i/4096 + 1)
		}
		e.WriteAt(model, 0)
		opts := testOptions(e)
		opts.CacheBytes = 16 << 20
		opts.WriteBackAge = time.Hour // only flushes, overlaps and the bound drain
		st := New(Sequential, opts)
		h := st.Wrap(ioengine.Handler(e))
		defer st.Close()

		if st.Inline(req(pipeline.OpRead, 8<<20, 4096, 0)) {
			t.Fatal("a read with nothing cached was offered inline")
		}
		// A sequential stream from 0 makes the stage prefetch ahead of it.
		for off := int64(0); off < 4<<20; off += 64 << 10 {
			if err := h.Handle(ctx, req(pipeline.OpRead, off, 64<<10, 0)); err != nil {
				t.Fatal(err)
			}
		}
		ahead := int64(4 << 20)
		deadline := time.Now().Add(10 * time.Second)
		for !st.Inline(req(pipeline.OpRead, ahead, 128<<10, 0)) {
			if time.Now().After(deadline) {
				t.Fatal("the range ahead of a sequential stream never became an inline read")
			}
			time.Sleep(time.Millisecond)
		}
		hits := st.Stats().PrefetchHitBytes
		r := req(pipeline.OpRead, ahead, 128<<10, 0)
		if err := h.Handle(ctx, r); err != nil || !bytes.Equal(r.Buf, model[ahead:ahead+128<<10]) {
			t.Fatalf("inline read: %v, data equal %v", err, bytes.Equal(r.Buf, model[ahead:ahead+128<<10]))
		}
		if st.Stats().PrefetchHitBytes-hits != 128<<10 {
			t.Fatal("the read offered inline was not served from the cache")
		}
		if st.Inline(req(pipeline.OpRead, 30<<20, 4096, 0)) {
			t.Fatal("an uncached range far from the stream was offered inline")
		}

		// Writes go into the write-back buffer while it has room.
		w := req(pipeline.OpWrite, ahead+4096, 4096, 0)
		copy(w.Buf, bytes.Repeat([]byte{0xab}, 4096))
		if !st.Inline(w) {
			t.Fatal("a small write with room in the write-back buffer was not offered inline")
		}
		if err := h.Handle(ctx, w); err != nil {
			t.Fatal(err)
		}
		copy(model[ahead+4096:], w.Buf)
		if st.Stats().BufferedWrites != 1 {
			t.Fatalf("buffered writes %d, want 1", st.Stats().BufferedWrites)
		}
		// A read overlapping buffered data needs the overlay: not inline,
		// and Handle still returns the new data.
		r = req(pipeline.OpRead, ahead, 16<<10, 0)
		if st.Inline(r) {
			t.Fatal("a read overlapping the write-back buffer was offered inline")
		}
		if err := h.Handle(ctx, r); err != nil || !bytes.Equal(r.Buf, model[ahead:ahead+16<<10]) {
			t.Fatalf("read over buffered write: %v, data equal %v", err, bytes.Equal(r.Buf, model[ahead:ahead+16<<10]))
		}
		for _, tc := range []struct {
			name string
			r    *pipeline.Request
		}{
			{"FUA write", req(pipeline.OpWrite, 0, 4096, pipeline.FlagFUA)},
			{"write past the end", req(pipeline.OpWrite, size, 4096, 0)},
			{"flush", req(pipeline.OpFlush, 0, 0, 0)},
			{"trim", req(pipeline.OpTrim, 0, 4096, 0)},
		} {
			if st.Inline(tc.r) {
				t.Errorf("%s offered inline", tc.name)
			}
		}
		// While a drain holds the buffer, nothing that needs it is offered.
		st.wb.mu.Lock()
		if st.Inline(req(pipeline.OpWrite, 20<<20, 4096, 0)) {
			t.Error("a write was offered inline while the write-back buffer was locked")
		}
		st.wb.mu.Unlock()
		// Fill the buffer to its bound: then a write would drain.
		for off := int64(16 << 20); st.Inline(req(pipeline.OpWrite, off, 128<<10, 0)); off += 256 << 10 {
			if off > 24<<20 {
				t.Fatal("the write-back buffer never ran out of room")
			}
			if err := h.Handle(ctx, req(pipeline.OpWrite, off, 128<<10, 0)); err != nil {
				t.Fatal(err)
			}
		}
		if got, limit := st.wb.count.Load(), int32(opts.WriteBackBytes/slabSize); got != limit {
			t.Fatalf("write-back buffer holds %d extents when Inline says no, want its limit %d", got, limit)
		}
	})

	t.Run("db", func(t *testing.T) {
		e := openFile(t, size)
		defer e.Close()
		st := New(DB, testOptions(e)) // Cached: the file engine's page-cache path
		h := st.Wrap(ioengine.Handler(e))
		defer st.Close()
		w := req(pipeline.OpWrite, 1<<20, 4096, 0)
		copy(w.Buf, bytes.Repeat([]byte{0x5a}, 4096))
		if !st.Inline(w) {
			t.Fatal("a db write into the page cache was not offered inline")
		}
		if err := h.Handle(ctx, w); err != nil {
			t.Fatal(err)
		}
		if st.Inline(req(pipeline.OpWrite, 1<<20, 4096, pipeline.FlagFUA)) || st.Inline(req(pipeline.OpRead, 1<<20, 4096, 0)) {
			t.Fatal("a FUA write or an engine read under db was offered inline")
		}
		r := req(pipeline.OpRead, 1<<20, 4096, 0)
		if err := h.Handle(ctx, r); err != nil || !bytes.Equal(r.Buf, w.Buf) {
			t.Fatalf("read after inline db write: %v, data equal %v", err, bytes.Equal(r.Buf, w.Buf))
		}

		// Without a page-cache path, db writes go to the engine.
		noCache := testOptions(e)
		noCache.Cached = nil
		st2 := New(DB, noCache)
		defer st2.Close()
		if st2.Inline(req(pipeline.OpWrite, 0, 4096, 0)) {
			t.Fatal("a db write without a page-cache path was offered inline")
		}
	})

	t.Run("none and in-memory", func(t *testing.T) {
		e, _ := ioengine.NewMemory(size)
		st := New(None, testOptions(e))
		defer st.Close()
		opts := testOptions(e)
		opts.InMemory = true
		mem := New(Sequential, opts)
		defer mem.Close()
		for _, r := range []*pipeline.Request{req(pipeline.OpRead, 0, 4096, 0), req(pipeline.OpWrite, 0, 4096, 0)} {
			if st.Inline(r) || mem.Inline(r) {
				t.Errorf("%v offered inline under none or on an in-memory stage", r.Op)
			}
		}
	})
}
