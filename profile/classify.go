package profile

import (
	"sync/atomic"

	"github.com/blockd/blockd/pipeline"
)

// classifier turns the last few ticks of I/O into a profile. The data path
// only adds to atomic counters; tick (on the stage's goroutine) moves them
// into a ring of per-tick buckets and decides over the whole ring.
type classifier struct {
	ops, seq, bytes, writes, flushes atomic.Uint64

	ring      [window]bucket
	pos       int
	candidate Profile
	streak    int
}

type bucket struct{ ops, seq, bytes, writes, flushes uint64 }

const (
	window = 8 // ticks looked at (800 ms at the default tick)
	// minOps is the least I/O in the window worth a decision: an idle
	// volume keeps its profile.
	minOps = 32
	// A workload must look sequential above seqHigh to become
	// sequential, and below seqLow to leave it: the gap is the
	// hysteresis that keeps a mixed workload from flapping.
	seqHigh = 0.7
	seqLow  = 0.4
	// syncHigh: writes that are flushed this often (FLUSH or FUA per
	// write) make a random workload a database.
	syncHigh = 0.1
	// largeIO: requests this large on average are streaming even when
	// only some of them continue a stream (several interleaved readers).
	largeIO = 256 << 10
	// seqClear: a tick this sequential (or this random: at most
	// 1-seqClear) decides on its own, without waiting for the older ticks
	// of the window to age out.
	seqClear = 0.9
	// confirm is how many ticks in a row a new profile must win.
	confirm = 2
)

func (c *classifier) init() { c.candidate = Random }

func (c *classifier) reset() {
	c.ring = [window]bucket{}
	c.streak = 0
	c.ops.Store(0)
	c.seq.Store(0)
	c.bytes.Store(0)
	c.writes.Store(0)
	c.flushes.Store(0)
}

func (c *classifier) observe(r *pipeline.Request, seq bool) {
	c.ops.Add(1)
	c.bytes.Add(uint64(r.Length))
	if seq {
		c.seq.Add(1)
	}
	if r.Op == pipeline.OpWrite {
		c.writes.Add(1)
		if r.Flags&pipeline.FlagFUA != 0 {
			c.flushes.Add(1)
		}
	}
}

// decide returns the profile b calls for when it holds enough I/O and its
// sequential fraction is at least high or at most low; ok is false
// otherwise.
func decide(b bucket, high, low float64) (p Profile, ok bool) {
	if b.ops < minOps {
		return 0, false
	}
	seqFrac := float64(b.seq) / float64(b.ops)
	avg := b.bytes / b.ops
	switch {
	case seqFrac >= high, avg >= largeIO && seqFrac > seqLow:
		return Sequential, true
	case seqFrac <= low:
		if b.writes > 0 && float64(b.flushes)/float64(b.writes) >= syncHigh {
			return DB, true
		}
		return Random, true
	}
	return 0, false
}

// tick closes the current bucket and returns the profile the window calls
// for, once it has won confirm ticks in a row; ok is false while there is
// no decision to apply.
func (c *classifier) tick() (p Profile, ok bool) {
	c.ring[c.pos] = bucket{
		ops: c.ops.Swap(0), seq: c.seq.Swap(0), bytes: c.bytes.Swap(0),
		writes: c.writes.Swap(0), flushes: c.flushes.Swap(0),
	}
	c.pos = (c.pos + 1) % window
	var sum bucket
	for _, b := range c.ring {
		sum.ops += b.ops
		sum.seq += b.seq
		sum.bytes += b.bytes
		sum.writes += b.writes
		sum.flushes += b.flushes
	}
	want, decided := decide(c.ring[(c.pos+window-1)%window], seqClear, 1-seqClear)
	if !decided {
		// The window decides, with the hysteresis band between seqLow
		// and seqHigh. It alone would follow a change only once the
		// old workload's ticks were outweighed: a random phase of small
		// requests outnumbers the large sequential ones that follow it
		// for most of the window.
		if want, decided = decide(sum, seqHigh, seqLow); !decided {
			c.streak = 0
			return 0, false
		}
	}
	if want != c.candidate {
		c.candidate, c.streak = want, 0
	}
	c.streak++
	if c.streak < confirm {
		return 0, false
	}
	return want, true
}
