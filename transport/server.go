package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
)

// serverConn serves one incoming connection: a goroutine per stream reads
// requests; a request on a single-call stream is served by that goroutine,
// one on a multiplexed stream by a worker, so that its stream's next
// requests are read meanwhile. Workers are started as needed, up to
// Config.MaxInFlight, and live as long as the connection.
type serverConn struct {
	t       *Transport
	qc      *quic.Conn
	peer    string
	ctx     context.Context // ends with the connection
	work    chan *request   // hands requests to idle workers
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

type request struct {
	st   *serverStream
	id   uint64
	hdr  Header
	resp Header
	buf  *payloadBuf
}

var requests = sync.Pool{New: func() any { return new(request) }}

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
	sc := &serverConn{t: t, qc: qc, peer: name, ctx: qc.Context(), work: make(chan *request)}
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
		req := requests.Get().(*request)
		id, n, err := codec.readHeader(s, &req.hdr, sc.t.cfg.MaxPayload)
		if err == nil {
			req.buf = getPayload(n)
			if _, err = io.ReadFull(s, req.buf.b); err != nil {
				putPayload(req.buf)
				err = noEOF(err)
			}
		}
		if err != nil {
			*req = request{}
			requests.Put(req)
			sc.streamError(s, err)
			return
		}
		req.st, req.id = st, id
		if id != 0 {
			st.refs.Add(1)
			sc.dispatch(req)
			continue
		}
		// A single-call stream: answer, close, and expect its end.
		sc.serve(codec, req)
		var h Header
		if _, _, err := codec.readHeader(s, &h, 0); err != io.EOF {
			if err == nil {
				err = fmt.Errorf("second frame on a single-call stream: %w", errFrame)
			}
			sc.streamError(s, err)
		}
		return
	}
}

// streamError ends a stream whose reading failed: the caller closed it or
// the connection ended (nothing to say), or it sent a malformed frame
// (logged; the stream is reset and the connection lives on).
func (sc *serverConn) streamError(s *quic.Stream, err error) {
	if err == io.EOF {
		return
	}
	if errors.Is(err, errFrame) || errors.Is(err, errTooLarge) {
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
	sc.recycle(req)
}

func (sc *serverConn) recycle(req *request) {
	putPayload(req.buf)
	*req = request{}
	requests.Put(req)
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
		out, err = t.cfg.Handler.ServeMessage(sc.ctx, sc.peer, &req.hdr, req.buf.b, &req.resp)
	}
	send := out
	if len(send) > t.cfg.MaxPayload {
		err = errors.Join(err, fmt.Errorf("response payload of %d bytes, limit %d", len(send), t.cfg.MaxPayload))
		send = nil
	}
	if err != nil {
		if req.resp.Status == StatusOK {
			req.resp.Status = StatusHandlerError
		}
		t.logLimited(slog.LevelWarn, "transport: handler failed", "peer", sc.peer, "type", req.hdr.Type, "volume", req.hdr.Volume, "status", req.resp.Status, "err", err)
	}
	b, err := codec.encode(req.id, &req.resp, len(send))
	if err != nil {
		t.logLimited(slog.LevelWarn, "transport: handler's response header", "peer", sc.peer, "err", err)
		req.resp = Header{Type: req.hdr.Type, Status: StatusHandlerError}
		send = nil
		b, _ = codec.encode(req.id, &req.resp, 0)
	}
	st := req.st
	st.wmu.Lock()
	_, err = st.s.Write(b)
	if err == nil && len(send) > 0 {
		_, err = st.s.Write(send)
	}
	if err == nil && req.id == 0 {
		st.s.Close()
	}
	st.wmu.Unlock()
	if t.release != nil && len(out) > 0 {
		t.release.ReleaseResponse(out)
	}
	sc.recycle(req)
}
