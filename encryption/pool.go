package encryption

import (
	"math/bits"
	"sync"
)

// Buffers for ciphertext and for the blocks of unaligned requests, by
// size class: 4 KiB, 8 KiB, ... 32 MiB (NBD's largest request). A request
// borrows one and gives it back before it returns, so the steady state
// allocates nothing.
const (
	minClassShift = 12
	numClasses    = 14 // up to 4 KiB << 13 = 32 MiB
)

type buffer struct{ b []byte }

var pools [numClasses]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuffer returns a buffer whose b holds at least n bytes (its
// contents are garbage); putBuffer gives it back.
func getBuffer(n int) *buffer {
	c := classOf(n)
	if c >= numClasses {
		return &buffer{b: make([]byte, n)} // larger than any NBD request
	}
	if b, ok := pools[c].Get().(*buffer); ok {
		return b
	}
	return &buffer{b: make([]byte, 1<<(c+minClassShift))}
}

func putBuffer(b *buffer) {
	if c := classOf(len(b.b)); c < numClasses && len(b.b) == 1<<(c+minClassShift) {
		pools[c].Put(b)
	}
}
