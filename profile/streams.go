package profile

import "sync"

// streams tracks a few concurrent sequential streams: a request that starts
// where one ended (or a little past it) continues it.
type streams struct {
	mu    sync.Mutex
	slot  [8]stream
	clock uint64
}

type stream struct {
	next   int64 // where the stream's next request is expected
	run    int   // consecutive sequential requests
	window int64 // prefetch distance ahead of next
	ahead  int64 // prefetch was scheduled up to here
	use    uint64
}

// seqSlack is how far from the expected offset a request may start and
// still count as sequential (readers skipping a little, a queue of
// sequential requests arriving slightly out of order).
const seqSlack = 256 << 10

const (
	minWindow = 2 * segSize
	minRun    = 2
)

// observe records a request [off, end). It reports whether the request
// continues a stream and, if prefetch is wanted and due, the range
// [from, to) to prefetch.
func (t *streams) observe(off, end int64, prefetch bool, maxWindow int64) (seq bool, from, to int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.clock++
	lru := 0
	for i := range t.slot {
		st := &t.slot[i]
		if st.use != 0 && off >= st.next-seqSlack && off <= st.next+seqSlack {
			st.use = t.clock
			if end > st.next {
				st.next = end
			}
			st.run++
			if !prefetch || st.run < minRun {
				return true, 0, 0
			}
			if st.window == 0 {
				st.window = minWindow
			}
			want := st.next + st.window
			if st.ahead >= st.next+st.window/2 {
				return true, 0, 0 // enough is in flight
			}
			from = max(st.ahead, st.next)
			st.ahead = want
			st.window = min(st.window*2, max(maxWindow, minWindow))
			return true, from, want
		}
		if t.slot[i].use < t.slot[lru].use {
			lru = i
		}
	}
	t.slot[lru] = stream{next: end, use: t.clock}
	return false, 0, 0
}

func (t *streams) reset() {
	t.mu.Lock()
	t.slot = [8]stream{}
	t.mu.Unlock()
}
