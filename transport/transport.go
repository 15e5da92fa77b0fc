package transport

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
)

// Config configures a Transport. Node, CA, Cert and ResetKeySecret are
// required; Handler is required when Listen is set.
type Config struct {
	// Node is this node's name; Cert must carry it (CN or DNS SAN).
	Node string
	// Listen is the UDP address to serve on, e.g. ":10810". Empty: this
	// transport only dials, from an ephemeral port on every interface.
	Listen string
	// Peers maps node names to their UDP addresses ("host:port"). Calls go
	// only to these names, and only these names may call in (but see
	// AcceptAnyNode).
	Peers map[string]string
	// AcceptAnyNode lets any node with a certificate of the cluster CA call
	// in; the Handler sees the name its certificate carries.
	AcceptAnyNode bool
	// CA is the cluster CA: the only root for both directions.
	CA *x509.CertPool
	// Cert is this node's certificate and key, used as server and client.
	Cert tls.Certificate
	// ResetKeySecret derives the QUIC stateless reset key (with Node). Pass
	// something stable across restarts and secret, such as a hash of the
	// node's key file: a restarted node then resets its peers' stale
	// connections at their first packet instead of after the idle timeout.
	ResetKeySecret []byte
	// Handler serves incoming requests.
	Handler Handler
	// Logger receives connection-level events (never one per request);
	// default discards.
	Logger *slog.Logger

	// DialTimeout bounds a connection attempt (QUIC and TLS handshake
	// and a first ping); default 5s.
	DialTimeout time.Duration
	// IdleTimeout closes a connection that has heard nothing from its peer
	// for this long: how long a silent (dead, partitioned, stopped) peer
	// takes to show up as ErrConnLost. Default 15s.
	IdleTimeout time.Duration
	// KeepAlive is how often an idle connection sends a ping so that it
	// stays open and a dead peer is noticed; default IdleTimeout/5, at
	// most IdleTimeout/2.
	KeepAlive time.Duration
	// MaxPayload bounds request and response payloads; default 32 MiB, at
	// most 64 MiB.
	MaxPayload int
	// MaxInFlight bounds the requests one incoming connection has in its
	// Handler at once (and the streams it may open); default 256.
	MaxInFlight int
	// Streams is the number of multiplexed streams per outgoing
	// connection; default 4.
	Streams int
}

const (
	defaultDialTimeout = 5 * time.Second
	defaultIdleTimeout = 15 * time.Second
	defaultMaxPayload  = 32 << 20
	defaultMaxInFlight = 256
	defaultStreams     = 4
	// callsPerStream bounds the calls in flight on one multiplexed stream;
	// a call id carries the slot in its low 16 bits.
	callsPerStream = 64
	// callAttempts bounds how often Call tries a request that could not be
	// sent (a stream or connection found dead before any byte left).
	callAttempts = 3
)

// Handler serves the requests that peers send.
type Handler interface {
	// ServeMessage handles one request from peer (the name its certificate
	// proved) and fills resp, which starts zeroed; resp.Status != 0
	// reports a failure to the caller as a *StatusError. ctx ends when the
	// connection closes or the transport shuts down.
	//
	// payload is the request's payload, valid only until ServeMessage
	// returns. The returned respPayload (at most Config.MaxPayload bytes)
	// is written to the stream after ServeMessage returns, so it must stay
	// unchanged until then: it may alias payload (recycled only after the
	// response is written), be a fresh or constant slice, or be a buffer
	// the handler recycles in ReleaseResponse (see ResponseReleaser). A
	// non-nil error with Status 0 is sent as StatusHandlerError and logged.
	//
	// ServeMessage is called concurrently, up to Config.MaxInFlight calls
	// per connection; requests on one connection may complete out of order.
	ServeMessage(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) (respPayload []byte, err error)
}

// ResponseReleaser is implemented by a Handler that recycles its response
// buffers: the transport calls ReleaseResponse with every non-empty
// respPayload once it is written (or the write failed), exactly once.
type ResponseReleaser interface {
	ReleaseResponse(respPayload []byte)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error)

// ServeMessage calls f.
func (f HandlerFunc) ServeMessage(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
	return f(ctx, peer, req, payload, resp)
}

