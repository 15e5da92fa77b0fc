package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// clientConn is the connection this node dialed to one peer. Calls go on
// Config.Streams multiplexed streams; a dead one is replaced on next use.
type clientConn struct {
	t       *Transport
	p       *peer
	qc      *quic.Conn
	mu      sync.Mutex // serializes replacing a stream
	streams []atomic.Pointer[muxStream]
	next    atomic.Uint32
}

func (t *Transport) newClientConn(p *peer, qc *quic.Conn) (*clientConn, error) {
	cc := &clientConn{t: t, p: p, qc: qc, streams: make([]atomic.Pointer[muxStream], t.cfg.Streams)}
	for i := range cc.streams {
		ms, err := cc.openMux()
		if err != nil {
			return nil, err
		}
		cc.streams[i].Store(ms)
	}
	return cc, nil
}

// watch waits for the connection's end, forgets it and logs why; one runs
// per connection once it is established.
func (cc *clientConn) watch() {
	<-cc.qc.Context().Done()
	cc.t.untrack(cc.qc)
	cc.p.mu.Lock()
	if cc.p.cur == cc {
		cc.p.cur = nil
	}
	cc.p.mu.Unlock()
	if !cc.t.isClosed() {
		cc.t.logLimited(slog.LevelWarn, "transport: connection lost", "peer", cc.p.name, "reason", context.Cause(cc.qc.Context()))
	}
}

// call makes one call on this connection and fills resp; a Status other
// than StatusOK is the caller's to report.
func (cc *clientConn) call(ctx context.Context, timeout time.Duration, req *Header, payload []byte, resp *Header, respBuf []byte) ([]byte, error) {
	ms, err := cc.pick()
	if err != nil {
		return nil, err
	}
	return ms.call(ctx, timeout, req, payload, resp, respBuf)
}

// pick returns the next live multiplexed stream, round robin, replacing a
// dead one with a new stream on the same connection.
func (cc *clientConn) pick() (*muxStream, error) {
	n := uint32(len(cc.streams))
	start := cc.next.Add(1)
	var err error
	for i := range n {
		slot := &cc.streams[(start+i)%n]
		if ms := slot.Load(); !ms.failed() {
			return ms, nil
		}
		cc.mu.Lock()
		ms := slot.Load()
		if ms.failed() {
			var nms *muxStream
			if nms, err = cc.openMux(); err == nil {
				slot.Store(nms)
				ms = nms
			}
		}
		cc.mu.Unlock()
		if !ms.failed() {
			return ms, nil
		}
	}
	return nil, notSent(fmt.Errorf("no usable stream: %w", err))
}

func (cc *clientConn) openMux() (*muxStream, error) {
	s, err := cc.qc.OpenStream()
	if err != nil {
		return nil, err
	}
	ms := &muxStream{
		t:     cc.t,
		s:     s,
		sendq: make(chan *muxCall, callsPerStream),
		free:  make(chan uint16, callsPerStream),
		dead:  make(chan struct{}),
	}
	for i := range ms.calls {
		ms.calls[i].idx = uint16(i)
		ms.calls[i].done = make(chan struct{}, 1)
		ms.free <- uint16(i)
	}
	if !cc.t.spawn(ms.writeLoop) {
		s.CancelWrite(codeShutdown)
		s.CancelRead(codeShutdown)
		return nil, ErrClosed
	}
	if !cc.t.spawn(ms.readLoop) {
		ms.fail(ErrClosed)
		return nil, ErrClosed
	}
	return ms, nil
}

// A multiplexed stream carries up to callsPerStream calls at once. Each
// call owns a slot; its id is the slot index in the low 16 bits and the
// slot's use count above, so a response can only complete the call it
// answers. One writer goroutine writes the queued requests in order, one
// reader goroutine matches responses, in any order, to their slots.
//
// A slot's state changes under mu. Whoever last has business with a call
// frees its slot: the caller after its result, the writer for a call
// abandoned before it was written, the reader (or fail) for one abandoned
// while its response was awaited. A call being written or whose response
// is being read is completed by the writer or reader itself, so the
// caller's buffers are never touched after Call returns.
type muxStream struct {
	t     *Transport
	s     *quic.Stream
	sendq chan *muxCall // requests for the writer; never blocks
	free  chan uint16   // free slots
	dead  chan struct{} // closed by fail
	calls [callsPerStream]muxCall

	mu      sync.Mutex
	writing *muxCall // the call whose frame the writer is writing
	err     error    // why the stream failed; set once
}

type slotState uint8

const (
	slotFree      slotState = iota
	slotQueued              // in sendq, not yet taken by the writer
	slotSent                // taken by the writer: being written or awaiting its response
	slotReading             // the reader is filling resp and respBuf
	slotDone                // complete; the caller has its result
	slotAbandoned           // the caller left; see muxStream
)

