// Package profile is the io_profile stage of the volume pipeline: per-volume
// I/O behaviour chosen by the volume's profile, and for `auto` learned from
// the volume's recent I/O.
//
//	none        requests go straight on; each FLUSH is one engine flush
//	db          group commit: concurrent FLUSH and FUA writes share one
//	            engine flush that started after the writes they cover
//	            completed; writes go into the engine's page cache
//	            (CachedWriter), which that flush writes back as a batch
//	            and which is dropped once the volume leaves db; no prefetch
//	db_remote   db (replication will add its own behaviour)
//	sequential  read streams are detected and prefetched into a bounded
//	            cache with a window that grows with the stream; small
//	            writes are merged in a bounded write-back buffer that every
//	            FLUSH and FUA write drains and every read sees
//	random      no prefetch, no merging; flushes are group-committed
//	journal     FUA writes go straight to stable storage (RWF_DSYNC), never
//	            delayed; flushes are group-committed
//	auto        classifies the last 800 ms of I/O (sequential fraction,
//	            request size, flush rate) and applies the matching one of
//	            sequential, random or db, with hysteresis; two ticks in a
//	            row that are clearly one kind (>= 90% or <= 10%
//	            sequential) decide without the rest of the window
//
// Whatever the effective profile, the stage keeps the write-back buffer and
// cache coherent: a profile change never strands buffered writes or stale
// prefetched data, because every read consults a non-empty buffer and cache
// and every write invalidates the cache.
//
// The cache and buffer draw their memory from a Budget that the node's
// stages share: when it is spent a stage prefetches less and writes through
// instead of buffering, and a stage idle for two seconds gives its memory
// back. Once an engine flush or a durable write has failed, every FLUSH and
// FUA write fails, whatever the profile, until the stage is reopened.
package profile

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/pipeline"
)

// Profile is an io_profile.
type Profile uint32

// Profiles. Auto is the zero value: a volume without a profile learns one.
const (
	Auto Profile = iota
	None
	DB
	DBRemote
	Sequential
	Random
	Journal
	numProfiles
)

var names = [numProfiles]string{"auto", "none", "db", "db_remote", "sequential", "random", "journal"}

// String returns the profile's name as stored in volume metadata.
func (p Profile) String() string {
	if p < numProfiles {
		return names[p]
	}
	return fmt.Sprintf("profile(%d)", uint32(p))
}

// Names lists every profile name, Auto first.
func Names() []string { return names[:] }

// Parse returns the profile called s ("" is auto).
func Parse(s string) (Profile, error) {
	if s == "" {
		return Auto, nil
	}
	for i, n := range names {
		if n == s {
			return Profile(i), nil
		}
	}
	return Auto, fmt.Errorf("unknown io_profile %q (want one of %v)", s, names)
}

// ReadAheadKB is the kernel read-ahead (/sys/block/DEV/queue/read_ahead_kb)
// that suits a device whose volume runs p.
func ReadAheadKB(p Profile) int {
	switch p {
	case Sequential:
		return 4096
	case Random:
		return 16
	}
	return 128
}

