package encryption

import (
	"bytes"
	"crypto/aes"
	"math"
	"math/rand/v2"
	"testing"

	"golang.org/x/crypto/xts"
)

// randKey is a data key from rng whose halves differ.
func randKey(rng *rand.Rand) []byte {
	key := make([]byte, DataKeySize)
	for i := range key {
		key[i] = byte(rng.Uint32())
	}
	if bytes.Equal(key[:32], key[32:]) {
		key[0] ^= 1
	}
	return key
}

func randBytes(rng *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

// ref is golang.org/x/crypto/xts itself, unit by unit.
type ref struct{ c *xts.Cipher }

func newRef(t testing.TB, key []byte) ref {
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	return ref{c}
}

func (r ref) units(src []byte, unit int, seq uint64, decrypt bool) []byte {
	out := make([]byte, len(src))
	for i := 0; i < len(src); i += unit {
		if decrypt {
			r.c.Decrypt(out[i:i+unit], src[i:i+unit], seq)
		} else {
			r.c.Encrypt(out[i:i+unit], src[i:i+unit], seq)
		}
		seq++
	}
	return out
}

// checkImpl compares every implementation's EncryptBlocks, DecryptBlocks
// (with holes) and Unit (of n 16-byte blocks, any n) with x/crypto/xts.
func checkImpl(t *testing.T, rng *rand.Rand, key []byte, seq uint64, units, n int) {
	t.Helper()
	r := newRef(t, key)
	pt := randBytes(rng, units*BlockSize)
	wantCT := r.units(pt, BlockSize, seq, false)
	// Holes: ciphertext blocks of zeroes decrypt to zeroes.
	holed := bytes.Clone(wantCT)
	for i := range units {
		if rng.IntN(4) == 0 {
			clear(holed[i*BlockSize : (i+1)*BlockSize])
		}
	}
	wantHoled := r.units(holed, BlockSize, seq, true)
	for i := range units {
		if bytes.Equal(holed[i*BlockSize:(i+1)*BlockSize], zeroBlock[:]) {
			clear(wantHoled[i*BlockSize : (i+1)*BlockSize])
		}
	}
	upt := randBytes(rng, 16*n)
	wantU := r.units(upt, len(upt), seq, false)

	for _, im := range impls {
		x, err := newXTS(key, im)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(pt))
		x.EncryptBlocks(got, pt, seq)
		if !bytes.Equal(got, wantCT) {
			t.Fatalf("%v: EncryptBlocks of %d blocks from %#x differs from x/crypto/xts", im, units, seq)
		}
		x.DecryptBlocks(got, got, seq) // in place
		if !bytes.Equal(got, pt) {
			t.Fatalf("%v: DecryptBlocks of %d blocks from %#x did not give the plaintext back", im, units, seq)
		}
		x.DecryptBlocks(got, holed, seq)
		if !bytes.Equal(got, wantHoled) {
			t.Fatalf("%v: DecryptBlocks of %d blocks with holes from %#x differs from x/crypto/xts", im, units, seq)
		}
		gotU := make([]byte, len(upt))
		x.Unit(gotU, upt, seq, false)
		if !bytes.Equal(gotU, wantU) {
			t.Fatalf("%v: a unit of %d 16-byte blocks, seq %#x, differs from x/crypto/xts", im, n, seq)
		}
		x.Unit(gotU, gotU, seq, true)
		if !bytes.Equal(gotU, upt) {
			t.Fatalf("%v: a unit of %d 16-byte blocks, seq %#x, did not decrypt back", im, n, seq)
		}
	}
}

// Every implementation against x/crypto/xts: random keys, block numbers
// small, past 2^32 and 2^63 and at the end of the range (the next unit's
// wraps to 0, as in x/crypto/xts), runs of up to 9 blocks, and units of
// any number of 16-byte blocks (the 8-at-a-time loops and their tails).
func TestXTSMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1619, 2007))
	seqs := []uint64{0, 1, 255, 256, 1<<32 - 1, 1 << 32, 1<<32 + 1, 1<<63 - 1, 1 << 63, 1<<63 + 7, math.MaxUint64 - 1, math.MaxUint64}
	for i := range 60 {
		seq := rng.Uint64()
		if i < len(seqs) {
			seq = seqs[i]
		}
		n := 1 + rng.IntN(70)
		switch i % 4 {
		case 0:
			n = 1 + rng.IntN(600)
		case 1: // whole 512-byte chunks, which VAES takes
			n = 32 * (1 + rng.IntN(16))
		}
		checkImpl(t, rng, randKey(rng), seq, 1+rng.IntN(9), n)
	}
}

// FuzzXTS: any key, block number and length, every implementation as
// x/crypto/xts. The seeds run under plain `go test`.
func FuzzXTS(f *testing.F) {
	f.Add(uint64(1), uint64(0), uint8(0), uint16(0))
	f.Add(uint64(2), uint64(1<<32), uint8(1), uint16(6))
	f.Add(uint64(3), uint64(1<<63), uint8(2), uint16(7))
	f.Add(uint64(4), uint64(math.MaxUint64), uint8(1), uint16(8))
	f.Add(uint64(5), uint64(12345), uint8(7), uint16(255))
	f.Add(uint64(6), uint64(1<<40+3), uint8(0), uint16(31))
	f.Add(uint64(7), uint64(1<<63-1), uint8(15), uint16(1023))
	f.Fuzz(func(t *testing.T, keySeed, seq uint64, units uint8, n uint16) {
		rng := rand.New(rand.NewPCG(keySeed, seq))
		checkImpl(t, rng, randKey(rng), seq, int(units%16)+1, int(n%1024)+1)
	})
}

// The length and overlap rules hold on every implementation.
func TestXTSPanics(t *testing.T) {
	key := NewDataKey()
	buf := make([]byte, 3*BlockSize)
	for _, im := range impls {
		x, err := newXTS(key, im)
		if err != nil {
			t.Fatal(err)
		}
		for name, f := range map[string]func(){
			"not whole blocks":   func() { x.EncryptBlocks(buf, buf[:BlockSize+16], 0) },
			"short dst":          func() { x.EncryptBlocks(buf[:BlockSize], buf[BlockSize:], 0) },
			"overlap":            func() { x.EncryptBlocks(buf[16:BlockSize+16], buf[:BlockSize], 0) },
			"decrypt overlap":    func() { x.DecryptBlocks(buf[BlockSize:], buf[:2*BlockSize], 0) },
			"unit of 17 bytes":   func() { x.Unit(buf[BlockSize:], buf[:17], 0, false) },
			"unit short dst":     func() { x.Unit(buf[:16], buf[BlockSize:BlockSize+32], 0, true) },
			"unit partly shared": func() { x.Unit(buf[32:64], buf[16:48], 0, false) },
		} {
			func() {
				defer func() {
					if recover() == nil {
						t.Errorf("%v: %s did not panic", im, name)
					}
				}()
				f()
			}()
		}
	}
}
