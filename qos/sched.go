package qos

import (
	"math"
	"time"
)

// Scheduler is the pure core of QoS: it decides, for every waiting request
// of every volume (a Flow) on a node, when it may proceed. It has no clock,
// no goroutines and no locks: the caller passes the time in (a Duration
// since any fixed epoch, never decreasing), calls Dispatch after every
// change, and arms one timer for the returned next event. That makes every
// policy testable with scripted arrivals (see testdata/*.txt).
//
// The policy:
//
//   - Caps are token buckets (rate = cap, size = rate × burst). A request
//     needs min(cost, size) tokens to start and then takes its whole cost,
//     so a request larger than the burst passes once the bucket is full and
//     the debt delays the ones after it: the long-run rate is exact.
//   - Each flow is FIFO per direction (a write waiting for write credit
//     does not hold up reads). Among the flows whose head is within its caps the
//     scheduler picks, as in mClock, first the flow with the earliest due
//     reservation tag (reservation phase), else the flow with the smallest
//     start-time-fair-queueing tag (weight phase, cost/weight per request).
//     The reservation tag advances only for requests served in the
//     reservation phase and the weight tag only for the weight phase, so a
//     busy reserved volume gets its floor plus its weighted share of what
//     the floors leave.
//   - The node capacity is one more token bucket (IOPS and/or bytes/s)
//     shared by all flows. The picked flow waits for it, except in the
//     reservation phase and for a light flow within its weighted share (see
//     mayBorrow), which may run the bucket into debt; otherwise no flow
//     overtakes another for capacity, so large requests are not starved by
//     small ones.
type Scheduler struct {
	cap    Capacity
	nodeIO bucket
	nodeBS bucket
	now    float64 // seconds, the time of the last Dispatch
	vtime  float64 // weight-phase virtual time: start tag of the last weight dispatch
	active []*Flow // flows with waiting requests, in no particular order
	next   float64 // next event, +Inf if none
}

// Flow is one volume's state in a Scheduler.
type Flow struct {
	s       *Scheduler
	limits  Limits
	caps    [nCaps]bucket
	q       [2]ring // reads, writes: a write waiting for write credit must not hold up reads
	active  int     // index in s.active, -1 when idle
	removed bool
	// priority: picked before the weight phase and never waiting for node
	// capacity while the node owes less than one bucket (the journal
	// io_profile: small synchronous writes others wait on).
	priority bool

	resIOPS, resBPS float64
	rNext           float64 // time the head becomes due in the reservation phase
	weight          float64
	start           float64 // SFQ start tag of the head
	finish          float64 // SFQ finish tag of the last weight-phase dispatch

	throttled  float64 // total seconds requests spent waiting
	dispatched uint64
}

// Bucket indexes in Flow.caps.
const (
	capIOPS = iota
	capReadIOPS
	capWriteIOPS
	capBPS
	capReadBPS
	capWriteBPS
	nCaps
)

// Request is one waiting request as the scheduler sees it.
type entry struct {
	id      uint64
	write   bool
	bytes   int64
	arrival float64
}

// NewScheduler returns a Scheduler for a node with capacity c (zero fields
// unlimited). c must be valid.
func NewScheduler(c Capacity) *Scheduler {
	s := &Scheduler{next: math.Inf(1)}
	s.SetCapacity(c, 0)
	return s
}

func secs(t time.Duration) float64 { return t.Seconds() }

// toDuration converts seconds to a Duration, rounding up so that a timer
// armed for it never fires before the event.
func toDuration(t float64) time.Duration {
	if math.IsInf(t, 1) || t > float64(math.MaxInt64)/1e9 {
		return math.MaxInt64
	}
	// Float error of a fraction of a nanosecond is not worth a nanosecond:
	// the buckets' eps tolerance covers it.
	return time.Duration(math.Ceil(t*1e9 - 1e-3))
}

// SetCapacity changes the node capacity.
func (s *Scheduler) SetCapacity(c Capacity, now time.Duration) {
	t := secs(now)
	s.cap = c
	s.nodeIO.configure(float64(c.IOPS), MinBurst, t)
	s.nodeBS.configure(float64(c.BPS), MinBurst, t)
}