type muxCall struct {
	idx   uint16
	gen   uint64
	state slotState
	done  chan struct{} // one token per completion the caller waits for

	req     *Header
	payload []byte
	resp    *Header
	respBuf []byte
	out     []byte
	err     error
	// timer bounds a call made with a timeout: one per slot, reset for
	// each call, so a timeout costs no allocation.
	timer *time.Timer
	timed bool // the current call runs against timer
}

func (c *muxCall) id() uint64 { return c.gen<<16 | uint64(c.idx) }

func (ms *muxStream) failed() bool {
	select {
	case <-ms.dead:
		return true
	default:
		return false
	}
}

func (ms *muxStream) call(ctx context.Context, timeout time.Duration, req *Header, payload []byte, resp *Header, respBuf []byte) ([]byte, error) {
	c, err := ms.start(ctx, timeout, req, payload, resp, respBuf)
	if err != nil {
		return nil, err
	}
	return ms.wait(ctx, c)
}

// start takes a slot for the call and queues its request for the writer;
// wait collects the answer. Between them the caller may do other work (the
// replication layer writes its local copy meanwhile).
func (ms *muxStream) start(ctx context.Context, timeout time.Duration, req *Header, payload []byte, resp *Header, respBuf []byte) (*muxCall, error) {
	var idx uint16
	var expired <-chan time.Time // a wait for a free slot counts against the timeout
	if timeout > 0 && len(ms.free) == 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-expired:
		return nil, notSent(context.DeadlineExceeded)
	case idx = <-ms.free:
	case <-ms.dead:
		return nil, notSent(ms.failure())
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c := &ms.calls[idx]
	ms.mu.Lock()
	if ms.err != nil {
		err := ms.err
		ms.mu.Unlock()
		ms.free <- idx
		return nil, notSent(err)
	}
	c.gen++
	c.req, c.payload, c.resp, c.respBuf = req, payload, resp, respBuf
	c.state = slotQueued
	c.timed = timeout > 0
	ms.mu.Unlock()
	if c.timed {
		if c.timer == nil {
			c.timer = time.NewTimer(timeout)
		} else {
			c.timer.Reset(timeout)
		}
	}
	ms.sendq <- c
	return c, nil
}

// wait waits for c's answer (or its timeout, or ctx) and frees its slot.
func (ms *muxStream) wait(ctx context.Context, c *muxCall) ([]byte, error) {
	var deadline <-chan time.Time
	if c.timed {
		deadline = c.timer.C
		defer c.timer.Stop()
	}
	canceled := false
	var cause error
	select {
	case <-c.done:
	case <-ctx.Done():
		cause = ctx.Err()
	case <-deadline:
		cause = context.DeadlineExceeded
	}
	if cause != nil {
		if ms.abandon(c) {
			return nil, cause
		}
		<-c.done
		canceled = true
	}
	ms.mu.Lock()
	out, err := c.out, c.err
	ms.freeLocked(c)
	ms.mu.Unlock()
	if err != nil && canceled {
		err = cause // the reset that abandon caused is not the story
	}
	return out, err
}

// abandon gives up on c for a caller whose context ended. It reports true
// if the caller may return at once; false means the writer or reader is
// using c's buffers: the stream is reset so that they let go promptly,
// and they complete c.
func (ms *muxStream) abandon(c *muxCall) bool {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	switch c.state {
	case slotQueued:
		c.state = slotAbandoned
		return true
	case slotSent:
		if ms.writing != c {
			c.state = slotAbandoned
			return true
		}
		// Half a frame is out: only a reset gets the payload back.
		ms.s.CancelWrite(codeCanceled)
	case slotReading:
		ms.s.CancelRead(codeCanceled)
	}
	return false
}

func (ms *muxStream) freeLocked(c *muxCall) {
	c.state = slotFree
	c.req, c.payload, c.resp, c.respBuf, c.out, c.err = nil, nil, nil, nil, nil, nil
	ms.free <- c.idx
}

func (ms *muxStream) completeLocked(c *muxCall, out []byte, err error) {
	c.out, c.err = out, err
	c.state = slotDone
	c.done <- struct{}{}
}

func (ms *muxStream) failure() error {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	return ms.err
}

