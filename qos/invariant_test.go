package qos

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// TestRandomInvariants drives the scheduler with seeded random flows,
// arrivals, cancellations and limit changes, and checks what must hold in
// every run: no request is dispatched twice or lost, a flow never gets
// more in any 1 s window than its cap plus its burst, and once the limits
// are cleared everything that waits goes.
func TestRandomInvariants(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { randomRun(t, seed) })
	}
}

func randomRun(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	c := Capacity{}
	if rng.IntN(2) == 0 {
		c.IOPS = int64(500 + rng.IntN(5000))
	}
	s := NewScheduler(c)
	type flowState struct {
		f        *Flow
		limits   Limits
		times    []time.Duration // dispatch times, while limits did not change
		changed  time.Duration   // last limit change
		qd       int
		inflight int
		waiting  []uint64 // ids submitted and not yet seen dispatched, maybe stale
		total    int
	}
	var flows []*flowState
	n := 2 + rng.IntN(3)
	var reserved int64
	for i := 0; i < n; i++ {
		l := Limits{Weight: 1 + rng.IntN(500)}
		if rng.IntN(2) == 0 {
			l.IOPS = int64(50 + rng.IntN(2000))
		}
		if rng.IntN(3) == 0 {
			l.ReadIOPS = int64(50 + rng.IntN(1000))
		}
		if c.IOPS > 0 && rng.IntN(3) == 0 {
			r := int64(rng.IntN(int(c.IOPS) / (2 * n)))
			if l.IOPS != 0 && r > l.IOPS {
				r = l.IOPS
			}
			if l.ReadIOPS != 0 && l.IOPS == 0 {
				r = 0 // reads capped, writes not: keep it simple
			}
			l.IOPSReservation = r
			reserved += r
		}
		if err := l.Validate(); err != nil {
			t.Fatal(err)
		}
		flows = append(flows, &flowState{f: s.AddFlow(l, 0), limits: l, qd: 1 + rng.IntN(32)})
	}
	owner := map[uint64]*flowState{}
	var nextID uint64
	seen := map[uint64]bool{}
	var now time.Duration
	var out []uint64
	// Each dispatched request completes 1ms later and its flow submits the
	// next one then (closed loop at queue depth qd).
	type completion struct {
		at time.Duration
		fs *flowState
	}
	var pending []completion
	submit := func(fs *flowState) {
		nextID++
		owner[nextID] = fs
		fs.inflight++
		fs.waiting = append(fs.waiting, nextID)
		s.Enqueue(fs.f, nextID, rng.IntN(2) == 0, int64(4096*(1+rng.IntN(32))), now)
	}
	for _, fs := range flows {
		for i := 0; i < fs.qd; i++ {
			submit(fs)
		}
	}
	checkWindow := func(fs *flowState) {
		// The token bucket guarantee: in any interval of length d since the
		// last change, at most cap*d + bucket size + 1 dispatches.
		l := fs.limits
		if l.IOPS == 0 {
			return
		}
		size := max(float64(l.IOPS)*l.effBurst(), 1)
		ts := fs.times
		for i := range ts {
			for j := i; j >= 0 && ts[i]-ts[j] <= time.Second; j-- {
				if got, limit := float64(i-j+1), float64(l.IOPS)*(ts[i]-ts[j]).Seconds()+size+1; got > limit {
					t.Fatalf("flow with %+v: %.0f dispatches from %v to %v, want <= %.1f", l, got, ts[j], ts[i], limit)
				}
			}
		}
	}
	end := 2 * time.Second
	for steps := 0; steps < 2_000_000 && now < end; steps++ {
		out = s.Dispatch(now, out[:0])
		for _, id := range out {
			if seen[id] {
				t.Fatalf("request %d dispatched twice", id)
			}
			seen[id] = true
			fs := owner[id]
			fs.inflight--
			fs.times = append(fs.times, now)
			fs.total++
			pending = append(pending, completion{now + time.Millisecond, fs})
		}
		if len(pending) > 0 && pending[0].at <= now {
			for len(pending) > 0 && pending[0].at <= now {
				submit(pending[0].fs)
				pending = pending[1:]
			}
			continue
		}
		// Occasionally cancel a waiting request or change limits.
		switch rng.IntN(500) {
		case 0:
			fs := flows[rng.IntN(len(flows))]
			for len(fs.waiting) > 0 && seen[fs.waiting[0]] {
				fs.waiting = fs.waiting[1:]
			}
			if len(fs.waiting) > 0 {
				id := fs.waiting[rng.IntN(len(fs.waiting))]
				if !seen[id] && s.Cancel(fs.f, id, now) {
					seen[id] = true
					fs.inflight--
					pending = append(pending, completion{now + time.Millisecond, fs}) // the client retries
				}
			}
		case 1:
			fs := flows[rng.IntN(len(flows))]
			l := fs.limits
			l.IOPS = int64(50 + rng.IntN(2000))
			if l.IOPSReservation > l.IOPS {
				l.IOPSReservation = l.IOPS
			}
			checkWindow(fs)
			fs.limits, fs.times = l, nil
			s.SetLimits(fs.f, l, now)
			continue
		}
		next, ok := s.NextEvent()
		if ok && next <= now {
			t.Fatalf("next event %v not after now %v with nothing dispatched", next, now)
		}
		if len(pending) > 0 && (!ok || pending[0].at < next) {
			next, ok = pending[0].at, true
		}
		if !ok {
			t.Fatal("nothing waits and nothing is in flight")
		}
		now = next
	}
	for _, fs := range flows {
		checkWindow(fs)
		if fs.total == 0 {
			t.Errorf("flow %+v got nothing in %v", fs.limits, end)
		}
	}
	// Clearing all limits and capacity lets everything waiting go at once.
	s.SetCapacity(Capacity{}, now)
	for _, fs := range flows {
		s.SetLimits(fs.f, Limits{}, now)
	}
	out = s.Dispatch(now, out[:0])
	for _, id := range out {
		if seen[id] {
			t.Fatalf("request %d dispatched twice", id)
		}
		seen[id] = true
	}
	for id := range owner {
		if !seen[id] {
			t.Fatalf("request %d neither dispatched nor cancelled", id)
		}
	}
	if _, ok := s.NextEvent(); ok {
		t.Fatal("a next event with nothing waiting")
	}
}
