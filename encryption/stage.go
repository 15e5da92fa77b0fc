package encryption

import (
	"context"
	"math"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/pipeline"
)

// Stage is a volume's encryption stage. Writes are encrypted into a pooled
// buffer, or into the engine's memory (LendWrites), and passed on (the
// frontend's buffer is never changed); reads are decrypted into the
// request's buffer once the next handler has filled it, or from the
// engine's memory when it answered by reference (FlagRef). TRIM,
// WRITE_ZEROES, FLUSH and CACHE pass on as themselves.
//
// Unaligned requests are handled here, not refused: the volume keeps
// advertising a minimum block size of 1, which every NBD client may rely
// on. A write, TRIM or WRITE_ZEROES that covers part of a block
// re-encrypts that whole block (read, decrypt, merge, encrypt, write).
// That must not interleave with any other request touching the block: a
// concurrent write of the block's other bytes would be lost, and a read
// of its other bytes could see a torn ciphertext block. So every request
// holds rmw shared and a read-modify-write holds it alone: aligned
// requests (all of the kernel's, every filesystem's) pay one uncontended
// reader lock; unaligned writes, rare, are serialized.
type Stage struct {
	x    *XTS
	next pipeline.Handler
	lend WriteLender // nil unless LendWrites
	// inline is the longest request Inline vouches for.
	inline uint32
	rmw    sync.RWMutex
	rmws   atomic.Int64
}

// WriteLender is an engine that lends its own memory for a write
// (ioengine.WriteLender): LendWrite returns the engine's memory for
// [off, off+n), or nil, and a write whose Buf is that memory is not
// copied again.
type WriteLender interface {
	LendWrite(off int64, n int) []byte
}

// LendWrites lets the stage encrypt aligned writes straight into l's
// memory, which saves a pass over the data. l must be the engine the next
// handler writes to, with nothing in between that keeps or forwards the
// buffer (replication sends it to the replicas after the engine has it,
// so a replicated volume must not call this). Only ciphertext is ever
// put there. A read of the same range in flight at the same time may
// see the blocks half-encrypted, as a plain volume's may see the payload
// half-received: overlapping requests in flight have no defined result
// (pipeline.Request.Ref). Call it before the stage serves requests.
func (s *Stage) LendWrites(l WriteLender) { s.lend = l }

// NewStage returns the stage of a volume whose data key is key.
func NewStage(key []byte) (*Stage, error) {
	x, err := NewXTS(key)
	if err != nil {
		return nil, err
	}
	return &Stage{x: x, inline: inlineBytes(x.im)}, nil
}

// Wrap is the pipeline.Stage.
func (s *Stage) Wrap(next pipeline.Handler) pipeline.Handler {
	s.next = next
	return s
}

// inlineBytes is the most the stage encrypts or decrypts for a request
// that Inline vouches for: about 50 µs of one core with the assembly,
// half what receiving or sending those bytes on the socket costs.
func inlineBytes(im impl) uint32 {
	switch im {
	case implVAES:
		return 1 << 20
	case implAESNI:
		return 256 << 10
	}
	return 0
}

// Inline reports whether the stage's own work for r is short and never
// waits for I/O, so that a frontend may run r on the thread that reads
// requests (nbd.Inliner) when the stages below would too: an aligned read
// or write of at most 1 MiB with VAES, 256 KiB with AES-NI, none with the
// generic cipher (11 µs per block). Handing a request to a worker costs
// more than the cipher on these: about 7 µs per 4 KiB request and 75 µs
// per MiB on a 2-core host (`make bench-crypt`, the note of 2026-12-06),
// because the payload then goes through a second core's caches. A
// read-modify-write reads the engine and holds the stage alone, and a
// larger request would hold up every request behind it on the
// connection: they go to workers, which spread the cipher over the
// cores.
func (s *Stage) Inline(r *pipeline.Request) bool {
	switch r.Op {
	case pipeline.OpRead, pipeline.OpWrite:
		return r.Length <= s.inline && aligned(r.Offset, r.Length)
	}
	return false
}

// RMWs returns how many partial blocks the stage has re-encrypted.
func (s *Stage) RMWs() int64 { return s.rmws.Load() }

