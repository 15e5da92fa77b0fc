package replication

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// resyncBatch is how many regions' checksums one MsgChecksums asks for.
const resyncBatch = 64

// resync copies to a resyncing replica the regions its bitmap marks,
// comparing checksums first when the replica's history is unknown, until
// the bitmap is empty and the replica is in sync. A region's bit is
// cleared only when the replica acknowledged the copy (or matched the
// checksum), and the bitmap is synced every second, so an interrupted
// resync resumes where it stopped.
func (p *peer) resync() error {
	r := p.r
	region := p.bm.Region()
	p.mu.Lock()
	p.total = p.bm.Count()
	p.mu.Unlock()
	if p.total > 0 {
		r.log.Info("resync started", "replica", p.node, "regions", p.total, "bytes", p.total*region, "compare", p.compareNow())
	}
	buf := make([]byte, region)
	var sums []byte
	var sumsFrom int64 = -1
	lastSync, rateFrom, rateBytes := time.Now(), time.Now(), int64(0)
	cursor := int64(0) // regions are visited in order, wrapping around
	for {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		if p.state.Load() != peerResyncing {
			return fmt.Errorf("replica left resync")
		}
		reg, ok := p.bm.Next(cursor)
		if !ok && cursor > 0 {
			cursor = 0
			continue
		}
		if !ok {
			r.mu.Lock()
			done, err := r.inSyncLocked(p)
			r.mu.Unlock()
			if err != nil {
				return err
			}
			if done {
				if err := p.bm.Sync(); err != nil {
					return err
				}
				r.log.Info("replica in sync", "replica", p.node, "generation", r.State().Generation,
					"copied_bytes", p.copied.Load(), "compared_bytes", p.checked.Load())
				return nil
			}
			continue // a write marked a region meanwhile
		}
		cursor = reg + 1
		off := reg * region
		size := r.cfg.Engine.Size()
		if off >= size {
			p.bm.Clear(reg)
			continue
		}
		n := min(region, size-off)
		compare := p.compareNow()
		if compare && (sumsFrom < 0 || reg < sumsFrom || reg >= sumsFrom+int64(len(sums)/8)) {
			var err error
			if sums, err = p.remoteSums(reg, region); err != nil {
				return err
			}
			sumsFrom = reg
		}
		h := r.rl.lock(off, off+n) // no application write crosses the copy
		if _, err := r.cfg.Engine.ReadAt(buf[:n], off); err != nil {
			r.rl.unlock(h)
			return fmt.Errorf("resync: reading our copy: %w", err)
		}
		same := false
		if compare {
			local, err := Checksums(memEngine(buf[:n]), 0, 1, n, nil)
			if err != nil {
				r.rl.unlock(h)
				return err
			}
			i := (reg - sumsFrom) * 8
			same = bytes.Equal(local, sums[i:i+8])
			p.checked.Add(n)
		}
		if !same {
			if err := p.send(Msg{Type: MsgWrite, Volume: r.name, Epoch: r.epoch, Offset: off, Length: uint32(n), Flags: FlagResync}, buf[:n]); err != nil {
				r.rl.unlock(h)
				return err
			}
			p.copied.Add(n)
			rateBytes += n
		}
		p.bm.Clear(reg)
		r.rl.unlock(h)
		if !same && r.n.Resync != nil {
			if err := r.n.Resync.Wait(p.ctx, n); err != nil {
				return err
			}
		}
		if now := time.Now(); now.Sub(lastSync) >= time.Second {
			if err := p.bm.Sync(); err != nil {
				return err
			}
			p.mu.Lock()
			p.rate = float64(rateBytes) / now.Sub(rateFrom).Seconds()
			p.mu.Unlock()
			lastSync, rateFrom, rateBytes = now, now, 0
		}
	}
}

func (p *peer) compareNow() bool {
	p.r.mu.RLock()
	defer p.r.mu.RUnlock()
	return p.compare
}

