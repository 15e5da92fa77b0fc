package profile

import (
	"math"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Budget is the memory that the stages sharing it may hold for prefetch
// segments (1 MiB each), write-back slabs (128 KiB) and write-back merge
// buffers (1 MiB), so that a node's volumes together stay within it
// however many of them stream at once. A stage that finds the budget
// spent prefetches less (it reuses segments its readers consumed, or
// none) and writes through to the engine instead of buffering: a request
// never waits for memory and never fails for want of it. A stage gives
// its memory back, to the budget and to the operating system, when its
// cache and buffer have been idle for idleRelease, and when it closes.
//
// Memory is drawn as anonymous mappings, not from the Go heap, which
// returns freed memory to the system only lazily: unmapping makes a
// release real at once. Mappings are page aligned, as O_DIRECT engines
// want their buffers.
type Budget struct {
	limit   int64 // math.MaxInt64: no node limit
	used    atomic.Int64
	high    atomic.Int64
	denials atomic.Uint64
}

// NewBudget returns a budget of limit bytes for the stages that share it
// through Options.Budget; limit <= 0 means no limit.
func NewBudget(limit int64) *Budget {
	if limit <= 0 {
		limit = math.MaxInt64
	}
	return &Budget{limit: limit}
}

// BudgetStats describe a budget now.
type BudgetStats struct {
	// Limit is the budget (0: none).
	Limit int64 `json:"limit_bytes"`
	// InUse is what stages hold now; HighWater the most they ever held
	// at once.
	InUse     int64 `json:"in_use_bytes"`
	HighWater int64 `json:"high_water_bytes"`
	// Denials counts requests for memory the budget refused (a segment
	// not prefetched, a write written through instead of buffered).
	Denials uint64 `json:"denials"`
}

// Stats returns the budget's figures.
func (b *Budget) Stats() BudgetStats {
	st := BudgetStats{InUse: b.used.Load(), HighWater: b.high.Load(), Denials: b.denials.Load()}
	if b.limit != math.MaxInt64 {
		st.Limit = b.limit
	}
	return st
}

// take reserves n bytes, or reports false (a denial) if that would pass
// the limit.
func (b *Budget) take(n int64) bool {
	for {
		used := b.used.Load()
		if used > b.limit-n {
			b.denials.Add(1)
			return false
		}
		if b.used.CompareAndSwap(used, used+n) {
			b.raise(used + n)
			return true
		}
	}
}

func (b *Budget) raise(used int64) {
	for high := b.high.Load(); used > high && !b.high.CompareAndSwap(high, used); high = b.high.Load() {
	}
}

// room reports whether n bytes could be taken now (a hint).
func (b *Budget) room(n int64) bool { return b.used.Load() <= b.limit-n }

func (b *Budget) give(n int64) { b.used.Add(-n) }

// alloc returns n bytes of fresh zeroed memory drawn from the budget, or
// nil if the budget (or the system) has none.
func (b *Budget) alloc(n int) []byte {
	if !b.take(int64(n)) {
		return nil
	}
	buf, err := mmap(n)
	if err != nil {
		// The system is out of memory or mappings: as good as a denial.
		b.give(int64(n))
		b.denials.Add(1)
		return nil
	}
	return buf
}

// allocOver is alloc past the limit, for a caller that cannot back out.
func (b *Budget) allocOver(n int) []byte {
	buf, err := mmap(n)
	if err != nil {
		panic("profile: " + err.Error())
	}
	b.raise(b.used.Add(int64(n)))
	return buf
}

func mmap(n int) ([]byte, error) {
	return unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
}

// free unmaps buf, which alloc returned (resliced from its start only),
// and gives it back to the budget.
func (b *Budget) free(buf []byte) {
	buf = buf[:cap(buf)]
	if err := unix.Munmap(buf); err != nil {
		// Only a buffer alloc did not return can fail here.
		panic("profile: unmapping a budget buffer: " + err.Error())
	}
	b.give(int64(len(buf)))
}