// Options tune a Stage. Zero values take the defaults.
type Options struct {
	// Size returns the volume's current size; prefetch never reads past
	// it. Required.
	Size func() int64
	// CacheBytes bounds the prefetch cache (default 32 MiB).
	CacheBytes int64
	// WriteBackBytes bounds the write-back buffer (default 8 MiB).
	WriteBackBytes int64
	// WriteBackAge is the longest a buffered write waits before it is
	// written to the engine without a flush (default 100ms).
	WriteBackAge time.Duration
	// Tick is the classifier's period; it looks at the last 8 ticks
	// (default 100ms). A clear change of workload is followed in two to
	// three ticks.
	Tick time.Duration
	// PrefetchWorkers is how many prefetch reads run at once (default 4).
	PrefetchWorkers int
	// Cached, if set, is the engine's page-cache write path (an
	// ioengine.CachedWriter): under db, writes go through it and the
	// group commit's flush writes them back in bulk, instead of each
	// write waiting for the device. The stage is the last before the
	// engine, so nothing between them is skipped. If it is also a
	// CacheDropper, the stage empties that cache once the volume has left
	// db.
	Cached CachedWriter
	// MaxSyncs bounds the engine flushes a group commit runs at once
	// (default 1: on ext4 over virtio one at a time batched best, each
	// flush's duration being the next batch's gathering window).
	MaxSyncs int
	// InMemory says the engine keeps the volume in RAM: prefetching into
	// the cache and buffering writes would each add a memory copy per
	// request and save no engine latency, so the stage does neither (the
	// classifier, group commit and the read-ahead hint still follow the
	// profile).
	InMemory bool
	// OnChange, if set, is called with the new effective profile each
	// time it changes (and once from New). It runs on the stage's own
	// goroutine or in SetProfile, never on the data path.
	OnChange func(effective Profile)
	// Budget is the node-wide memory the prefetch cache and write-back
	// buffer draw from, shared by every stage of the node (nil: the
	// stage's own, with no limit beyond CacheBytes and WriteBackBytes).
	Budget *Budget
	// Logger receives the errors of work no request waits for: a
	// write-back drain the age bound started, an engine page-cache drop
	// (default slog.Default(); the daemon passes one that names the
	// volume).
	Logger *slog.Logger
}

