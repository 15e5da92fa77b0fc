package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come in power-of-two size classes from 4 KiB to 64 MiB.
// A request slot keeps a buffer of up to 16 KiB across requests (so the
// steady state of small I/O never touches a pool); buffers of larger classes
// go back to a shared sync.Pool after every request, so that the memory of
// a node with hundreds of connections follows the I/O in flight, not the
// largest request each slot ever saw (a sync.Pool empties over two garbage
// collections when idle).
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 26 // 64 MiB: the largest MaxPayload accepted
	keepClass     = 14 - minClassShift
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
