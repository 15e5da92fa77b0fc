package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come in power-of-two size classes from 4 KiB to 64 MiB.
// A request slot keeps a buffer of a small class across requests (so the
// steady state of small I/O never touches a pool); buffers of larger classes
// go back to a shared sync.Pool after every request so that a burst of big
// requests does not pin memory per slot.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 26 // 64 MiB: the largest MaxPayload accepted
	keepClass     = 17 - minClassShift
	numClasses    = maxClassShift - minClassShift + 1
)

type pbuf struct {
	b     []byte
	class int
}

var pools [numClasses]sync.Pool

// classOf returns the size class of an n-byte buffer (n <= 1<<maxClassShift).
func classOf(n uint32) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len32(n-1) - minClassShift
}

// getBuf returns a buffer of at least n bytes from the class pool.
func getBuf(class int) *pbuf {
	if v := pools[class].Get(); v != nil {
		return v.(*pbuf)
	}
	return &pbuf{b: make([]byte, 1<<(class+minClassShift)), class: class}
}

func putBuf(p *pbuf) { pools[p.class].Put(p) }