// Capacity returns the node capacity.
func (s *Scheduler) Capacity() Capacity { return s.cap }

// AddFlow adds a volume with limits l (which must be valid). Its buckets
// start full.
func (s *Scheduler) AddFlow(l Limits, now time.Duration) *Flow {
	f := &Flow{s: s, active: -1}
	f.set(l, secs(now))
	for i := range f.caps {
		f.caps[i].tokens = f.caps[i].size
	}
	f.start, f.finish = s.vtime, s.vtime
	return f
}

// SetLimits changes f's limits (valid ones) while requests may be waiting;
// the credit saved so far is kept up to the new burst size.
func (s *Scheduler) SetLimits(f *Flow, l Limits, now time.Duration) { f.set(l, secs(now)) }

// SetPriority marks f as a priority flow (or not): after the reservation
// phase its requests go before every weight-phase request, and they take
// the node's tokens into debt rather than wait, up to one bucket; caps still
// hold. blockd gives it to volumes whose io_profile is journal.
func (s *Scheduler) SetPriority(f *Flow, on bool) { f.priority = on }

// Limits returns f's limits.
func (f *Flow) Limits() Limits { return f.limits }

func (f *Flow) set(l Limits, t float64) {
	f.limits = l
	burst := l.effBurst()
	f.caps[capIOPS].configure(float64(l.IOPS), burst, t)
	f.caps[capReadIOPS].configure(float64(l.ReadIOPS), burst, t)
	f.caps[capWriteIOPS].configure(float64(l.WriteIOPS), burst, t)
	f.caps[capBPS].configure(float64(l.BPS), burst, t)
	f.caps[capReadBPS].configure(float64(l.ReadBPS), burst, t)
	f.caps[capWriteBPS].configure(float64(l.WriteBPS), burst, t)
	f.resIOPS, f.resBPS = float64(l.IOPSReservation), float64(l.BPSReservation)
	f.weight = float64(l.effWeight())
}

// RemoveFlow removes f and appends the ids of its waiting requests to out
// (the caller fails them).
func (s *Scheduler) RemoveFlow(f *Flow, out []uint64) []uint64 {
	for d := range f.q {
		for f.q[d].len() > 0 {
			out = append(out, f.q[d].pop().id)
		}
	}
	s.deactivate(f)
	f.removed = true
	return out
}

// Enqueue queues request id of f: a write (write, trim, write-zeroes) or a
// read of bytes bytes. Call Dispatch afterwards, it may start right away.
func (s *Scheduler) Enqueue(f *Flow, id uint64, write bool, bytes int64, now time.Duration) {
	if f.removed {
		panic("qos: Enqueue on a removed flow")
	}
	t := secs(now)
	if f.Waiting() == 0 {
		s.activate(f, t)
	}
	f.q[dir(write)].push(entry{id: id, write: write, bytes: bytes, arrival: t})
}

// Cancel removes waiting request id of f and reports whether it was still
// waiting (false: it was dispatched or never queued).
func (s *Scheduler) Cancel(f *Flow, id uint64, now time.Duration) bool {
	e, ok := f.q[0].remove(id)
	if !ok {
		if e, ok = f.q[1].remove(id); !ok {
			return false
		}
	}
	f.throttled += math.Max(0, secs(now)-e.arrival)
	if f.Waiting() == 0 {
		s.deactivate(f)
	}
	return true
}

func (s *Scheduler) activate(f *Flow, t float64) {
	f.active = len(s.active)
	s.active = append(s.active, f)
	// SFQ: an idle flow restarts at the current virtual time, so it neither
	// saved credit while idle nor lags behind the busy ones.
	f.start = math.Max(f.finish, s.vtime)
	// Reservation credit saved while idle is bounded by the burst.
	f.rNext = math.Max(f.rNext, t-f.limits.effBurst())
}

func (s *Scheduler) deactivate(f *Flow) {
	if f.active < 0 {
		return
	}
	last := s.active[len(s.active)-1]
	s.active[f.active] = last
	last.active = f.active
	s.active[len(s.active)-1] = nil
	s.active = s.active[:len(s.active)-1]
	f.active = -1
}