// Transport carries request/response calls between blockd nodes over QUIC
// with mutual TLS. One UDP socket serves both incoming connections and
// connections to peers. Its methods are safe for concurrent use.
type Transport struct {
	cfg     Config
	release ResponseReleaser // cfg.Handler, if it recycles responses
	log     *slog.Logger
	limit   logLimiter
	udp     *net.UDPConn
	qt      *quic.Transport
	ln      *quic.Listener
	dialCfg *quic.Config
	// peers maps node names to peers, replaced whole by SetPeer
	// (copy on write): a call looks its peer up without a lock.
	peers   atomic.Pointer[map[string]*peer]
	peersMu sync.Mutex // serializes SetPeer and RemovePeer

	ctx    context.Context // ends at Close
	cancel context.CancelFunc

	mu      sync.Mutex
	closed  bool
	conns   map[*quic.Conn]struct{} // every open connection, both directions
	watches map[*connWatch]struct{} // incoming connections not yet ended
	wg      sync.WaitGroup          // every goroutine the transport starts
}

// dialOnlyAddr is where the socket of a transport without Listen binds:
// an ephemeral port on every interface (the tests use loopback).
var dialOnlyAddr = ":0"

// peer is one configured node and the connection this node dialed to it.
type peer struct {
	name string
	addr string
	tls  *tls.Config

	mu   sync.Mutex
	cur  *clientConn
	dial *dialing // the connection attempt under way, if any
}

type dialing struct {
	done chan struct{}
	cc   *clientConn
	err  error
}

// New checks cfg, binds the UDP socket and, if cfg.Listen is set, starts
// serving. Peers are dialed on their first Call.
func New(cfg Config) (*Transport, error) {
	if err := cfg.check(); err != nil {
		return nil, fmt.Errorf("transport: %w", err)
	}
	key, err := hkdf.Key(sha256.New, cfg.ResetKeySecret, nil, "blockd transport stateless reset "+cfg.Node, 32)
	if err != nil {
		return nil, fmt.Errorf("transport: stateless reset key: %w", err)
	}
	var resetKey quic.StatelessResetKey
	copy(resetKey[:], key)

	bind := cfg.Listen
	if bind == "" {
		bind = dialOnlyAddr
	}
	ua, err := net.ResolveUDPAddr("udp", bind)
	if err != nil {
		return nil, fmt.Errorf("transport: listen address: %w", err)
	}
	udp, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("transport: %w", err)
	}
	t := &Transport{
		cfg:     cfg,
		log:     cfg.Logger,
		udp:     udp,
		conns:   make(map[*quic.Conn]struct{}),
		watches: make(map[*connWatch]struct{}),
	}
	t.release, _ = cfg.Handler.(ResponseReleaser)
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.qt = &quic.Transport{Conn: udp, StatelessResetKey: &resetKey, ConnContext: t.watchConn}
	peers := make(map[string]*peer, len(cfg.Peers))
	for name, addr := range cfg.Peers {
		peers[name] = &peer{name: name, addr: addr, tls: t.clientTLS(name)}
	}
	t.peers.Store(&peers)
	t.dialCfg = t.quicConfig()
	t.dialCfg.MaxIncomingStreams = -1 // peers call in on their own connection
	if cfg.Listen != "" {
		qc := t.quicConfig()
		qc.MaxIncomingStreams = int64(cfg.MaxInFlight + cfg.Streams)
		if t.ln, err = t.qt.Listen(t.serverTLS(), qc); err != nil {
			t.qt.Close()
			udp.Close()
			return nil, fmt.Errorf("transport: listen: %w", err)
		}
		// quic-go queues datagrams that are not QUIC only once someone has
		// asked for them: ask now, so that none arriving before the
		// goroutine below runs goes unlogged.
		done, cancel := context.WithCancel(context.Background())
		cancel()
		t.qt.ReadNonQUICPacket(done, nil)
		t.spawn(t.acceptLoop)
		t.spawn(t.dropNonQUIC)
	}
	return t, nil
}

