package qos

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/pipeline"
)

// Node runs one Scheduler for all the volumes of a node. One mutex guards
// the scheduler; one goroutine (started by NewNode, ended by Close) sleeps
// until the scheduler's next event and wakes the requests whose time has
// come. Requests wait on pooled slots, so a throttled request allocates
// nothing once the pool has grown to the deepest queue seen.
type Node struct {
	epoch time.Time // scheduler time is time.Since(epoch): monotonic

	mu      sync.Mutex
	s       *Scheduler
	vols    map[string]*VolumeQoS
	slots   []*slot  // by request id
	free    []uint64 // ids of idle slots
	armed   time.Duration
	isArmed bool
	closed  bool
	out     []uint64 // scratch for Dispatch

	kick chan struct{} // buffered 1: the next event moved earlier
	done chan struct{} // closed by Close
	exit chan struct{} // closed when run returns

	// unlimited is true while the capacity is unlimited: volumes without
	// caps then skip the scheduler entirely.
	unlimited atomic.Bool
}

// slot is where one waiting request parks. The dispatcher sets err and
// sends on ch (buffered 1) under the Node's mutex; the waiter receives and
// then returns the slot.
type slot struct {
	ch  chan struct{}
	err error
}

// NewNode starts a Node with capacity c (zero fields unlimited; see
// Capacity). Close stops it.
func NewNode(c Capacity) (*Node, error) {
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("qos: %w", err)
	}
	n := &Node{
		epoch: time.Now(),
		s:     NewScheduler(c),
		vols:  map[string]*VolumeQoS{},
		kick:  make(chan struct{}, 1),
		done:  make(chan struct{}),
		exit:  make(chan struct{}),
	}
	n.unlimited.Store(c.Unlimited())
	go n.run()
	return n, nil
}

func (n *Node) now() time.Duration { return time.Since(n.epoch) }

// tick is the shortest sleep of the timer goroutine. A volume held at a
// node capacity of tens of thousands of IOPS would otherwise wake it (and
// then one waiter) for every token, tens of microseconds apart: two
// goroutine switches per request, taken from the very CPU the other
// volumes' requests need. Waking at most every tick lets the requests due
// meanwhile go in one batch (the buckets keep the credit, so rates are
// unchanged); a throttled request starts up to a tick late. Requests that
// need not wait never involve this goroutine.
const tick = 250 * time.Microsecond

// run is the timer goroutine. It exits when Close closes n.done.
func (n *Node) run() {
	defer close(n.exit)
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		select {
		case <-n.done:
			t.Stop()
			return
		case <-n.kick:
		case <-t.C:
		}
		n.mu.Lock()
		now := n.now()
		n.out = n.s.Dispatch(now, n.out[:0])
		for _, id := range n.out {
			n.wakeLocked(id, nil)
		}
		n.armed, n.isArmed = n.s.NextEvent()
		if n.isArmed && n.armed < now+tick {
			n.armed = now + tick
		}
		armed, wait := n.isArmed, n.armed-now
		n.mu.Unlock()
		t.Stop()
		if armed {
			t.Reset(wait)
		}
	}
}

// dispatchLocked lets through every request whose time has come and makes
// sure the timer goroutine wakes for the next event.
func (n *Node) dispatchLocked() { n.dispatchAtLocked(n.now()) }