// Dispatch lets every request proceed whose time has come at now, appending
// their ids to out in the order they start, and returns out. Call it after
// every Enqueue, Cancel, SetLimits and SetCapacity, and when the time from
// NextEvent arrives.
func (s *Scheduler) Dispatch(now time.Duration, out []uint64) []uint64 {
	t := secs(now)
	if t > s.now {
		s.now = t
	}
	t = s.now
	if t > s.next && len(s.active) > 0 {
		s.catchUp(math.Max(s.next, t-MaxLag), t)
	}
	s.next = math.Inf(1)
	s.nodeIO.refill(t)
	s.nodeBS.refill(t)
	for len(s.active) > 0 {
		var best *Flow
		bestRes, bestRank, bestDir := false, 0, 0
		capWait := math.Inf(1) // earliest time a flow not yet within its caps is
		resWait := math.Inf(1) // earliest time a flow within its caps becomes due for its reservation
		for _, f := range s.active {
			d, at := f.head(t)
			if at > t {
				capWait = math.Min(capWait, at)
				continue
			}
			hasRes := f.resIOPS > 0 || f.resBPS > 0
			res := hasRes && f.rNext <= t
			if hasRes && !res {
				resWait = math.Min(resWait, f.rNext)
			}
			// Reservation phase first, then priority flows, then the
			// weight phase; within a rank the earliest tag.
			rank := 0
			switch {
			case res:
				rank = 2
			case f.priority:
				rank = 1
			}
			switch {
			case best == nil,
				rank > bestRank,
				rank == bestRank && res && f.rNext < best.rNext,
				rank == bestRank && !res && f.start < best.start:
				best, bestRes, bestRank, bestDir = f, res, rank, d
			}
		}
		if best == nil {
			s.next = capWait
			break
		}
		h := best.q[bestDir].peek()
		// A request due in the reservation phase does not wait for node
		// capacity: it takes the node's tokens into debt, which the
		// weight phase then waits out. The floors are promised out of the
		// capacity (Node refuses reservations that sum beyond it), so the
		// debt stays bounded, and a reserved volume's latency does not
		// depend on the timer goroutine being scheduled in time.
		if at := s.nodeReadyAt(h, t); at > t && !bestRes && !s.mayBorrow(best) {
			// Wake when the node has capacity for it, or earlier if a flow
			// gets within its caps or becomes due for its reservation (it
			// would not wait for the node).
			s.next = math.Min(math.Min(capWait, at), resWait)
			break
		}
		s.dispatch(best, bestDir, bestRes, t)
		out = append(out, h.id)
	}
	return out
}

// mayBorrow reports whether f's head, picked in the weight phase while the
// node has no capacity for it, may start anyway and take the node's tokens
// into debt. That is allowed to a light flow only: one with nothing else
// waiting (a low-depth client, not a backlog) whose start tag has not run
// ahead of the virtual time, so it is using no more than its weighted share.
// Without it such a request would wait for the next token behind a busy
// flow that keeps the node bucket empty: one token interval plus the wake-up
// of the timer goroutine, which on a loaded host is what dominates a QD1
// client's tail latency. The debt is what the busy flows then wait out, so
// the node's long-run rate is still its capacity, and it is bounded by one
// bucket (MinBurst of capacity), which also bounds the overshoot when many
// light flows arrive at once.
func (s *Scheduler) mayBorrow(f *Flow) bool {
	if !f.priority && (f.Waiting() != 1 || f.start > s.vtime) {
		return false
	}
	return s.nodeIO.mayOwe() && s.nodeBS.mayOwe()
}

// head returns the direction whose head request goes next in f, and when
// it is within f's caps: of the heads within caps, the earlier arrival; if
// none is, the one ready first.
func (f *Flow) head(t float64) (d int, at float64) {
	at = math.Inf(1)
	var arr float64
	for i := range f.q {
		if f.q[i].len() == 0 {
			continue
		}
		e := f.q[i].peek()
		a := math.Max(f.capsReadyAt(e, t), t)
		switch {
		case a < at && (a > t || at > t), // an earlier ready time, unless both are ready now
			a == t && at == t && e.arrival < arr:
			d, at, arr = i, a, e.arrival
		}
	}
	return d, at
}