func (c *Config) check() error {
	if c.Node == "" {
		return errors.New("config: no node name")
	}
	if c.CA == nil {
		return errors.New("config: no cluster CA")
	}
	if len(c.Cert.Certificate) == 0 || c.Cert.PrivateKey == nil {
		return errors.New("config: no certificate")
	}
	leaf := c.Cert.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(c.Cert.Certificate[0]); err != nil {
			return fmt.Errorf("config: certificate: %w", err)
		}
	}
	if !slices.Contains(certNames(leaf), c.Node) {
		return fmt.Errorf("config: certificate names %s, not node %q", quoteNames(leaf), c.Node)
	}
	if len(c.ResetKeySecret) == 0 {
		return errors.New("config: no ResetKeySecret")
	}
	if c.Listen != "" && c.Handler == nil {
		return errors.New("config: Listen without a Handler")
	}
	for name, addr := range c.Peers {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("config: peer %s: %w", name, err)
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = defaultDialTimeout
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = defaultIdleTimeout
	}
	if c.KeepAlive <= 0 {
		c.KeepAlive = c.IdleTimeout / 5
	}
	c.KeepAlive = min(c.KeepAlive, c.IdleTimeout/2)
	if c.MaxPayload <= 0 {
		c.MaxPayload = defaultMaxPayload
	}
	if c.MaxPayload > maxPayloadLimit {
		return fmt.Errorf("config: MaxPayload %d above %d", c.MaxPayload, maxPayloadLimit)
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = defaultMaxInFlight
	}
	if c.Streams <= 0 {
		c.Streams = defaultStreams
	}
	return nil
}

func (t *Transport) quicConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  t.cfg.DialTimeout,
		MaxIdleTimeout:        t.cfg.IdleTimeout,
		KeepAlivePeriod:       t.cfg.KeepAlive,
		MaxIncomingUniStreams: -1,
		Allow0RTT:             false, // writes must never be replayable
	}
}

// Addr returns the address of the UDP socket.
func (t *Transport) Addr() net.Addr { return t.udp.LocalAddr() }

// spawn runs f on a goroutine that Close waits for, unless the transport
// is closed (then it reports false and f does not run).
func (t *Transport) spawn(f func()) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.wg.Go(f)
	return true
}

// track registers an open connection for Close; false if closed already.
func (t *Transport) track(qc *quic.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.conns[qc] = struct{}{}
	return true
}

func (t *Transport) untrack(qc *quic.Conn) {
	t.mu.Lock()
	delete(t.conns, qc)
	t.mu.Unlock()
}

// Close closes every connection (peers see CONNECTION_CLOSE with
// codeShutdown), fails the calls under way with ErrClosed, and waits for
// every goroutine the transport started, Handler calls included: a Handler
// must return once its ctx ends.
func (t *Transport) Close() error {
	return t.close(true)
}

// close with graceful false drops the connections without telling the
// peers, as a crashed node would (for tests of a peer's restart).
func (t *Transport) close(graceful bool) error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	conns := make([]*quic.Conn, 0, len(t.conns))
	for qc := range t.conns {
		conns = append(conns, qc)
	}
	t.mu.Unlock()

	t.cancel()
	if t.ln != nil {
		t.ln.Close()
	}
	if graceful {
		var wg sync.WaitGroup
		for _, qc := range conns {
			wg.Go(func() { qc.CloseWithError(codeShutdown, "node shutting down") })
		}
		wg.Wait()
	}
	err := t.qt.Close()
	if e := t.udp.Close(); err == nil {
		err = e
	}
	// Connection attempts that never started running never end their
	// context; their watchers are stopped here instead.
	t.mu.Lock()
	for w := range t.watches {
		if w.stop() {
			delete(t.watches, w)
			t.wg.Done()
		}
	}
	t.mu.Unlock()
	t.wg.Wait()
	return err
}

func (t *Transport) isClosed() bool { return t.ctx.Err() != nil }

// peer returns the configured peer called name, or nil.
func (t *Transport) peer(name string) *peer { return (*t.peers.Load())[name] }

// SetPeer adds a peer or changes its address (a cluster learns its nodes
// from its store as they join). A changed address closes the connection
// to the old one; calls in flight on it fail as if it had dropped.
func (t *Transport) SetPeer(name, addr string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("transport: peer %s: %w", name, err)
	}
	if name == "" || name == t.cfg.Node {
		return fmt.Errorf("transport: %q cannot be a peer of node %s", name, t.cfg.Node)
	}
	t.peersMu.Lock()
	defer t.peersMu.Unlock()
	cur := *t.peers.Load()
	old := cur[name]
	if old != nil && old.addr == addr {
		return nil
	}
	next := make(map[string]*peer, len(cur)+1)
	for n, p := range cur {
		next[n] = p
	}
	next[name] = &peer{name: name, addr: addr, tls: t.clientTLS(name)}
	t.peers.Store(&next)
	if old != nil {
		t.dropPeer(old, "peer address changed")
	}
	return nil
}

