package encryption

import (
	"context"
	"crypto/rand"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// BenchmarkXTS is the ceiling: AES-256-XTS of this CPU, one 4 KiB block
// and one 1 MiB run of blocks, with nothing else around it, through each
// implementation the CPU runs (generic is golang.org/x/crypto/xts).
func BenchmarkXTS(b *testing.B) {
	key := NewDataKey()
	for _, im := range impls {
		x, err := newXTS(key, im)
		if err != nil {
			b.Fatal(err)
		}
		for _, n := range []int{BlockSize, 1 << 20} {
			src, dst := make([]byte, n), make([]byte, n)
			rand.Read(src)
			b.Run(im.String()+"/"+sizeName(n)+"/encrypt", func(b *testing.B) {
				b.SetBytes(int64(n))
				b.ReportAllocs()
				for i := range b.N {
					x.EncryptBlocks(dst, src, uint64(i))
				}
			})
			b.Run(im.String()+"/"+sizeName(n)+"/decrypt", func(b *testing.B) {
				b.SetBytes(int64(n))
				b.ReportAllocs()
				for i := range b.N {
					x.DecryptBlocks(dst, src, uint64(i))
				}
			})
		}
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return "1MiB"
	}
	return "4KiB"
}

// BenchmarkStage: requests through the stage to a memory engine, against
// the same without the stage (plain): what the stage costs per request.
// encrypted copies (a pooled ciphertext buffer for writes, reads decrypted
// in place); lent is how the daemon runs a memory volume: writes encrypted
// straight into the engine's memory (LendWrites) and reads offered by
// reference (FlagRef, as the NBD server offers them) and decrypted from
// the engine's memory.
func BenchmarkStage(b *testing.B) {
	const size = 64 << 20
	for _, mode := range []string{"plain", "encrypted", "lent"} {
		e := memory(b, size)
		var h pipeline.Handler = ioengine.Handler(e)
		if mode != "plain" {
			s := newStage(b)
			if mode == "lent" {
				s.LendWrites(e.(WriteLender))
			}
			h = pipeline.Chain(h, s.Wrap)
		}
		for _, n := range []int{BlockSize, 1 << 20} {
			buf := make([]byte, n)
			rand.Read(buf)
			for _, op := range []pipeline.Op{pipeline.OpWrite, pipeline.OpRead} {
				b.Run(mode+"/"+op.String()+"/"+sizeName(n), func(b *testing.B) {
					b.SetBytes(int64(n))
					b.ReportAllocs()
					refs := make([][]byte, 0, 3)
					var fl pipeline.Flags
					if mode == "lent" && op == pipeline.OpRead {
						fl = pipeline.FlagRef
					}
					r := pipeline.Request{}
					ctx := context.Background()
					for i := range b.N {
						r = pipeline.Request{Op: op, Flags: fl, Offset: int64(i*n) % size, Length: uint32(n), Buf: buf, Ref: refs[:0]}
						if err := h.Handle(ctx, &r); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}