func dir(write bool) int {
	if write {
		return 1
	}
	return 0
}

// MaxLag bounds how late a Dispatch may be and still have the credit of
// the late interval honoured (see catchUp).
const MaxLag = 1.0

// catchUp handles a Dispatch that comes later than the event it was due
// for (the timer goroutine was not scheduled in time, which on a loaded
// host happens for tens of milliseconds): requests were waiting since from
// and the credit that accrued since then would, with plain buckets, be
// clipped at the burst size and lost, so a capped volume would fall short
// of its cap. The buckets of the waiting flows and of the node take the
// late interval's credit unclipped instead: the late requests catch up.
func (s *Scheduler) catchUp(from, t float64) {
	for _, f := range s.active {
		for i := range f.caps {
			f.caps[i].refillLate(from, t)
		}
	}
	s.nodeIO.refillLate(from, t)
	s.nodeBS.refillLate(from, t)
}

func (s *Scheduler) dispatch(f *Flow, d int, res bool, t float64) {
	e := f.q[d].pop()
	f.takeCaps(e)
	s.nodeIO.take(1)
	s.nodeBS.take(float64(e.bytes))
	if res {
		d := 0.0
		if f.resIOPS > 0 {
			d = 1 / f.resIOPS
		}
		if f.resBPS > 0 {
			d = math.Max(d, float64(e.bytes)/f.resBPS)
		}
		// Tags are not allowed to fall behind now by more than the burst:
		// a volume that used less than its reservation for a while may catch
		// up a little, not without bound.
		f.rNext = math.Max(f.rNext, t-f.limits.effBurst()) + d
	}
	if !res && !f.priority { // priority flows stay out of the weight phase's books
		s.vtime = f.start
		f.finish = f.start + s.nodeCost(e)/f.weight
		f.start = f.finish
	}
	f.throttled += math.Max(0, t-e.arrival)
	f.dispatched++
	if f.Waiting() == 0 {
		s.deactivate(f)
	}
}

// nodeCost is the share of node time a request takes, for weighting: with
// capacity in both dimensions the larger fraction, else one per request.
func (s *Scheduler) nodeCost(e entry) float64 {
	c := 0.0
	if s.cap.IOPS > 0 {
		c = 1 / float64(s.cap.IOPS)
	}
	if s.cap.BPS > 0 {
		c = math.Max(c, float64(e.bytes)/float64(s.cap.BPS))
	}
	if c == 0 {
		return 1
	}
	return c
}

// NextEvent returns the time at which Dispatch may let a waiting request
// proceed, and false when nothing waits.
func (s *Scheduler) NextEvent() (time.Duration, bool) {
	if math.IsInf(s.next, 1) {
		return 0, false
	}
	// Strictly after the last Dispatch, whatever the float rounding.
	return max(toDuration(s.next), toDuration(s.now)+1), true
}

// Waiting returns how many requests of f wait.
func (f *Flow) Waiting() int { return f.q[0].len() + f.q[1].len() }

// Throttled returns the total time f's requests spent waiting, counting
// those that were dispatched or cancelled.
func (f *Flow) Throttled() time.Duration { return time.Duration(f.throttled * 1e9) }

// Dispatched returns how many requests of f have been let through.
func (f *Flow) Dispatched() uint64 { return f.dispatched }

func (f *Flow) capsFor(e entry) (io1, io2, bs1, bs2 *bucket) {
	if e.write {
		return &f.caps[capIOPS], &f.caps[capWriteIOPS], &f.caps[capBPS], &f.caps[capWriteBPS]
	}
	return &f.caps[capIOPS], &f.caps[capReadIOPS], &f.caps[capBPS], &f.caps[capReadBPS]
}

func (f *Flow) capsReadyAt(e entry, t float64) float64 {
	io1, io2, bs1, bs2 := f.capsFor(e)
	b := float64(e.bytes)
	return math.Max(math.Max(io1.readyAt(1, t), io2.readyAt(1, t)),
		math.Max(bs1.readyAt(b, t), bs2.readyAt(b, t)))
}