// RemovePeer forgets a peer: calls to it fail with ErrUnknownPeer, and it
// may no longer call in (unless AcceptAnyNode).
func (t *Transport) RemovePeer(name string) {
	t.peersMu.Lock()
	defer t.peersMu.Unlock()
	cur := *t.peers.Load()
	old := cur[name]
	if old == nil {
		return
	}
	next := make(map[string]*peer, len(cur))
	for n, p := range cur {
		if n != name {
			next[n] = p
		}
	}
	t.peers.Store(&next)
	t.dropPeer(old, "peer removed")
}

// PeerNames returns the configured peers' names, sorted.
func (t *Transport) PeerNames() []string {
	var out []string
	for n := range *t.peers.Load() {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// dropPeer closes the connection this node dialed to a peer it no longer
// reaches at that address.
func (t *Transport) dropPeer(p *peer, why string) {
	p.mu.Lock()
	cc := p.cur
	p.cur = nil
	p.mu.Unlock()
	if cc != nil {
		cc.qc.CloseWithError(codeShutdown, why)
	}
}

// Call sends req and payload to peer and waits for the response: it fills
// resp and returns the response payload, read into respBuf when it fits
// (else into a new slice). payload must stay unchanged until Call returns.
//
// Call connects to peer if it has no connection yet or its connection
// died. A request that was certainly not sent (the stream or connection
// was found dead first) is tried again, up to three times in all; one that
// may have been delivered is never repeated. Errors: *StatusError when the
// peer answered with a Status; otherwise an *Error whose Kind says what
// failed (ErrUnreachable, ErrRefused, ErrTimeout, ErrConnLost, ErrProtocol,
// ErrClosed, ErrUnknownPeer, ErrTooLarge). Calls run concurrently.
func (t *Transport) Call(ctx context.Context, peer string, req *Header, payload []byte, resp *Header, respBuf []byte) ([]byte, error) {
	return t.CallTimeout(ctx, peer, 0, req, payload, resp, respBuf)
}

// CallTimeout is Call bounded by timeout as well as by ctx (0: by ctx
// only). Unlike a context.WithTimeout per call, it costs no allocation:
// the replication layer puts a deadline on every write it sends.
func (t *Transport) CallTimeout(ctx context.Context, peer string, timeout time.Duration, req *Header, payload []byte, resp *Header, respBuf []byte) ([]byte, error) {
	p := t.peer(peer)
	switch {
	case p == nil:
		return nil, &Error{Peer: peer, Kind: ErrUnknownPeer, Err: ErrUnknownPeer}
	case len(payload) > t.cfg.MaxPayload:
		return nil, &Error{Peer: peer, Kind: ErrTooLarge, Err: fmt.Errorf("%d bytes, limit %d", len(payload), t.cfg.MaxPayload)}
	case len(req.Volume) > MaxVolumeLen:
		return nil, &Error{Peer: peer, Kind: ErrTooLarge, Err: fmt.Errorf("volume name of %d bytes", len(req.Volume))}
	}
	var err error
	for range callAttempts {
		var cc *clientConn
		if cc, err = t.connect(ctx, timeout, p); err != nil {
			return nil, err
		}
		var out []byte
		out, err = cc.call(ctx, timeout, req, payload, resp, respBuf)
		if err == nil {
			if resp.Status != StatusOK {
				return out, &StatusError{Peer: peer, Type: resp.Type, Status: resp.Status}
			}
			return out, nil
		}
		if !errors.Is(err, errNotSent) || ctx.Err() != nil {
			break
		}
	}
	return nil, callError(peer, err, t.isClosed())
}

// Pending is a call started by Start: its request is on its way while the
// caller does other work; Wait collects the answer. A Pending is a value
// (no allocation) and must be waited for exactly once.
type Pending struct {
	t        *Transport
	ctx      context.Context
	peer     string
	timeout  time.Duration
	req      *Header
	payload  []byte
	resp     *Header
	respBuf  []byte
	ms       *muxStream
	c        *muxCall
	err      error // the start failed
	attempts int
}

// Start begins a call as CallTimeout does and returns at once, once its
// request is queued to go out (or the attempt failed: Wait reports why).
// payload, resp and respBuf belong to the call until Wait returns.
func (t *Transport) Start(ctx context.Context, peer string, timeout time.Duration, req *Header, payload []byte, resp *Header, respBuf []byte) Pending {
	pd := Pending{t: t, ctx: ctx, peer: peer, timeout: timeout, req: req, payload: payload, resp: resp, respBuf: respBuf}
	pd.start()
	return pd
}

func (pd *Pending) start() {
	t := pd.t
	pd.attempts++
	p := t.peer(pd.peer)
	switch {
	case p == nil:
		pd.err = &Error{Peer: pd.peer, Kind: ErrUnknownPeer, Err: ErrUnknownPeer}
		return
	case len(pd.payload) > t.cfg.MaxPayload:
		pd.err = &Error{Peer: pd.peer, Kind: ErrTooLarge, Err: fmt.Errorf("%d bytes, limit %d", len(pd.payload), t.cfg.MaxPayload)}
		return
	case len(pd.req.Volume) > MaxVolumeLen:
		pd.err = &Error{Peer: pd.peer, Kind: ErrTooLarge, Err: fmt.Errorf("volume name of %d bytes", len(pd.req.Volume))}
		return
	}
	cc, err := t.connect(pd.ctx, pd.timeout, p)
	if err != nil {
		pd.err = err
		return
	}
	ms, err := cc.pick()
	if err != nil {
		pd.err = err
		return
	}
	pd.ms = ms
	pd.c, pd.err = ms.start(pd.ctx, pd.timeout, pd.req, pd.payload, pd.resp, pd.respBuf)
}

// Wait waits for the answer of a started call, with Call's results and
// errors. A request that certainly never left is started again, up to
// three times in all.
func (pd *Pending) Wait() ([]byte, error) {
	for {
		var out []byte
		err := pd.err
		if err == nil {
			out, err = pd.ms.wait(pd.ctx, pd.c)
		}
		if err == nil {
			if pd.resp.Status != StatusOK {
				return out, &StatusError{Peer: pd.peer, Type: pd.resp.Type, Status: pd.resp.Status}
			}
			return out, nil
		}
		var te *Error
		if errors.As(err, &te) { // already classified (connect, limits)
			return nil, err
		}
		if !errors.Is(err, errNotSent) || pd.ctx.Err() != nil || pd.attempts >= callAttempts {
			return nil, callError(pd.peer, err, pd.t.isClosed())
		}
		pd.err, pd.ms, pd.c = nil, nil, nil
		pd.start()
	}
}

// Ping makes a round trip to peer that the peer's transport answers
// itself, and returns how long it took.
func (t *Transport) Ping(ctx context.Context, peer string) (time.Duration, error) {
	start := time.Now()
	var resp Header
	_, err := t.Call(ctx, peer, &Header{Type: TypePing}, nil, &resp, nil)
	return time.Since(start), err
}

// connect returns p's connection, dialing it if there is none or it died.
// Concurrent callers share one attempt, which runs on its own goroutine
// with DialTimeout, so a caller whose context ends leaves it running for
// the others.
func (t *Transport) connect(ctx context.Context, timeout time.Duration, p *peer) (*clientConn, error) {
	p.mu.Lock()
	if cc := p.cur; cc != nil && cc.qc.Context().Err() == nil {
		p.mu.Unlock()
		return cc, nil
	}
	d := p.dial
	if d == nil {
		d = &dialing{done: make(chan struct{})}
		if !t.spawn(func() { t.dial(p, d) }) {
			p.mu.Unlock()
			return nil, &Error{Peer: p.name, Kind: ErrClosed, Err: ErrClosed}
		}
		p.dial = d
	}
	p.mu.Unlock()
	var expired <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout) // only while a dial is under way
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-d.done:
		return d.cc, d.err
	case <-ctx.Done():
		return nil, &Error{Peer: p.name, Kind: ErrUnreachable, Err: fmt.Errorf("no connection yet: %w", context.Cause(ctx))}
	case <-expired:
		return nil, &Error{Peer: p.name, Kind: ErrUnreachable, Err: fmt.Errorf("no connection within %s", timeout)}
	}
}

