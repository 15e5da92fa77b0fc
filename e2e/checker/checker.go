// Package checker drives a volume with writes it can account for, for
// fault tests: every write carries a unique token for its block, and the
// checker records which writes were acknowledged and which were covered by
// an acknowledged FLUSH. After the faults, Verify reads every block back:
// a block must hold the token of its last flushed write or of a later
// write that was issued (acknowledged or not); anything older, torn or
// foreign is a lost write.
package checker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
	"sync/atomic"
	"time"
)

// BlockSize is the size of every write.
const BlockSize = 4096

const magic = 0x626c6b636b6572 // "blkcker"

// Device is what the checker writes and reads: an NBD connection, say.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Flush() error
}

// Checker accounts for the writes of several writers to a range of
// blocks. Each writer owns every Writers-th block, so a block's writes are
// ordered by its writer.
type Checker struct {
	Base    int64 // byte offset of block 0
	Blocks  int   // blocks in the range
	Writers int

	mu      sync.Mutex
	issued  []uint64 // highest token sent, per block
	acked   []uint64 // highest token acknowledged
	flushed []uint64 // highest token covered by an acknowledged FLUSH

	Writes, Acks, Flushes, Errors atomic.Int64
	next                          atomic.Uint64
	errMu                         sync.Mutex
	firstErr                      error
}

// New returns a checker of blocks blocks from base, for writers writers.
func New(base int64, blocks, writers int) *Checker {
	return &Checker{Base: base, Blocks: blocks, Writers: writers,
		issued: make([]uint64, blocks), acked: make([]uint64, blocks), flushed: make([]uint64, blocks)}
}

// Options of a Run.
type Options struct {
	// FlushEvery is how many writes a writer makes between FLUSHes.
	FlushEvery int
	// Dial opens a device for writer w; after an error the writer dials
	// again (a failover moves the volume to another node).
	Dial func(ctx context.Context, w int) (Device, error)
	// Pause between writes of a writer (0: none).
	Pause time.Duration
}

// Run drives the writers until ctx ends. Errors do not stop it: they are
// counted (a write that failed may or may not have landed).
func (c *Checker) Run(ctx context.Context, o Options) {
	var wg sync.WaitGroup
	for w := 0; w < c.Writers; w++ {
		wg.Add(1)
		go func(w int) { // one per writer; ends with ctx
			defer wg.Done()
			c.writer(ctx, w, o)
		}(w)
	}
	wg.Wait()
}

func (c *Checker) noteErr(err error) {
	c.Errors.Add(1)
	c.errMu.Lock()
	if c.firstErr == nil {
		c.firstErr = err
	}
	c.errMu.Unlock()
}

// FirstError is the first error a writer saw.
func (c *Checker) FirstError() error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	return c.firstErr
}

func (c *Checker) writer(ctx context.Context, w int, o Options) {
	var dev Device
	buf := make([]byte, BlockSize)
	mine := (c.Blocks - w + c.Writers - 1) / c.Writers
	if mine <= 0 {
		return
	}
	var unflushed []int // blocks acked since this writer's last flush
	for i := 0; ctx.Err() == nil; i++ {
		if dev == nil {
			d, err := o.Dial(ctx, w)
			if err != nil {
				if ctx.Err() == nil {
					time.Sleep(50 * time.Millisecond)
				}
				continue
			}
			dev = d
		}
		b := w + (i%mine)*c.Writers
		tok := c.next.Add(1)
		c.mu.Lock()
		c.issued[b] = tok
		c.mu.Unlock()
		encode(buf, b, tok)
		c.Writes.Add(1)
		if _, err := dev.WriteAt(buf, c.Base+int64(b)*BlockSize); err != nil {
			c.noteErr(fmt.Errorf("writer %d: write block %d: %w", w, b, err))
			closeDev(dev)
			dev = nil
			continue
		}
		c.Acks.Add(1)
		c.mu.Lock()
		c.acked[b] = tok
		c.mu.Unlock()
		unflushed = append(unflushed, b)
		if o.FlushEvery > 0 && len(unflushed) >= o.FlushEvery {
			if err := dev.Flush(); err != nil {
				c.noteErr(fmt.Errorf("writer %d: flush: %w", w, err))
				closeDev(dev)
				dev = nil
				continue
			}
			c.Flushes.Add(1)
			c.mu.Lock()
			for _, fb := range unflushed {
				c.flushed[fb] = max(c.flushed[fb], c.acked[fb])
			}
			c.mu.Unlock()
			unflushed = unflushed[:0]
		}
		if o.Pause > 0 {
			time.Sleep(o.Pause)
		}
	}
	closeDev(dev)
}

