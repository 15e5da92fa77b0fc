package replication

import "sync"

// rangeLock keeps overlapping writes from being in flight at once. The
// owner writes locally and to every replica concurrently; two overlapping
// writes in flight together could land in one order here and in the
// other on a replica, and the copies would differ forever although both
// orders are correct for the application. Serializing them gives every
// copy the same order. Non-overlapping writes never wait for each other.
// Resync takes the lock on the region it copies, so a copy and a write of
// the same range never cross.
type rangeLock struct {
	mu     sync.Mutex
	cond   sync.Cond
	active []lockedRange // unordered; few entries (the requests in flight)
	free   []int         // indexes of unused entries in active
}

type lockedRange struct {
	off, end int64
	used     bool
}

func (l *rangeLock) init() { l.cond.L = &l.mu }

// lock waits until no locked range overlaps [off, end) and locks it; it
// returns a handle for unlock.
func (l *rangeLock) lock(off, end int64) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.overlapsLocked(off, end) {
		l.cond.Wait()
	}
	var i int
	if n := len(l.free); n > 0 {
		i = l.free[n-1]
		l.free = l.free[:n-1]
	} else {
		i = len(l.active)
		l.active = append(l.active, lockedRange{})
	}
	l.active[i] = lockedRange{off: off, end: end, used: true}
	return i
}

func (l *rangeLock) overlapsLocked(off, end int64) bool {
	for _, r := range l.active {
		if r.used && r.off < end && off < r.end {
			return true
		}
	}
	return false
}

func (l *rangeLock) unlock(h int) {
	l.mu.Lock()
	l.active[h].used = false
	l.free = append(l.free, h)
	l.mu.Unlock()
	l.cond.Broadcast()
}
