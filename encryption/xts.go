package encryption

import (
	"bytes"
	"crypto/aes"
	"fmt"
	"unsafe"

	"golang.org/x/crypto/xts"
)

// BlockSize is the XTS data unit: every 4 KiB block of a volume is
// encrypted on its own with its block number (offset / BlockSize) as the
// tweak, so a block can be read or rewritten without its neighbours.
const BlockSize = 4096

// Cipher is the one cipher blockd encrypts volumes with, as the volume
// metadata names it.
const Cipher = "aes-256-xts"

// DataKeySize is the size of a volume's data key: AES-256-XTS takes two
// AES-256 keys, one for the data and one for the tweak.
const DataKeySize = 64

// zeroBlock is what a hole reads as.
var zeroBlock [BlockSize]byte

// impl is an implementation of AES-256-XTS.
type impl int

const (
	// implGeneric is golang.org/x/crypto/xts over crypto/aes: one AES
	// call per 16 bytes. Every platform has it.
	implGeneric impl = iota
	// implAESNI is xts_amd64.s with AES-NI, 8 blocks at a time.
	implAESNI
	// implVAES is xts_amd64.s with VAES on 512-bit vectors (AVX-512),
	// 32 blocks at a time.
	implVAES
)

func (i impl) String() string {
	switch i {
	case implAESNI:
		return "aesni"
	case implVAES:
		return "vaes"
	}
	return "generic"
}

// XTS encrypts and decrypts whole blocks of a volume with AES-256-XTS. It
// is safe for concurrent use and allocates nothing.
type XTS struct {
	f  *fastXTS    // the CPU's own (xts_amd64.go), or nil
	c  *xts.Cipher // when f is nil
	im impl
}

// Impl names the implementation x runs: vaes, aesni or generic
// (golang.org/x/crypto/xts).
func (x *XTS) Impl() string { return x.im.String() }

// NewXTS returns the cipher of a 64-byte data key.
func NewXTS(key []byte) (*XTS, error) {
	return newXTS(key, bestImpl)
}

// newXTS is NewXTS with a given implementation, which must be one of
// impls.
func newXTS(key []byte, im impl) (*XTS, error) {
	if len(key) != DataKeySize {
		return nil, fmt.Errorf("encryption: data key of %d bytes, want %d", len(key), DataKeySize)
	}
	if bytes.Equal(key[:DataKeySize/2], key[DataKeySize/2:]) {
		// IEEE 1619 (and FIPS for XTS) require the two halves differ.
		return nil, fmt.Errorf("encryption: the two halves of an XTS key must differ")
	}
	if im != implGeneric {
		return &XTS{f: newFast(key, im), im: im}, nil
	}
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("encryption: %w", err)
	}
	return &XTS{c: c, im: implGeneric}, nil
}

// EncryptBlocks encrypts src, whole blocks of which the first is block
// number first, into dst (len(dst) >= len(src); dst and src are the same
// memory or do not overlap).
func (x *XTS) EncryptBlocks(dst, src []byte, first uint64) {
	checkBlocks(dst, src)
	if x.f != nil {
		x.f.crypt(dst, src, BlockSize, first, false)
		return
	}
	for i := 0; i < len(src); i += BlockSize {
		x.c.Encrypt(dst[i:i+BlockSize], src[i:i+BlockSize], first)
		first++
	}
}

// DecryptBlocks decrypts src into dst like EncryptBlocks. A block of
// src that is all zeroes is a hole (never written, trimmed or zeroed): it
// decrypts to zeroes.
func (x *XTS) DecryptBlocks(dst, src []byte, first uint64) {
	checkBlocks(dst, src)
	if x.f != nil {
		// Runs of blocks that are not holes go to the cipher at once.
		run := 0 // the first block of the current run, in bytes
		for i := 0; i < len(src); i += BlockSize {
			if bytes.Equal(src[i:i+BlockSize], zeroBlock[:]) {
				if run < i {
					x.f.crypt(dst[run:i], src[run:i], BlockSize, first+uint64(run/BlockSize), true)
				}
				clear(dst[i : i+BlockSize])
				run = i + BlockSize
			}
		}
		if run < len(src) {
			x.f.crypt(dst[run:len(src)], src[run:], BlockSize, first+uint64(run/BlockSize), true)
		}
		return
	}
	for i := 0; i < len(src); i += BlockSize {
		s, d := src[i:i+BlockSize], dst[i:i+BlockSize]
		if bytes.Equal(s, zeroBlock[:]) {
			clear(d)
		} else {
			x.c.Decrypt(d, s, first)
		}
		first++
	}
}

// Unit encrypts (or decrypts) one data unit of any multiple of 16 bytes
// with sequence number seq, without the hole rule: the IEEE 1619 test
// vectors use 512-byte units.
func (x *XTS) Unit(dst, src []byte, seq uint64, decrypt bool) {
	if x.f != nil {
		if len(src)%16 != 0 {
			panic("encryption: XTS unit is not a multiple of 16 bytes")
		}
		checkOverlap(dst, src)
		x.f.crypt(dst, src, len(src), seq, decrypt)
		return
	}
	if decrypt {
		x.c.Decrypt(dst, src, seq)
	} else {
		x.c.Encrypt(dst, src, seq)
	}
}

// checkBlocks panics unless src is whole blocks, dst is as long, and they
// are the same memory or do not overlap.
func checkBlocks(dst, src []byte) {
	if len(src)%BlockSize != 0 {
		panic("encryption: not a whole number of blocks")
	}
	checkOverlap(dst, src)
}

// checkOverlap panics unless len(dst) >= len(src) and dst and src are the
// same memory or do not overlap (a cipher that reads ahead of where it
// writes would garble a partial overlap).
func checkOverlap(dst, src []byte) {
	if len(dst) < len(src) {
		panic("encryption: output shorter than input")
	}
	if len(src) == 0 {
		return
	}
	d, s := uintptr(unsafe.Pointer(&dst[0])), uintptr(unsafe.Pointer(&src[0]))
	if d != s && d < s+uintptr(len(src)) && s < d+uintptr(len(src)) {
		panic("encryption: input and output overlap")
	}
}
