//go:build amd64 && !purego

package encryption

import (
	"unsafe"

	"golang.org/x/sys/cpu"
)

// The amd64 XTS (xts_amd64.s) runs many blocks through the AES pipeline
// at once, with the tweaks computed alongside: golang.org/x/crypto/xts
// calls AES once per 16 bytes and leaves the pipeline mostly idle.

// xtsKeys are the round keys of the two halves of a data key; the
// assembly knows this layout.
type xtsKeys struct {
	enc   [15][16]byte // the data key's (offset 0)
	dec   [15][16]byte // the data key's for AESDEC (offset 240)
	tweak [15][16]byte // the tweak key's (offset 480)
}

type fastXTS struct {
	k    xtsKeys
	impl impl
}

// impls are the implementations this CPU runs, best last.
var impls = func() []impl {
	is := []impl{implGeneric}
	if cpu.X86.HasAES {
		is = append(is, implAESNI)
		// x/sys/cpu reports VAES and VPCLMULQDQ only with AVX-512, so
		// CPUs that have them on 256-bit vectors only (Zen 3) take
		// AES-NI.
		if cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ {
			is = append(is, implVAES)
		}
	}
	return is
}()

var bestImpl = impls[len(impls)-1]

func newFast(key []byte, im impl) *fastXTS {
	f := &fastXTS{impl: im}
	expandKey256((*[32]byte)(key[:32]), &f.k.enc, &f.k.dec)
	expandKey256((*[32]byte)(key[32:]), &f.k.tweak, nil)
	return f
}

// crypt encrypts or decrypts the data units of unit bytes (a multiple of
// 16) in src into dst, the first with sequence number seq. The caller has
// checked the lengths. vaes takes units of whole 512-byte chunks (every
// 4 KiB block); aesni takes any.
func (f *fastXTS) crypt(dst, src []byte, unit int, seq uint64, decrypt bool) {
	if len(src) == 0 {
		return
	}
	d, s := unsafe.SliceData(dst), unsafe.SliceData(src)
	blocks, units := unit/16, len(src)/unit
	switch {
	case f.impl == implVAES && blocks%32 == 0 && decrypt:
		xtsDecVAES(&f.k, d, s, blocks, units, seq)
	case f.impl == implVAES && blocks%32 == 0:
		xtsEncVAES(&f.k, d, s, blocks, units, seq)
	case decrypt:
		xtsDecAESNI(&f.k, d, s, blocks, units, seq)
	default:
		xtsEncAESNI(&f.k, d, s, blocks, units, seq)
	}
}

// expandKey256 computes the AES-256 round keys of key for encryption and,
// when dec is not nil, for AESDEC.
//
//go:noescape
func expandKey256(key *[32]byte, enc, dec *[15][16]byte)

//go:noescape
func xtsEncAESNI(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)

//go:noescape
func xtsDecAESNI(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)

//go:noescape
func xtsEncVAES(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)

//go:noescape
func xtsDecVAES(k *xtsKeys, dst, src *byte, blocks, units int, seq uint64)