func (f *Flow) takeCaps(e entry) {
	io1, io2, bs1, bs2 := f.capsFor(e)
	b := float64(e.bytes)
	io1.take(1)
	io2.take(1)
	bs1.take(b)
	bs2.take(b)
}

func (s *Scheduler) nodeReadyAt(e entry, t float64) float64 {
	return math.Max(s.nodeIO.readyAt(1, t), s.nodeBS.readyAt(float64(e.bytes), t))
}

// bucket is a token bucket that may go into debt: a request needs
// min(cost, size) tokens and takes cost. rate 0 is unlimited.
type bucket struct {
	rate, size, tokens, last float64
}

// configure sets rate and burst at time t, keeping the saved tokens (or
// debt) up to the new size.
func (b *bucket) configure(rate, burst, t float64) {
	b.refill(t)
	if rate <= 0 {
		*b = bucket{last: t}
		return
	}
	wasOff := b.rate == 0
	b.rate = rate
	b.size = math.Max(rate*burst, 1)
	if wasOff {
		b.tokens = b.size // a new cap starts with full credit
	}
	b.tokens = math.Min(b.tokens, b.size)
	b.last = t
}

func (b *bucket) refill(t float64) {
	if b.rate == 0 || t <= b.last {
		return
	}
	b.tokens = math.Min(b.size, b.tokens+(t-b.last)*b.rate)
	b.last = t
}

// refillLate refills up to from as usual and from from to t without
// clipping at the size.
func (b *bucket) refillLate(from, t float64) {
	if b.rate == 0 {
		return
	}
	b.refill(from)
	if t <= b.last {
		return
	}
	b.tokens = math.Min(b.size+(t-from)*b.rate, b.tokens+(t-b.last)*b.rate)
	b.last = t
}

// eps absorbs float rounding so that a bucket found ready at t by readyAt
// is ready when refilled at t.
const eps = 1e-9

// readyAt returns when the bucket has credit for cost, t if it has now.
func (b *bucket) readyAt(cost, t float64) float64 {
	if b.rate == 0 {
		return t
	}
	b.refill(t)
	need := math.Min(cost, b.size)
	wait := (need - b.tokens) / b.rate
	if wait < 1e-9 || b.tokens >= need-eps*math.Max(need, 1) {
		// Ready, or ready within a nanosecond, the resolution of the
		// caller's clock: waiting for it would mean waking at the same
		// Duration again.
		return t
	}
	return t + wait
}

// mayOwe reports whether the bucket may go (further) into debt: while it
// owes less than its size.
func (b *bucket) mayOwe() bool { return b.rate == 0 || b.tokens > -b.size }

func (b *bucket) take(cost float64) {
	if b.rate != 0 {
		b.tokens -= cost
	}
}

// ring is a FIFO of entries that reuses its array: no allocation once it
// has grown to the deepest queue seen.
type ring struct {
	buf  []entry
	head int
	n    int
}

func (r *ring) len() int { return r.n }

func (r *ring) push(e entry) {
	if r.n == len(r.buf) {
		nb := make([]entry, max(8, 2*len(r.buf)))
		for i := 0; i < r.n; i++ {
			nb[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = nb, 0
	}
	r.buf[(r.head+r.n)%len(r.buf)] = e
	r.n++
}

func (r *ring) peek() entry { return r.buf[r.head] }

func (r *ring) pop() entry {
	e := r.buf[r.head]
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	return e
}

// remove takes out the entry with id wherever it is, keeping the order of
// the rest. Linear: cancellation is rare.
func (r *ring) remove(id uint64) (entry, bool) {
	for i := 0; i < r.n; i++ {
		if r.buf[(r.head+i)%len(r.buf)].id != id {
			continue
		}
		e := r.buf[(r.head+i)%len(r.buf)]
		for j := i; j < r.n-1; j++ {
			r.buf[(r.head+j)%len(r.buf)] = r.buf[(r.head+j+1)%len(r.buf)]
		}
		r.n--
		return e, true
	}
	return entry{}, false
}