func (n *Node) dispatchAtLocked(now time.Duration) {
	n.out = n.s.Dispatch(now, n.out[:0])
	for _, id := range n.out {
		n.wakeLocked(id, nil)
	}
	next, ok := n.s.NextEvent()
	if !ok || (n.isArmed && n.armed <= next+tick) {
		return
	}
	// The goroutine sleeps until n.armed (or for good): tell it about the
	// earlier event.
	n.armed, n.isArmed = next, true
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

func (n *Node) wakeLocked(id uint64, err error) {
	s := n.slots[id]
	s.err = err
	s.ch <- struct{}{}
}

func (n *Node) getSlotLocked() uint64 {
	if k := len(n.free); k > 0 {
		id := n.free[k-1]
		n.free = n.free[:k-1]
		return id
	}
	n.slots = append(n.slots, &slot{ch: make(chan struct{}, 1)})
	return uint64(len(n.slots) - 1)
}

// SetCapacity changes the node capacity live. It refuses a capacity below
// the sum of the volumes' reservations.
func (n *Node) SetCapacity(c Capacity) error {
	if err := c.Validate(); err != nil {
		return fmt.Errorf("qos: %w", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return fmt.Errorf("qos: set capacity: %w", pipeline.ErrShutdown)
	}
	if err := n.checkReservationsLocked(c, nil, Limits{}); err != nil {
		return fmt.Errorf("qos: %w", err)
	}
	n.s.SetCapacity(c, n.now())
	n.unlimited.Store(c.Unlimited())
	n.dispatchLocked()
	return nil
}

// Capacity returns the node capacity.
func (n *Node) Capacity() Capacity {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.s.Capacity()
}

// checkReservationsLocked refuses limits whose reservations, summed over
// the node (with v's replaced by l), exceed capacity c: the floors could
// not all be kept.
func (n *Node) checkReservationsLocked(c Capacity, v *VolumeQoS, l Limits) error {
	var iops, bps int64
	for _, o := range n.vols {
		ol := o.f.Limits()
		if o == v {
			ol = l
		}
		iops += ol.IOPSReservation
		bps += ol.BPSReservation
	}
	if v != nil && n.vols[v.name] != v { // a volume being added
		iops += l.IOPSReservation
		bps += l.BPSReservation
	}
	if c.IOPS != 0 && iops > c.IOPS {
		return fmt.Errorf("iops reservations total %d exceed node capacity %d iops", iops, c.IOPS)
	}
	if c.BPS != 0 && bps > c.BPS {
		return fmt.Errorf("bps reservations total %d exceed node capacity %d bytes/s", bps, c.BPS)
	}
	return nil
}

// ErrExists is returned by Volume for a name already in use.
var ErrExists = errors.New("qos volume already exists")

// Volume registers volume name with limits l. Close it when the volume
// goes away.
func (n *Node) Volume(name string, l Limits) (*VolumeQoS, error) {
	if err := l.Validate(); err != nil {
		return nil, fmt.Errorf("qos %s: %w", name, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, fmt.Errorf("qos %s: %w", name, pipeline.ErrShutdown)
	}
	if _, ok := n.vols[name]; ok {
		return nil, fmt.Errorf("qos %s: %w", name, ErrExists)
	}
	v := &VolumeQoS{n: n, name: name}
	if err := n.checkReservationsLocked(n.s.Capacity(), v, l); err != nil {
		return nil, fmt.Errorf("qos %s: %w", name, err)
	}
	v.f = n.s.AddFlow(l, n.now())
	v.bypass.Store(!l.HasCaps())
	n.vols[name] = v
	return v, nil
}

// Close fails every waiting request with pipeline.ErrShutdown, stops the
// timer goroutine and waits for it. Requests arriving later fail the same
// way. Close is idempotent.
func (n *Node) Close() error {
	n.mu.Lock()
	if !n.closed {
		n.closed = true
		for _, v := range n.vols {
			n.removeLocked(v)
		}
		close(n.done)
	}
	n.mu.Unlock()
	<-n.exit
	return nil
}

func (n *Node) removeLocked(v *VolumeQoS) {
	if v.closed {
		return
	}
	v.closed = true
	v.bypass.Store(false) // send late requests to the locked path, which fails them
	n.out = n.s.RemoveFlow(v.f, n.out[:0])
	for _, id := range n.out {
		n.wakeLocked(id, pipeline.ErrShutdown)
	}
	delete(n.vols, v.name)
}

// Stats returns every volume's stats, sorted by name.
func (n *Node) Stats() []Stats {
	n.mu.Lock()
	defer n.mu.Unlock()
	st := make([]Stats, 0, len(n.vols))
	for _, v := range n.vols {
		st = append(st, v.statsLocked())
	}
	sort.Slice(st, func(i, j int) bool { return st[i].Volume < st[j].Volume })
	return st
}

// VolumeQoS is one volume's QoS on a Node.
type VolumeQoS struct {
	n    *Node
	name string
	// bypass is true while the volume has no caps and the node capacity
	// is unlimited: nothing can hold its requests back, so they skip the
	// lock (the "QoS on, no limits" fast path).
	bypass atomic.Bool

	// Guarded by n.mu.
	f      *Flow
	closed bool
}

// Stats is what the daemon exports per volume:
//
//	blockd_volume_qos_throttled_seconds_total{volume}  Throttled
//	blockd_volume_qos_waiting_requests{volume}         Waiting
//	blockd_volume_qos_limit{volume,kind}               Limits, by LimitKinds
type Stats struct {
	Volume    string
	Limits    Limits        // the limits in force
	Throttled time.Duration // total time requests spent waiting in QoS
	Waiting   int           // requests waiting now
	Passed    uint64        // requests let through by the scheduler (the fast path is not counted)
}

// LimitValue is one effective limit, for the blockd_volume_qos_limit gauge.
type LimitValue struct {
	Kind  string
	Value float64
}

// LimitKinds returns the effective limits as kind/value pairs for the
// blockd_volume_qos_limit gauge: kinds iops, read_iops, write_iops, bps,
// read_bps, write_bps, burst (seconds, the effective one), iops_reservation,
// bps_reservation, weight (the effective one). 0 means no limit.
func (s Stats) LimitKinds() []LimitValue {
	l := s.Limits
	burst := 0.0
	if l.HasCaps() {
		burst = l.effBurst()
	}
	return []LimitValue{
		{"iops", float64(l.IOPS)},
		{"read_iops", float64(l.ReadIOPS)},
		{"write_iops", float64(l.WriteIOPS)},
		{"bps", float64(l.BPS)},
		{"read_bps", float64(l.ReadBPS)},
		{"write_bps", float64(l.WriteBPS)},
		{"burst", burst},
		{"iops_reservation", float64(l.IOPSReservation)},
		{"bps_reservation", float64(l.BPSReservation)},
		{"weight", float64(l.effWeight())},
	}
}

// Name returns the volume name.
func (v *VolumeQoS) Name() string { return v.name }

// Limits returns the limits in force.
func (v *VolumeQoS) Limits() Limits {
	v.n.mu.Lock()
	defer v.n.mu.Unlock()
	return v.f.Limits()
}

// Set changes the limits live: waiting requests are rescheduled under the
// new limits at once. On error (invalid limits, reservations beyond the
// node capacity) the old limits stay.
func (v *VolumeQoS) Set(l Limits) error {
	if err := l.Validate(); err != nil {
		return fmt.Errorf("qos %s: %w", v.name, err)
	}
	n := v.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if v.closed {
		return fmt.Errorf("qos %s: %w", v.name, pipeline.ErrShutdown)
	}
	if err := n.checkReservationsLocked(n.s.Capacity(), v, l); err != nil {
		return fmt.Errorf("qos %s: %w", v.name, err)
	}
	n.s.SetLimits(v.f, l, n.now())
	v.bypass.Store(!l.HasCaps())
	n.dispatchLocked()
	return nil
}

// SetPriority gives the volume's requests priority over every volume's
// weight-phase requests (see Scheduler.SetPriority); blockd sets it while
// the volume's io_profile is journal.
func (v *VolumeQoS) SetPriority(on bool) {
	n := v.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if v.closed {
		return
	}
	n.s.SetPriority(v.f, on)
	n.dispatchLocked()
}

// Priority reports whether the volume has priority (SetPriority).
func (v *VolumeQoS) Priority() bool {
	v.n.mu.Lock()
	defer v.n.mu.Unlock()
	return v.f.priority
}

// Stats returns the volume's stats.
func (v *VolumeQoS) Stats() Stats {
	v.n.mu.Lock()
	defer v.n.mu.Unlock()
	return v.statsLocked()
}

func (v *VolumeQoS) statsLocked() Stats {
	return Stats{Volume: v.name, Limits: v.f.Limits(), Throttled: v.f.Throttled(), Waiting: v.f.Waiting(), Passed: v.f.Dispatched()}
}

// Close unregisters the volume, failing its waiting requests with
// pipeline.ErrShutdown; later requests fail the same way.
func (v *VolumeQoS) Close() error {
	v.n.mu.Lock()
	defer v.n.mu.Unlock()
	v.n.removeLocked(v)
	return nil
}

// TryAdmit lets one request through now if QoS would let it go without
// waiting (within the volume's caps and the node's capacity, or by its
// reservation, or as a light volume within its share), counting it as
// dispatched; otherwise it changes nothing and returns false, and the
// request takes the ordinary path (Wait). It never overtakes a request of
// the volume that is already waiting. Frontends use it to run a request on
// their own thread instead of handing it to a goroutine that may block;
// such a request carries pipeline.FlagAdmitted so that the stage does not
// count it twice.
func (v *VolumeQoS) TryAdmit(write bool, bytes int64) bool {
	if v.bypass.Load() && v.n.unlimited.Load() {
		return true
	}
	n := v.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if v.closed || v.f.Waiting() > 0 {
		return false
	}
	id := n.getSlotLocked()
	s := n.slots[id]
	now := n.now()
	n.s.Enqueue(v.f, id, write, bytes, now)
	n.dispatchAtLocked(now)
	ok := false
	select {
	case <-s.ch:
		ok = true
	default:
		n.s.Cancel(v.f, id, now) // still queued: it was not dispatched
	}
	s.err = nil
	n.free = append(n.free, id)
	return ok
}

// Bypassed reports whether Wait returns at once right now (no caps on the
// volume, unlimited node capacity, not closed). Frontends use it to run a
// request without a goroutine of its own.
func (v *VolumeQoS) Bypassed() bool { return v.bypass.Load() && v.n.unlimited.Load() }

// Wait blocks until the volume's QoS lets a request of this kind through:
// write is true for writes, trims and write-zeroes; bytes is the data it
// moves. It returns ctx.Err() if ctx ends first (the request gives up its
// place) and pipeline.ErrShutdown if the volume or node closes.
func (v *VolumeQoS) Wait(ctx context.Context, write bool, bytes int64) error {
	if v.bypass.Load() && v.n.unlimited.Load() {
		return nil
	}
	n := v.n
	n.mu.Lock()
	if v.closed {
		n.mu.Unlock()
		return fmt.Errorf("qos %s: %w", v.name, pipeline.ErrShutdown)
	}
	id := n.getSlotLocked()
	s := n.slots[id]
	now := n.now()
	n.s.Enqueue(v.f, id, write, bytes, now)
	n.dispatchAtLocked(now)
	n.mu.Unlock()

	var err error
	select {
	case <-s.ch:
		err = s.err
	case <-ctx.Done():
		n.mu.Lock()
		if v.closed || !n.s.Cancel(v.f, id, n.now()) {
			// Dispatched or failed meanwhile: the signal is in the
			// channel already (it is sent under the lock); drain it so the
			// slot is clean for reuse.
			n.mu.Unlock()
			<-s.ch
		} else {
			n.dispatchLocked() // the queue changed; others may go now
			n.mu.Unlock()
		}
		err = ctx.Err()
	}
	n.mu.Lock()
	s.err = nil
	n.free = append(n.free, id)
	n.mu.Unlock()
	if err != nil && !errors.Is(err, ctx.Err()) {
		return fmt.Errorf("qos %s: %w", v.name, err)
	}
	return err
}

// Stage returns the pipeline stage that applies the volume's QoS. Reads
// count their bytes against read and total caps; writes theirs against
// write and total caps; trims and write-zeroes count as write operations
// moving no data; flushes and cache hints pass untouched (they carry no
// data and holding back a flush only delays durability).
func (v *VolumeQoS) Stage() pipeline.Stage {
	return func(next pipeline.Handler) pipeline.Handler { return &stage{v: v, next: next} }
}

type stage struct {
	v    *VolumeQoS
	next pipeline.Handler
}

func (s *stage) Handle(ctx context.Context, r *pipeline.Request) error {
	if r.Flags&pipeline.FlagAdmitted != 0 {
		r.Flags &^= pipeline.FlagAdmitted
		return s.next.Handle(ctx, r)
	}
	var err error
	switch r.Op {
	case pipeline.OpRead:
		err = s.v.Wait(ctx, false, int64(r.Length))
	case pipeline.OpWrite:
		err = s.v.Wait(ctx, true, int64(r.Length))
	case pipeline.OpTrim, pipeline.OpWriteZeroes:
		err = s.v.Wait(ctx, true, 0)
	}
	if err != nil {
		return err
	}
	return s.next.Handle(ctx, r)
}