func (t *Transport) dial(p *peer, d *dialing) {
	ctx, cancel := context.WithTimeout(t.ctx, t.cfg.DialTimeout)
	defer cancel()
	cc, err := t.dialPeer(ctx, p)
	if err != nil && errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("no answer within %v: %w", t.cfg.DialTimeout, err)
	}
	if err != nil {
		kind := kindOf(err, t.isClosed())
		if kind != ErrRefused && kind != ErrClosed {
			kind = ErrUnreachable
		}
		err = &Error{Peer: p.name, Kind: kind, Err: err}
		if kind != ErrClosed {
			t.logLimited(slog.LevelWarn, "transport: cannot connect", "peer", p.name, "addr", p.addr, "err", err)
		}
	}
	p.mu.Lock()
	p.dial = nil
	if err == nil {
		p.cur = cc
	}
	d.cc, d.err = cc, err
	p.mu.Unlock()
	close(d.done)
}

// dialPeer connects to p and makes sure with a ping that the peer accepted
// this node's certificate: in TLS 1.3 the client finishes its handshake
// before the server has checked the client certificate.
func (t *Transport) dialPeer(ctx context.Context, p *peer) (*clientConn, error) {
	ua, err := net.ResolveUDPAddr("udp", p.addr)
	if err != nil {
		return nil, err
	}
	qc, err := t.qt.Dial(ctx, ua, p.tls, t.dialCfg)
	if err != nil {
		return nil, err
	}
	if !t.track(qc) {
		qc.CloseWithError(codeShutdown, "node shutting down")
		return nil, ErrClosed
	}
	cc, err := t.newClientConn(p, qc)
	if err == nil {
		var resp Header
		_, err = cc.call(ctx, 0, &Header{Type: TypePing}, nil, &resp, nil)
	}
	if err == nil && !t.spawn(cc.watch) {
		err = ErrClosed
	}
	if err != nil {
		if qc.Context().Err() != nil {
			err = context.Cause(qc.Context()) // say why the connection died, not what noticed
		}
		qc.CloseWithError(codeShutdown, "connection attempt failed")
		t.untrack(qc)
		return nil, err
	}
	t.log.Info("transport: connected", "peer", p.name, "addr", qc.RemoteAddr().String())
	return cc, nil
}

