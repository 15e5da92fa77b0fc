package checker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// memDev is a device in memory that can lose what was not flushed.
type memDev struct {
	mu      sync.Mutex
	data    []byte
	durable []byte
}

func newMemDev(n int) *memDev { return &memDev{data: make([]byte, n), durable: make([]byte, n)} }

func (d *memDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return copy(p, d.data[off:]), nil
}
func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return copy(d.data[off:], p), nil
}
func (d *memDev) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	copy(d.durable, d.data)
	return nil
}
func (d *memDev) crash() {
	d.mu.Lock()
	copy(d.data, d.durable)
	d.mu.Unlock()
}

func run(t *testing.T, dev *memDev, c *Checker) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	c.Run(ctx, Options{FlushEvery: 10, Dial: func(context.Context, int) (Device, error) { return dev, nil }})
}

// A crash that keeps every flushed write passes; one that loses a flushed
// write, tears a block or misplaces one is caught.
func TestChecker(t *testing.T) {
	dev := newMemDev(64 * BlockSize)
	c := New(0, 64, 4)
	run(t, dev, c)
	dev.crash() // unflushed writes are gone: allowed
	rep, err := c.Verify(dev)
	if err != nil || rep.Lost != 0 || rep.Flushed == 0 {
		t.Fatalf("after a crash keeping flushed writes: %v %v", rep, err)
	}
	if c.Writes.Load() == 0 || c.Errors.Load() != 0 {
		t.Fatalf("writes %d errors %d", c.Writes.Load(), c.Errors.Load())
	}

	// Damage four blocks that hold a flushed write (which ones did get
	// one depends on the scheduler): lose one, tear one, and put one's
	// content in another.
	var written []int
	for b := 0; b < 64 && len(written) < 4; b++ {
		if !isZeroBlock(dev.data[b*BlockSize : (b+1)*BlockSize]) {
			written = append(written, b)
		}
	}
	if len(written) < 4 {
		t.Fatalf("only %d blocks were written in the run", len(written))
	}
	lost, torn, to, from := written[0], written[1], written[2], written[3]
	copy(dev.data[lost*BlockSize:(lost+1)*BlockSize], make([]byte, BlockSize))
	dev.data[torn*BlockSize+100] ^= 1
	copy(dev.data[to*BlockSize:(to+1)*BlockSize], dev.data[from*BlockSize:(from+1)*BlockSize])
	rep, _ = c.Verify(dev)
	all := strings.Join(rep.Problems, "\n")
	if rep.Lost != 3 || !strings.Contains(all, fmt.Sprintf("block %d: token 0, older", lost)) ||
		!strings.Contains(all, fmt.Sprintf("block %d: torn", torn)) || !strings.Contains(all, fmt.Sprintf("block %d: holds block %d", to, from)) {
		t.Fatalf("damage not caught: %v", rep)
	}
}

func isZeroBlock(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

type failingDev struct{ *memDev }

func (failingDev) WriteAt([]byte, int64) (int, error) { return 0, errors.New("EIO") }

func TestCheckerCountsErrors(t *testing.T) {
	dev := newMemDev(16 * BlockSize)
	c := New(0, 16, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	c.Run(ctx, Options{Dial: func(context.Context, int) (Device, error) { return failingDev{dev}, nil }})
	if c.Errors.Load() == 0 || c.FirstError() == nil || c.Acks.Load() != 0 {
		t.Fatalf("errors %d, acks %d", c.Errors.Load(), c.Acks.Load())
	}
	// Failed writes are issued but never acked: a zero block is fine.
	if rep, _ := c.Verify(dev); rep.Lost != 0 {
		t.Fatalf("%v", rep)
	}
}