func (o *Options) defaults() {
	if o.CacheBytes <= 0 {
		o.CacheBytes = 32 << 20
	}
	if o.WriteBackBytes <= 0 {
		o.WriteBackBytes = 8 << 20
	}
	if o.WriteBackAge <= 0 {
		o.WriteBackAge = 100 * time.Millisecond
	}
	if o.Tick <= 0 {
		o.Tick = 100 * time.Millisecond
	}
	if o.PrefetchWorkers <= 0 {
		o.PrefetchWorkers = 4
	}
	if o.MaxSyncs <= 0 {
		o.MaxSyncs = 1
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Budget == nil {
		o.Budget = NewBudget(0)
	}
}

// idleRelease is how long a stage's cache or buffer stays unused before it
// gives its memory back to the budget and the system.
const idleRelease = 2 * time.Second

// CachedWriter writes into a volatile cache below the stage that the
// engine's flush makes durable (ioengine.CachedWriter).
type CachedWriter interface {
	WriteAtCached(p []byte, off int64) (int, error)
}

// CacheDropper is a CachedWriter whose cache can be emptied
// (ioengine.CacheDropper): the stage drops it once the volume has left db.
type CacheDropper interface {
	DropCache() error
}

// Stats are the stage's counters since it opened.
type Stats struct {
	Configured string `json:"configured"`
	Effective  string `json:"effective"`
	// EngineFlushes counts flushes sent to the engine; Flushes counts
	// FLUSH requests and FUA writes that needed one.
	Flushes       uint64 `json:"flushes"`
	EngineFlushes uint64 `json:"engine_flushes"`
	// FlushGathers counts engine flushes whose leader waited for the
	// previous flush's committers and saw them all arrive;
	// FlushGatherTimeouts those whose wait ran out first.
	FlushGathers        uint64 `json:"flush_gathers"`
	FlushGatherTimeouts uint64 `json:"flush_gather_timeouts"`
	// Prefetched is what prefetch read from the engine; PrefetchHit the
	// bytes of reads served from the cache; PrefetchUnread the bytes
	// prefetched and not read: gone from the cache unread (evicted,
	// invalidated, closed) or in it still unread.
	PrefetchedBytes     uint64 `json:"prefetched_bytes"`
	PrefetchHitBytes    uint64 `json:"prefetch_hit_bytes"`
	PrefetchUnreadBytes uint64 `json:"prefetch_unread_bytes"`
	// BufferedWrites went into the write-back buffer; DrainWrites are
	// the engine writes that drained it; BufferedBytes is in it now.
	BufferedWrites uint64 `json:"buffered_writes"`
	DrainWrites    uint64 `json:"drain_writes"`
	BufferedBytes  int64  `json:"buffered_bytes"`
	Switches       uint64 `json:"profile_switches"`
	// PageCacheDrops counts the engine page caches emptied after the
	// volume left db.
	PageCacheDrops uint64 `json:"page_cache_drops"`
	// MemoryBytes is what the cache and buffer hold from the budget.
	MemoryBytes int64 `json:"memory_bytes"`
}

// Stage is one volume's profile stage. It is a pipeline.Handler once Wrap
// has given it the next handler; Close stops its goroutines.
type Stage struct {
	next pipeline.Handler
	opts Options

	configured atomic.Uint32
	effective  atomic.Uint32
	switches   atomic.Uint64
	// pageCached says db writes went into the engine's page cache since
	// the ticker last dropped it; dropper drops it (nil if the engine
	// cannot).
	pageCached atomic.Bool
	dropper    CacheDropper
	cacheDrops atomic.Uint64
	changeMu   sync.Mutex // serializes OnChange calls and effective changes

	lost    lost // see lost: every FLUSH and FUA write fails once it is set
	gc      groupCommit
	wb      writeBack
	cache   cache
	streams streams
	cls     classifier

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // run and the prefetch workers
	closed atomic.Bool
}

// New returns a stage running profile p. Call Wrap (as a pipeline.Stage)
// to put it in a pipeline; it starts its goroutines there.
func New(p Profile, opts Options) *Stage {
	opts.defaults()
	s := &Stage{opts: opts}
	s.configured.Store(uint32(p))
	s.effective.Store(uint32(initialEffective(p)))
	s.wb.init(s, opts.WriteBackBytes)
	s.cache.init(s, opts.CacheBytes, opts.Budget)
	s.cls.init()
	s.dropper, _ = opts.Cached.(CacheDropper)
	return s
}

func initialEffective(p Profile) Profile {
	if p == Auto {
		return Random
	}
	return p
}

// Wrap is the pipeline.Stage: it records next and starts the stage's
// goroutines (the ticker that drives write-back ageing and the classifier,
// and the prefetch workers). Call it once.
func (s *Stage) Wrap(next pipeline.Handler) pipeline.Handler {
	s.next = next
	s.gc.init(next, s.opts.MaxSyncs, &s.lost)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go s.run()
	for i := 0; i < s.opts.PrefetchWorkers && !s.opts.InMemory; i++ {
		s.wg.Add(1)
		go s.cache.worker(s.ctx, &s.wg)
	}
	if s.opts.OnChange != nil {
		s.opts.OnChange(s.Effective())
	}
	return s
}

// Configured returns the profile the volume is set to.
func (s *Stage) Configured() Profile { return Profile(s.configured.Load()) }

// Effective returns the profile in force: the configured one, or for auto
// the one the classifier chose. db_remote stays db_remote here and behaves
// as db (a single replica has nothing to replicate to).
func (s *Stage) Effective() Profile { return Profile(s.effective.Load()) }

// SetProfile changes the configured profile of a live volume.
func (s *Stage) SetProfile(p Profile) {
	s.changeMu.Lock()
	defer s.changeMu.Unlock()
	s.configured.Store(uint32(p))
	s.cls.reset()
	s.setEffectiveLocked(initialEffective(p))
}

func (s *Stage) setEffectiveLocked(p Profile) {
	old := Profile(s.effective.Swap(uint32(p)))
	if old == p {
		return
	}
	s.switches.Add(1)
	if old == Sequential {
		// Nothing new is buffered or prefetched now; the ticker drains
		// what is left, and reads and flushes keep seeing it until then.
		s.streams.reset()
	}
	if s.opts.OnChange != nil {
		s.opts.OnChange(p)
	}
}

// Stats returns the stage's counters.
func (s *Stage) Stats() Stats {
	st := Stats{
		Configured:          s.Configured().String(),
		Effective:           s.Effective().String(),
		Flushes:             s.gc.requests.Load(),
		EngineFlushes:       s.gc.syncs.Load(),
		FlushGathers:        s.gc.gathers.Load(),
		FlushGatherTimeouts: s.gc.gatherOuts.Load(),
		PrefetchedBytes:     s.cache.prefetched.Load(),
		PrefetchHitBytes:    s.cache.hits.Load(),
		PrefetchUnreadBytes: s.cache.unreadNow(),
		BufferedWrites:      s.wb.buffered.Load(),
		DrainWrites:         s.wb.drainWrites.Load(),
		BufferedBytes:       s.wb.bytes.Load(),
		Switches:            s.switches.Load(),
		PageCacheDrops:      s.cacheDrops.Load(),
		MemoryBytes:         s.cache.memory() + s.wb.memory(),
	}
	return st
}

// run owns the ticker: it drains write-back data older than WriteBackAge
// and lets the classifier decide. It exits when Close cancels s.ctx.
func (s *Stage) run() {
	defer s.wg.Done()
	period := min(s.opts.Tick, s.opts.WriteBackAge/2)
	t := time.NewTicker(period)
	defer t.Stop()
	lastTick := time.Now()
	drainFailing := false // reported already; the drain retries every tick
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-t.C:
			if s.wb.nonEmpty() && (s.Effective() != Sequential || s.wb.age(now) >= s.opts.WriteBackAge) {
				// A failure keeps the data buffered (reads see it, the
				// next drain retries) and is recorded as lost (see
				// lost): every later FLUSH fails. No request waits for
				// this drain, so the log is the only one to hear of it.
				err := s.wb.drain(s.ctx)
				if err != nil && !drainFailing {
					s.opts.Logger.Error("io_profile: write-back drain failed; FLUSH and FUA writes fail until the volume is reopened", "err", err)
				}
				drainFailing = err != nil
			}
			if s.Effective() != Sequential && s.cache.nonEmpty() {
				s.cache.clear()
			}
			s.cache.idle(now, idleRelease)
			s.wb.idle(now, idleRelease)
			if p := s.Effective(); p != DB && p != DBRemote && s.pageCached.Load() {
				s.dropPageCache()
			}
			// Half a period of slack: a ticker firing a hair early
			// must not stretch the tick by a whole period.
			if now.Sub(lastTick) >= s.opts.Tick-period/2 {
				lastTick = now
				if s.Configured() == Auto {
					s.classify()
				}
			}
		}
	}
}