// fail ends the stream: every call on it fails with err (those not yet
// written as not sent), and the writer and reader stop.
func (ms *muxStream) fail(err error) {
	ms.mu.Lock()
	if ms.err != nil {
		ms.mu.Unlock()
		return
	}
	ms.err = err
	close(ms.dead)
	for i := range ms.calls {
		c := &ms.calls[i]
		switch {
		case c == ms.writing || c.state == slotReading:
			// its goroutine completes it
		case c.state == slotAbandoned:
			ms.freeLocked(c)
		case c.state == slotQueued:
			ms.completeLocked(c, nil, notSent(err))
		case c.state == slotSent:
			ms.completeLocked(c, nil, err)
		}
	}
	ms.mu.Unlock()
	code := quic.StreamErrorCode(codeCanceled)
	if errors.Is(err, errFrame) || errors.Is(err, errTooLarge) {
		code = codeProtocol
		ms.t.logLimited(slog.LevelWarn, "transport: bad response, stream reset", "err", err)
	}
	ms.s.CancelWrite(code)
	ms.s.CancelRead(code)
}

func (ms *muxStream) writeLoop() {
	codec := getCodec()
	defer putCodec(codec)
	for {
		var c *muxCall
		select {
		case c = <-ms.sendq:
		case <-ms.dead:
			return
		}
		ms.mu.Lock()
		if c.state == slotAbandoned {
			ms.freeLocked(c)
		}
		if c.state != slotQueued { // freed, or failed by fail
			ms.mu.Unlock()
			continue
		}
		c.state = slotSent
		ms.writing = c
		gen, id, req, payload := c.gen, c.id(), c.req, c.payload
		ms.mu.Unlock()

		err := writeFrame(ms.s, codec, id, req, payload)

		ms.mu.Lock()
		ms.writing = nil
		// Unless the reader has completed it already, a call whose write
		// failed, or that fail skipped while it was being written, is
		// completed here.
		if (err != nil || ms.err != nil) && c.gen == gen && c.state == slotSent {
			if err != nil {
				ms.completeLocked(c, nil, notSent(err))
			} else {
				ms.completeLocked(c, nil, ms.err)
			}
		}
		ms.mu.Unlock()
		if err != nil {
			ms.fail(err)
			return
		}
	}
}

// writeFrame writes one frame. A failed write leaves at most part of the
// frame on the stream, which the peer never acts on. A small payload is
// copied behind the header and written with it: two writes would wake
// quic-go's sender twice and often cost a packet of its own for the
// header.
func writeFrame(s *quic.Stream, codec *frameCodec, id uint64, h *Header, payload []byte) error {
	b, err := codec.encode(id, h, len(payload))
	if err != nil {
		return err
	}
	if len(payload) <= coalesceMax {
		b = codec.appendPayload(payload)
		payload = nil
	}
	if _, err := s.Write(b); err != nil {
		return err
	}
	if len(payload) > 0 {
		_, err = s.Write(payload)
	}
	return err
}

func (ms *muxStream) readLoop() {
	codec := getCodec()
	defer putCodec(codec)
	var h Header
	for {
		id, n, err := codec.readHeader(ms.s, &h, ms.t.cfg.MaxPayload)
		if err != nil {
			if err == io.EOF {
				err = fmt.Errorf("peer closed the stream: %w", err)
			}
			ms.fail(err)
			return
		}
		ms.mu.Lock()
		c := ms.awaiting(id)
		if c == nil {
			ms.mu.Unlock()
			ms.fail(fmt.Errorf("response to no call (id %#x): %w", id, errFrame))
			return
		}
		abandoned := c.state == slotAbandoned
		if !abandoned {
			c.state = slotReading
		}
		ms.mu.Unlock()

		if abandoned {
			err = discard(ms.s, n)
			ms.mu.Lock()
			ms.freeLocked(c)
			ms.mu.Unlock()
		} else {
			*c.resp = h
			buf := c.respBuf
			if cap(buf) < n {
				buf = make([]byte, n)
			}
			buf = buf[:n]
			if _, err = io.ReadFull(ms.s, buf); err != nil {
				buf, err = nil, noEOF(err)
			}
			ms.mu.Lock()
			ms.completeLocked(c, buf, err)
			ms.mu.Unlock()
		}
		if err != nil {
			ms.fail(err)
			return
		}
	}
}

// awaiting returns the call that awaits the response with this id, or nil.
func (ms *muxStream) awaiting(id uint64) *muxCall {
	idx := id & 0xffff
	if idx >= callsPerStream {
		return nil
	}
	c := &ms.calls[idx]
	if c.gen != id>>16 || (c.state != slotSent && c.state != slotAbandoned) {
		return nil
	}
	return c
}

// discard reads and drops n bytes: the payload of a response nobody waits
// for.
func discard(r io.Reader, n int) error {
	var buf [4096]byte
	for n > 0 {
		m, err := io.ReadFull(r, buf[:min(n, len(buf))])
		n -= m
		if err != nil {
			return noEOF(err)
		}
	}
	return nil
}