func aligned(off int64, n uint32) bool {
	return off%BlockSize == 0 && n%BlockSize == 0
}

func alignDown(off int64) int64 { return off &^ (BlockSize - 1) }
func alignUp(off int64) int64   { return (off + BlockSize - 1) &^ (BlockSize - 1) }

// Handle implements pipeline.Handler.
func (s *Stage) Handle(ctx context.Context, r *pipeline.Request) error {
	switch r.Op {
	case pipeline.OpRead:
		if r.Length == 0 || r.Offset < 0 {
			r.Flags &^= pipeline.FlagRef
			return s.next.Handle(ctx, r)
		}
		s.rmw.RLock()
		defer s.rmw.RUnlock()
		if aligned(r.Offset, r.Length) {
			return s.readAligned(ctx, r)
		}
		r.Flags &^= pipeline.FlagRef
		return s.readUnaligned(ctx, r)
	case pipeline.OpWrite:
		if r.Length == 0 || r.Offset < 0 {
			return s.next.Handle(ctx, r)
		}
		if aligned(r.Offset, r.Length) {
			s.rmw.RLock()
			defer s.rmw.RUnlock()
			return s.writeAligned(ctx, r)
		}
		s.rmw.Lock()
		defer s.rmw.Unlock()
		return s.patch(ctx, r, r.Offset, int64(r.Length), r.Buf[:r.Length], r.Flags)
	case pipeline.OpTrim, pipeline.OpWriteZeroes:
		if r.Length == 0 || r.Offset < 0 || aligned(r.Offset, r.Length) {
			s.rmw.RLock()
			defer s.rmw.RUnlock()
			return s.next.Handle(ctx, r)
		}
		s.rmw.Lock()
		defer s.rmw.Unlock()
		return s.zeroUnaligned(ctx, r)
	}
	return s.next.Handle(ctx, r)
}

// readAligned reads whole blocks and decrypts them into Buf. A read that
// may be answered by reference (FlagRef, which the frontend sets only
// when it gave Ref room) keeps the flag: when the engine lends its memory,
// the blocks are decrypted from there straight into Buf, one pass over
// the data instead of a copy into Buf and a decryption in place. Ref is
// emptied again (the answer is in Buf: plaintext never leaves by
// reference). The caller holds rmw shared, so no read-modify-write
// changes the lent blocks while they are decrypted.
func (s *Stage) readAligned(ctx context.Context, r *pipeline.Request) error {
	if err := s.next.Handle(ctx, r); err != nil {
		return err
	}
	p, first := r.Buf[:r.Length], uint64(r.Offset/BlockSize)
	if len(r.Ref) == 0 {
		s.x.DecryptBlocks(p, p, first)
		return nil
	}
	whole := true // every piece whole blocks (the memory engine's are)
	for _, q := range r.Ref {
		whole = whole && len(q)%BlockSize == 0
	}
	n := 0
	for _, q := range r.Ref {
		if whole {
			s.x.DecryptBlocks(p[n:n+len(q)], q, first+uint64(n/BlockSize))
		} else {
			copy(p[n:], q)
		}
		n += len(q)
	}
	if !whole {
		s.x.DecryptBlocks(p, p, first)
	}
	clear(r.Ref) // do not pin engine memory
	r.Ref = r.Ref[:0]
	return nil
}

// writeAligned encrypts whole blocks and writes them: straight into the
// engine's memory when the stage may borrow it (LendWrites), else into a
// pooled buffer. The frontend's buffer is never changed.
func (s *Stage) writeAligned(ctx context.Context, r *pipeline.Request) error {
	n := int(r.Length)
	first := uint64(r.Offset / BlockSize)
	plain := r.Buf
	if s.lend != nil {
		if d := s.lend.LendWrite(r.Offset, n); d != nil {
			s.x.EncryptBlocks(d, plain[:n], first)
			r.Buf = d
			err := s.next.Handle(ctx, r)
			r.Buf = plain
			return err
		}
	}
	b := getBuffer(n)
	ct := b.b[:n]
	s.x.EncryptBlocks(ct, plain[:n], first)
	r.Buf = ct
	err := s.next.Handle(ctx, r)
	r.Buf = plain
	putBuffer(b)
	return err
}