// dropPageCache empties the engine's page cache once the volume has left
// db: the pages db's writes left there would only hold host memory and
// make every later direct write to their range invalidate them first. A
// db write racing with the drop is safe: dirty pages are not dropped (one
// still dirty then may stay cached), and a write after the drop sets
// pageCached again.
func (s *Stage) dropPageCache() {
	s.pageCached.Store(false)
	if err := s.dropper.DropCache(); err != nil {
		// Nothing is lost (dirty pages are never dropped), but the host
		// keeps the memory; the next stay in db tries again.
		s.opts.Logger.Warn("io_profile: dropping the engine page cache after leaving db failed", "err", err)
		return
	}
	s.cacheDrops.Add(1)
}

func (s *Stage) classify() {
	s.changeMu.Lock() // orders tick against SetProfile's reset
	defer s.changeMu.Unlock()
	if p, ok := s.cls.tick(); ok && s.Configured() == Auto {
		s.setEffectiveLocked(p)
	}
}

// Close drains the write-back buffer into the engine and stops the
// stage's goroutines. Requests must have stopped (the volume's gate
// ensures it). The caller flushes the engine afterwards.
func (s *Stage) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	if s.cancel != nil {
		s.cancel()
	}
	s.cache.close()
	s.gc.close()
	s.wg.Wait()
	err := s.wb.drain(context.Background())
	// The memory goes back to the node's budget even if the drain
	// failed: the stage is gone, and its buffered data with it.
	s.wb.releaseAll()
	s.cache.release(true)
	return err
}