func closeDev(d Device) {
	if cl, ok := d.(interface{ Close() error }); ok && d != nil {
		cl.Close()
	}
}

// encode fills buf with block b's write of token tok: a header (magic,
// block, token) and a body derived from both, with a CRC at the end, so a
// torn or misplaced block is caught.
func encode(buf []byte, b int, tok uint64) {
	binary.LittleEndian.PutUint64(buf[0:], magic)
	binary.LittleEndian.PutUint64(buf[8:], uint64(b))
	binary.LittleEndian.PutUint64(buf[16:], tok)
	x := tok*0x9e3779b97f4a7c15 ^ uint64(b)
	for i := 24; i < BlockSize-4; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(buf[i:], x)
	}
	binary.LittleEndian.PutUint32(buf[BlockSize-4:], crc32.ChecksumIEEE(buf[:BlockSize-4]))
}

// decode returns the token in a block's bytes: 0 for a block never
// written (all zeroes), an error for anything that is not a whole write
// of that block.
func decode(buf []byte, b int) (uint64, error) {
	if binary.LittleEndian.Uint64(buf[0:]) == 0 && allZero(buf) {
		return 0, nil
	}
	if binary.LittleEndian.Uint64(buf[0:]) != magic {
		return 0, errors.New("not a checker block")
	}
	if got := int(binary.LittleEndian.Uint64(buf[8:])); got != b {
		return 0, fmt.Errorf("holds block %d's write", got)
	}
	if crc32.ChecksumIEEE(buf[:BlockSize-4]) != binary.LittleEndian.Uint32(buf[BlockSize-4:]) {
		return 0, errors.New("torn (checksum mismatch)")
	}
	return binary.LittleEndian.Uint64(buf[16:]), nil
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// Report is what Verify found.
type Report struct {
	Blocks, Flushed, Lost int
	Problems              []string // at most 20
}

func (r Report) String() string {
	return fmt.Sprintf("%d blocks, %d with a flushed write, %d lost: %v", r.Blocks, r.Flushed, r.Lost, r.Problems)
}

// Verify reads every block through dev and checks it against the record.
func (c *Checker) Verify(dev Device) (Report, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var rep Report
	rep.Blocks = c.Blocks
	buf := make([]byte, BlockSize)
	for b := 0; b < c.Blocks; b++ {
		if _, err := dev.ReadAt(buf, c.Base+int64(b)*BlockSize); err != nil {
			return rep, fmt.Errorf("read block %d: %w", b, err)
		}
		tok, err := decode(buf, b)
		want := c.flushed[b]
		if want > 0 {
			rep.Flushed++
		}
		var problem string
		switch {
		case err != nil:
			problem = fmt.Sprintf("block %d: %v", b, err)
		case tok < want:
			problem = fmt.Sprintf("block %d: token %d, older than its flushed write %d", b, tok, want)
		case tok > c.issued[b]:
			problem = fmt.Sprintf("block %d: token %d was never written to it (last issued %d)", b, tok, c.issued[b])
		}
		if problem != "" {
			rep.Lost++
			if len(rep.Problems) < 20 {
				rep.Problems = append(rep.Problems, problem)
			}
		}
	}
	return rep, nil
}