// cover returns the whole blocks around [off, off+n), refusing a span no
// request can describe.
func cover(off, n int64) (a, b int64, err error) {
	a, b = alignDown(off), alignUp(off+n)
	if b-a > math.MaxUint32 {
		return 0, 0, pipeline.ErrTooLarge
	}
	return a, b, nil
}

// readUnaligned reads the whole blocks around the request into a pooled
// buffer, decrypts them and copies out the bytes asked for.
func (s *Stage) readUnaligned(ctx context.Context, r *pipeline.Request) error {
	a, b, err := cover(r.Offset, int64(r.Length))
	if err != nil {
		return err
	}
	buf := getBuffer(int(b - a))
	p := buf.b[:b-a]
	save := *r
	r.Offset, r.Length, r.Buf = a, uint32(b-a), p
	err = s.next.Handle(ctx, r)
	*r = save
	if err == nil {
		s.x.DecryptBlocks(p, p, uint64(a/BlockSize))
		copy(r.Buf[:r.Length], p[r.Offset-a:])
	}
	putBuffer(buf)
	return err
}

// patch writes n bytes at off (data, or zeroes when data is nil) whose
// first or last block is partly outside the range: those blocks are read
// and decrypted first, so their other bytes survive. The caller holds rmw
// alone. r is borrowed for the requests to the next handler and restored.
func (s *Stage) patch(ctx context.Context, r *pipeline.Request, off, n int64, data []byte, flags pipeline.Flags) error {
	a, b, err := cover(off, n)
	if err != nil {
		return err
	}
	buf := getBuffer(int(b - a))
	p := buf.b[:b-a]
	save := *r
	defer func() {
		*r = save
		putBuffer(buf)
	}()
	head, tail := off != a, off+n != b
	if head {
		if err := s.readBlock(ctx, r, p[:BlockSize], a); err != nil {
			return err
		}
	}
	if tail && (b-BlockSize != a || !head) {
		if err := s.readBlock(ctx, r, p[len(p)-BlockSize:], b-BlockSize); err != nil {
			return err
		}
	}
	if data != nil {
		copy(p[off-a:], data)
	} else {
		clear(p[off-a : off-a+n])
	}
	s.x.EncryptBlocks(p, p, uint64(a/BlockSize))
	r.Op, r.Flags, r.Offset, r.Length, r.Buf = pipeline.OpWrite, flags&pipeline.FlagFUA, a, uint32(b-a), p
	if head || tail {
		s.rmws.Add(1)
	}
	return s.next.Handle(ctx, r)
}

// readBlock reads and decrypts the block at off into p.
func (s *Stage) readBlock(ctx context.Context, r *pipeline.Request, p []byte, off int64) error {
	r.Op, r.Flags, r.Offset, r.Length, r.Buf, r.Ref = pipeline.OpRead, 0, off, BlockSize, p, nil
	if err := s.next.Handle(ctx, r); err != nil {
		return err
	}
	s.x.DecryptBlocks(p, p, uint64(off/BlockSize))
	return nil
}

// zeroUnaligned runs a TRIM or WRITE_ZEROES that covers part of a block:
// its whole blocks pass on as the request itself (they stay holes where
// the engine punches them), its partial blocks are patched with zeroes.
func (s *Stage) zeroUnaligned(ctx context.Context, r *pipeline.Request) error {
	off, end, flags := r.Offset, r.End(), r.Flags
	ia, ib := alignUp(off), alignDown(end)
	if ia >= ib {
		// Within one block, or two partial blocks and nothing between.
		if ia > ib {
			return s.patch(ctx, r, off, end-off, nil, flags)
		}
	} else {
		r.Offset, r.Length = ia, uint32(ib-ia)
		err := s.next.Handle(ctx, r)
		r.Offset, r.Length = off, uint32(end-off)
		if err != nil {
			return err
		}
	}
	if off < ia {
		if err := s.patch(ctx, r, off, ia-off, nil, flags); err != nil {
			return err
		}
	}
	if ib < end {
		return s.patch(ctx, r, ib, end-ib, nil, flags)
	}
	return nil
}