// Range is the byte range [Off, End).
type Range struct{ Off, End int64 }

// Buffered appends to dst the parts of [off, end) that writes hold which
// completed but are not in the engine yet (the write-back buffer), in
// order: a block-status query must not trust the engine's holes there.
// A write whose data left the buffer before Buffered looked is in the
// engine.
func (s *Stage) Buffered(dst []Range, off, end int64) []Range { return s.wb.ranges(dst, off, end) }

// Handle implements pipeline.Handler.
func (s *Stage) Handle(ctx context.Context, r *pipeline.Request) error {
	p := Profile(s.effective.Load())
	if p == Sequential || Profile(s.configured.Load()) == Auto {
		s.observe(r, p)
	}
	switch r.Op {
	case pipeline.OpRead:
		return s.read(ctx, r, p)
	case pipeline.OpWrite:
		return s.write(ctx, r, p)
	case pipeline.OpFlush:
		return s.flush(ctx, r, p)
	case pipeline.OpTrim, pipeline.OpWriteZeroes:
		fua := r.Flags&pipeline.FlagFUA != 0
		if err := s.lost.get(); fua && err != nil {
			return err
		}
		if s.wb.nonEmpty() {
			if err := s.wb.drainIfOverlap(ctx, r.Offset, r.End()); err != nil {
				return err
			}
		}
		err := s.next.Handle(ctx, r)
		s.gc.wrote()
		if s.cache.nonEmpty() {
			s.cache.invalidate(r.Offset, r.End())
		}
		if fua {
			return s.lost.durable(err)
		}
		return err
	}
	return s.next.Handle(ctx, r)
}

// Inline reports whether Handle would complete r now without engine I/O
// and without waiting for another request: a read whose every byte the
// prefetch cache holds, a write the write-back buffer has room for
// (sequential), or a db write into the engine's page cache. The NBD reader
// then runs r itself instead of waking a worker. It is a hint: the state
// may change before Handle runs (an eviction, a drain starting, a profile
// switch), and then Handle does the engine I/O after all, on the reader.
// It never waits: a buffer whose lock is held (a drain in progress) says
// no.
func (s *Stage) Inline(r *pipeline.Request) bool {
	if s.opts.InMemory {
		return false // the caller knows RAM engines better (blockd.Volume.Inline)
	}
	p := Profile(s.effective.Load())
	switch r.Op {
	case pipeline.OpRead:
		if s.wb.nonEmpty() && !s.wb.clearOf(r.Offset, r.End()) {
			return false
		}
		return s.cache.nonEmpty() && s.cache.holds(r.Offset, r.End())
	case pipeline.OpWrite:
		if r.Flags&pipeline.FlagFUA != 0 || r.Offset < 0 || r.End() > s.opts.Size() {
			return false // FUA waits for a flush; errors take the slow path
		}
		if p == Sequential && r.Length <= maxBuffered {
			return s.wb.hasRoom(r.Offset, r.End())
		}
		if (p == DB || p == DBRemote) && s.opts.Cached != nil {
			return !s.wb.nonEmpty() || s.wb.clearOf(r.Offset, r.End())
		}
	}
	return false
}

// observe feeds the classifier and the stream detector; for a sequential
// read under the sequential profile it schedules prefetch.
func (s *Stage) observe(r *pipeline.Request, p Profile) {
	switch r.Op {
	case pipeline.OpRead, pipeline.OpWrite:
	case pipeline.OpFlush:
		s.cls.flushes.Add(1)
		return
	default:
		return
	}
	prefetch := r.Op == pipeline.OpRead && p == Sequential && !s.opts.InMemory
	seq, from, to := s.streams.observe(r.Offset, r.End(), prefetch, s.opts.CacheBytes/2)
	s.cls.observe(r, seq)
	if to > from {
		s.cache.schedule(from, to)
	}
}