// logLimiter lets through at most logBurst messages a second, so that a
// flood of bad handshakes or datagrams cannot flood the log.
type logLimiter struct {
	mu      sync.Mutex
	window  time.Time
	n       int
	dropped int
}

const logBurst = 10

func (t *Transport) logLimited(level slog.Level, msg string, args ...any) {
	l := &t.limit
	l.mu.Lock()
	now := time.Now()
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	l.n++
	ok := l.n <= logBurst
	dropped := l.dropped
	if ok {
		l.dropped = 0
	} else {
		l.dropped++
	}
	l.mu.Unlock()
	if !ok {
		return
	}
	if dropped > 0 {
		args = append(args, "suppressed", dropped)
	}
	t.log.Log(context.Background(), level, msg, args...)
}

// connWatch follows one incoming connection attempt from its first packet:
// if it ends before the transport accepted it, the handshake failed and
// the reason is logged; if it ends after, the connection closed.
type connWatch struct {
	remote   net.Addr
	accepted atomic.Bool
	peer     atomic.Pointer[string]
	stop     func() bool
}

type watchKey struct{}

// watchConn is quic.Transport.ConnContext: it runs for every connection
// attempt before its handshake.
func (t *Transport) watchConn(ctx context.Context, info *quic.ClientInfo) (context.Context, error) {
	w := &connWatch{remote: info.RemoteAddr}
	ctx = context.WithValue(ctx, watchKey{}, w)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	t.wg.Add(1)
	t.watches[w] = struct{}{}
	w.stop = context.AfterFunc(ctx, func() {
		defer t.wg.Done()
		t.mu.Lock()
		delete(t.watches, w)
		t.mu.Unlock()
		cause := context.Cause(ctx)
		switch {
		case w.accepted.Load():
			t.log.Info("transport: peer connection closed", "peer", *w.peer.Load(), "addr", w.remote.String(), "reason", cause)
		case !t.isClosed():
			t.logLimited(slog.LevelWarn, "transport: refused connection", "addr", w.remote.String(), "reason", cause)
		}
	})
	return ctx, nil
}

func (t *Transport) dropNonQUIC() {
	buf := make([]byte, 64)
	for {
		n, addr, err := t.qt.ReadNonQUICPacket(t.ctx, buf)
		if err != nil {
			return
		}
		t.logLimited(slog.LevelWarn, "transport: dropped a datagram that is not QUIC", "addr", addr.String(), "first_bytes", fmt.Sprintf("%x", buf[:min(n, 8)]))
	}
}
