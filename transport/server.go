package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
)

// serverConn serves one incoming connection: a goroutine per stream reads
// requests and hands each to a worker, so that the stream's next requests
// are read meanwhile. Workers are started as needed, up to
// Config.MaxInFlight, and live as long as the connection.
type serverConn struct {
	t       *Transport
	qc      *quic.Conn
	peer    string
	ctx     context.Context // ends with the connection
	work    chan *request   // hands requests to idle workers
	free    chan *request   // idle requests
	workers atomic.Int32
}

// serverStream is the writing side of a stream shared by the goroutines
// answering its requests; the last one to let go of it closes it.
type serverStream struct {
	s    *quic.Stream
	wmu  sync.Mutex
	refs atomic.Int32
}

func (st *serverStream) release() {
	if st.refs.Add(-1) == 0 {
		st.s.Close()
	}
}

// A request keeps a payload buffer of up to keepPayload bytes across uses,
// and its connection keeps idle requests in a free list (which, unlike a
// sync.Pool, no garbage collection empties), so that serving small
// requests allocates nothing at all. A larger payload borrows a buffer of
// the shared size-class pools for the one request.
type request struct {
	st      *serverStream
	id      uint64
	hdr     Header
	resp    Header
	payload []byte      // this request's payload, in own or big
	own     []byte      // kept across uses
	big     *payloadBuf // borrowed for this request
}

const keepPayload = 64 << 10

func (r *request) setPayload(n int) {
	switch {
	case n <= cap(r.own):
		r.payload = r.own[:n]
	case n <= keepPayload:
		r.own = make([]byte, max(1<<bits.Len(uint(n-1)), 1<<minBufShift))
		r.payload = r.own[:n]
	default:
		r.big = getPayload(n)
		r.payload = r.big.b
	}
}

func (sc *serverConn) getRequest() *request {
	select {
	case r := <-sc.free:
		return r
	default:
		return new(request)
	}
}

func (sc *serverConn) putRequest(r *request) {
	if r.big != nil {
		putPayload(r.big)
	}
	*r = request{own: r.own}
	select {
	case sc.free <- r:
	default:
	}
}

func (t *Transport) acceptLoop() {
	for {
		qc, err := t.ln.Accept(t.ctx)
		if err != nil {
			return
		}
		t.accept(qc)
	}
}

func (t *Transport) accept(qc *quic.Conn) {
	cs := qc.ConnectionState()
	name, ok := "", false
	if certs := cs.TLS.PeerCertificates; len(certs) > 0 {
		name, ok = t.peerName(certs[0])
	}
	if !ok || cs.Used0RTT { // the TLS configuration rules both out
		qc.CloseWithError(codeProtocol, "refused")
		return
	}
	if w, _ := qc.Context().Value(watchKey{}).(*connWatch); w != nil {
		w.peer.Store(&name)
		w.accepted.Store(true)
	}
	sc := &serverConn{t: t, qc: qc, peer: name, ctx: qc.Context(), work: make(chan *request),
		free: make(chan *request, t.cfg.MaxInFlight+t.cfg.Streams)}
	if !t.track(qc) || !t.spawn(sc.acceptStreams) {
		t.untrack(qc)
		qc.CloseWithError(codeShutdown, "node shutting down")
		return
	}
	t.log.Info("transport: peer connected", "peer", name, "addr", qc.RemoteAddr().String())
}

func (sc *serverConn) acceptStreams() {
	defer sc.t.untrack(sc.qc)
	for {
		s, err := sc.qc.AcceptStream(sc.ctx)
		if err != nil {
			return
		}
		if !sc.t.spawn(func() { sc.serveStream(s) }) {
			s.CancelRead(codeShutdown)
			s.CancelWrite(codeShutdown)
			return
		}
	}
}

