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
	window = 4 // ticks looked at
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
	if sum.ops < minOps {
		c.streak = 0
		return 0, false
	}
	seqFrac := float64(sum.seq) / float64(sum.ops)
	avg := sum.bytes / sum.ops
	var want Profile
	switch {
	case seqFrac >= seqHigh, avg >= largeIO && seqFrac > seqLow:
		want = Sequential
	case seqFrac <= seqLow:
		want = Random
		if sum.writes > 0 && float64(sum.flushes)/float64(sum.writes) >= syncHigh {
			want = DB
		}
	default:
		// In the hysteresis band: keep what is in force.
		c.streak = 0
		return 0, false
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
