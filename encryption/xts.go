package encryption

import (
	"bytes"
	"crypto/aes"
	"fmt"

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

// XTS encrypts and decrypts whole blocks of a volume with AES-256-XTS. It
// is safe for concurrent use and allocates nothing.
type XTS struct {
	c *xts.Cipher
}

// NewXTS returns the cipher of a 64-byte data key.
func NewXTS(key []byte) (*XTS, error) {
	if len(key) != DataKeySize {
		return nil, fmt.Errorf("encryption: data key of %d bytes, want %d", len(key), DataKeySize)
	}
	if bytes.Equal(key[:DataKeySize/2], key[DataKeySize/2:]) {
		// IEEE 1619 (and FIPS for XTS) require the two halves differ.
		return nil, fmt.Errorf("encryption: the two halves of an XTS key must differ")
	}
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("encryption: %w", err)
	}
	return &XTS{c: c}, nil
}

// EncryptBlocks encrypts src, whole blocks of which the first is block
// number first, into dst (len(dst) >= len(src); dst and src are the same
// memory or do not overlap).
func (x *XTS) EncryptBlocks(dst, src []byte, first uint64) {
	for i := 0; i < len(src); i += BlockSize {
		x.c.Encrypt(dst[i:i+BlockSize], src[i:i+BlockSize], first)
		first++
	}
}

// DecryptBlocks decrypts src into dst like EncryptBlocks. A block of
// src that is all zeroes is a hole (never written, trimmed or zeroed): it
// decrypts to zeroes.
func (x *XTS) DecryptBlocks(dst, src []byte, first uint64) {
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
	if decrypt {
		x.c.Decrypt(dst, src, seq)
	} else {
		x.c.Encrypt(dst, src, seq)
	}
}