// serveStream reads the requests of one stream until it ends.
func (sc *serverConn) serveStream(s *quic.Stream) {
	codec := getCodec()
	defer putCodec(codec)
	st := &serverStream{s: s}
	st.refs.Store(1)
	defer st.release()
	for {
		req := sc.getRequest()
		id, n, err := codec.readHeader(s, &req.hdr, sc.t.cfg.MaxPayload)
		if err == nil {
			req.setPayload(n)
			if _, err = io.ReadFull(s, req.payload); err != nil {
				err = noEOF(err)
			}
		}
		if err != nil {
			sc.putRequest(req)
			sc.streamError(s, err)
			return
		}
		if id == 0 {
			sc.putRequest(req)
			sc.streamError(s, fmt.Errorf("call id 0: %w", errFrame))
			return
		}
		req.st, req.id = st, id
		st.refs.Add(1)
		sc.dispatch(req)
	}
}

// streamError ends a stream whose reading failed: the caller closed or
// reset it or the connection ended (nothing to say), or it sent a
// malformed, oversized or truncated frame (logged; the stream is reset and
// the connection lives on).
func (sc *serverConn) streamError(s *quic.Stream, err error) {
	if err == io.EOF {
		return
	}
	if errors.Is(err, errFrame) || errors.Is(err, errTooLarge) || err == io.ErrUnexpectedEOF {
		sc.t.logLimited(slog.LevelWarn, "transport: malformed request, stream reset", "peer", sc.peer, "err", err)
		s.CancelRead(codeProtocol)
		s.CancelWrite(codeProtocol)
		return
	}
	s.CancelRead(codeCanceled)
}

func (sc *serverConn) dispatch(req *request) {
	select {
	case sc.work <- req:
		return
	default:
	}
	if sc.workers.Add(1) <= int32(sc.t.cfg.MaxInFlight) {
		if !sc.t.spawn(func() { sc.worker(req) }) {
			sc.drop(req)
		}
		return
	}
	sc.workers.Add(-1)
	select {
	case sc.work <- req:
	case <-sc.ctx.Done():
		sc.drop(req)
	}
}

func (sc *serverConn) worker(req *request) {
	codec := getCodec()
	defer putCodec(codec)
	for {
		st := req.st
		sc.serve(codec, req)
		st.release()
		select {
		case req = <-sc.work:
		case <-sc.ctx.Done():
			return
		}
	}
}

func (sc *serverConn) drop(req *request) {
	req.st.release()
	sc.putRequest(req)
}

// serve answers one request and recycles it.
func (sc *serverConn) serve(codec *frameCodec, req *request) {
	t := sc.t
	var out []byte
	var err error
	if req.hdr.Type == TypePing {
		req.resp = Header{Type: TypePing}
	} else {
		req.resp = Header{}
		out, err = t.cfg.Handler.ServeMessage(sc.ctx, sc.peer, &req.hdr, req.payload, &req.resp)
	}
	send := out
	if len(send) > t.cfg.MaxPayload {
		err = errors.Join(err, fmt.Errorf("response payload of %d bytes, limit %d", len(send), t.cfg.MaxPayload))
		send = nil
	}
	// An error with a Status is the handler's answer; one without is a
	// failure it did not classify, logged unless the connection is closing.
	if err != nil && req.resp.Status == StatusOK {
		req.resp.Status = StatusHandlerError
		if sc.ctx.Err() == nil {
			t.logLimited(slog.LevelWarn, "transport: handler failed", "peer", sc.peer, "type", req.hdr.Type, "volume", req.hdr.Volume, "err", err)
		}
	}
	if len(req.resp.Volume) > MaxVolumeLen {
		t.logLimited(slog.LevelWarn, "transport: handler's response names a volume too long", "peer", sc.peer, "bytes", len(req.resp.Volume))
		req.resp = Header{Type: req.hdr.Type, Status: StatusHandlerError}
		send = nil
	}
	st := req.st
	st.wmu.Lock()
	writeFrame(st.s, codec, req.id, &req.resp, send) // fails only with the stream or connection
	st.wmu.Unlock()
	if t.release != nil && len(out) > 0 {
		t.release.ReleaseResponse(out)
	}
	sc.putRequest(req)
}
