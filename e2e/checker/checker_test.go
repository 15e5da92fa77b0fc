package checker

import (
	"context"
	"errors"
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

	// Lose a flushed write: block 5 back to zeroes.
	copy(dev.data[5*BlockSize:6*BlockSize], make([]byte, BlockSize))
	// Tear block 6, and put block 8's content in block 7.
	dev.data[6*BlockSize+100] ^= 1
	copy(dev.data[7*BlockSize:8*BlockSize], dev.data[8*BlockSize:9*BlockSize])
	rep, _ = c.Verify(dev)
	all := strings.Join(rep.Problems, "\n")
	if rep.Lost != 3 || !strings.Contains(all, "block 5: token 0, older") || !strings.Contains(all, "block 6: torn") || !strings.Contains(all, "block 7: holds block 8") {
		t.Fatalf("damage not caught: %v", rep)
	}
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