// remoteSums fetches the replica's checksums of resyncBatch regions from
// reg.
func (p *peer) remoteSums(reg, region int64) ([]byte, error) {
	r := p.r
	m := Msg{Type: MsgChecksums, Volume: r.name, Epoch: r.epoch, Offset: reg * region, Length: resyncBatch, Flags: uint32(region)}
	var resp Msg
	out, err := r.n.Net.Call(p.ctx, p.node, r.n.LastTimeout, &m, nil, &resp, make([]byte, 8*resyncBatch))
	if err != nil {
		return nil, err
	}
	if resp.Status != StatusOK {
		return nil, &StatusError{Status: resp.Status, Epoch: resp.Epoch}
	}
	if len(out)%8 != 0 || len(out) == 0 {
		return nil, fmt.Errorf("resync: %d bytes of checksums", len(out))
	}
	return out, nil
}

// send is one synchronous message to the replica.
func (p *peer) send(m Msg, payload []byte) error { return p.sendCtx(p.ctx, m, payload) }

func (p *peer) sendCtx(ctx context.Context, m Msg, payload []byte) error {
	var resp Msg
	_, err := p.r.n.Net.Call(ctx, p.node, p.r.n.Timeout, &m, payload, &resp, nil)
	if err == nil && resp.Status != StatusOK {
		err = &StatusError{Status: resp.Status, Epoch: resp.Epoch}
	}
	return err
}

// memEngine is a byte slice as an engine, to checksum a region in memory
// exactly as Checksums does an engine's.
type memEngine []byte

func (m memEngine) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }
func (m memEngine) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("read only")
}
func (m memEngine) Flush() error                           { return nil }
func (m memEngine) Trim(off, n int64) error                { return nil }
func (m memEngine) WriteZeroes(off, n int64, _ bool) error { return nil }
func (m memEngine) Size() int64                            { return int64(len(m)) }
func (m memEngine) Resize(int64) error                     { return nil }
func (m memEngine) Close() error                           { return nil }

// Limiter caps a rate in bytes per second (a token bucket with a second
// of burst), shared by the resyncs of a node. While application I/O is
// busy, Busy lowers the cap to its minimum.
type Limiter struct {
	mu     sync.Mutex
	rate   float64 // bytes per second; 0: no cap
	min    float64
	tokens float64
	last   time.Time
	busy   atomic.Int64 // unix nanoseconds until which application I/O counts as running
}

// NewLimiter returns a limiter of rate bytes per second, falling to
// minRate while application I/O competes (0: no lowering).
func NewLimiter(rate, minRate int64) *Limiter {
	return &Limiter{rate: float64(rate), min: float64(minRate), tokens: float64(rate), last: time.Now()}
}

// Busy tells the limiter that application I/O is running now. It is
// called for every replicated write, so it costs one atomic load in the
// common case.
func (l *Limiter) Busy() {
	if l == nil || l.min <= 0 {
		return
	}
	now := time.Now().UnixNano()
	if l.busy.Load() < now+400*int64(time.Millisecond) {
		l.busy.Store(now + 500*int64(time.Millisecond))
	}
}

// Wait takes n bytes of budget, waiting as long as it takes.
func (l *Limiter) Wait(ctx context.Context, n int64) error {
	if l == nil {
		return nil
	}
	for {
		l.mu.Lock()
		if l.rate <= 0 {
			l.mu.Unlock()
			return nil
		}
		now := time.Now()
		rate := l.rate
		if l.min > 0 && now.UnixNano() < l.busy.Load() {
			rate = l.min
		}
		l.tokens = min(l.tokens+now.Sub(l.last).Seconds()*rate, rate)
		l.last = now
		if l.tokens >= 0 {
			l.tokens -= float64(n)
			l.mu.Unlock()
			return nil
		}
		wait := time.Duration(-l.tokens / rate * float64(time.Second))
		l.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}
