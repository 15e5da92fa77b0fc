package replication

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestRangeLock(t *testing.T) {
	var l rangeLock
	l.init()
	a := l.lock(0, 4096)
	b := l.lock(4096, 8192) // adjacent: no wait
	got := make(chan int, 1)
	go func() { got <- l.lock(4000, 4200) }() // overlaps both
	select {
	case <-got:
		t.Fatal("an overlapping range was locked")
	case <-time.After(20 * time.Millisecond):
	}
	l.unlock(a)
	select {
	case <-got:
		t.Fatal("locked while the second overlapping range was still held")
	case <-time.After(20 * time.Millisecond):
	}
	l.unlock(b)
	select {
	case h := <-got:
		l.unlock(h)
	case <-time.After(5 * time.Second):
		t.Fatal("never locked after both were released")
	}
	// Concurrent users of overlapping ranges never hold them together.
	var units [6]atomic.Int32 // holders of each 1000-byte unit
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				off := int64((g + i) % 4 * 1000)
				h := l.lock(off, off+3000)
				for u := off / 1000; u < off/1000+3; u++ {
					if units[u].Add(1) > 1 {
						t.Error("overlapping ranges held at once")
					}
				}
				for u := off / 1000; u < off/1000+3; u++ {
					units[u].Add(-1)
				}
				l.unlock(h)
			}
		}(g)
	}
	wg.Wait()
	if len(l.active) > 16 {
		t.Fatalf("%d entries for at most 8 holders", len(l.active))
	}
}