func (s *Stage) read(ctx context.Context, r *pipeline.Request, p Profile) error {
	if s.wb.nonEmpty() {
		if done, err := s.wb.read(ctx, r, p); done {
			return err
		}
	}
	return s.readBase(ctx, r, p)
}

// readBase reads from the cache or the engine, ignoring the write-back
// buffer (the caller overlays it).
func (s *Stage) readBase(ctx context.Context, r *pipeline.Request, p Profile) error {
	if s.cache.nonEmpty() && s.cache.read(r) {
		return nil
	}
	return s.next.Handle(ctx, r)
}

// maxBuffered is the largest write the write-back buffer takes; larger
// writes are already large engine writes.
const maxBuffered = 128 << 10

func (s *Stage) write(ctx context.Context, r *pipeline.Request, p Profile) error {
	fua := r.Flags&pipeline.FlagFUA != 0
	if err := s.lost.get(); fua && err != nil {
		return err // it could not be made durable: refuse it before writing
	}
	if p == Sequential && !fua && r.Length <= maxBuffered && !s.opts.InMemory {
		if r.Offset < 0 || r.End() > s.opts.Size() {
			return pipeline.ErrOutOfRange
		}
		buffered, err := s.wb.put(ctx, r)
		if buffered {
			if s.cache.nonEmpty() {
				s.cache.invalidate(r.Offset, r.End())
			}
			return err
		}
		// The budget has no memory to buffer it: write it through.
	}
	if s.wb.nonEmpty() {
		// A FUA write drains everything before it; any other write only
		// what it overlaps, so the older buffered data cannot land on top
		// of it later.
		var err error
		if fua {
			err = s.wb.drain(ctx)
		} else {
			err = s.wb.drainIfOverlap(ctx, r.Offset, r.End())
		}
		if err != nil {
			return err
		}
	}
	var err error
	if p == DB || p == DBRemote {
		err = s.writeDB(ctx, r, fua)
	} else {
		err = s.next.Handle(ctx, r)
		s.gc.wrote()
	}
	if s.cache.nonEmpty() {
		s.cache.invalidate(r.Offset, r.End())
	}
	if fua {
		return s.lost.durable(err)
	}
	return err
}

// writeDB writes r under db: into the engine's cache when it has one (the
// group commit's flush writes it back together with its neighbours'), and
// a FUA write then shares a group flush with concurrent FLUSHes and FUA
// writes. The flush starts after the write completed, so the write is
// durable when it is acknowledged.
func (s *Stage) writeDB(ctx context.Context, r *pipeline.Request, fua bool) error {
	var err error
	if s.opts.Cached != nil {
		if r.Offset < 0 || r.End() > s.opts.Size() {
			return pipeline.ErrOutOfRange
		}
		if s.dropper != nil && !s.pageCached.Load() {
			s.pageCached.Store(true)
		}
		_, err = s.opts.Cached.WriteAtCached(r.Buf[:r.Length], r.Offset)
	} else {
		r.Flags &^= pipeline.FlagFUA
		err = s.next.Handle(ctx, r)
		if fua {
			r.Flags |= pipeline.FlagFUA
		}
	}
	// Counted even when it failed: part of it may have landed, and an
	// extra count only makes a later FLUSH run a flush it might skip.
	s.gc.wrote()
	if err != nil || !fua {
		return err
	}
	s.gc.requests.Add(1)
	return s.gc.flush(ctx)
}

func (s *Stage) flush(ctx context.Context, r *pipeline.Request, p Profile) error {
	if s.wb.nonEmpty() {
		if err := s.wb.drain(ctx); err != nil {
			return err
		}
	}
	s.gc.requests.Add(1)
	if err := s.lost.get(); err != nil {
		return err
	}
	if p == None {
		s.gc.syncs.Add(1)
		if err := s.next.Handle(ctx, r); err != nil {
			return s.lost.set(err)
		}
		return nil
	}
	return s.gc.flush(ctx)
}
