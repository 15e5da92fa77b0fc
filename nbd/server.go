// Package nbd is blockd's NBD protocol server: the fixed-newstyle handshake
// (EXPORT_NAME, INFO, GO, LIST, ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT)
// and a concurrent transmission phase that turns wire requests into pipeline
// requests.
//
// Each connection owns four kinds of goroutines: the reader (the goroutine
// that called ServeConn/ServeKernel), a lazily grown set of workers that run
// the export's Handler, one writer that batches replies into few syscalls,
// and a bell worker that waits on a pipe (two more fds per connection).
// When nothing else is in flight the reader rings the bell instead of waking
// a worker through a channel, and a worker whose reply cannot join a batch
// writes it itself: at queue depth 1 Go would otherwise wake a second thread
// per request, which cost about as much CPU as the rest of the request. Requests live in a fixed set of per-connection slots with pooled
// payload buffers, so the steady state allocates nothing per request. A
// reply is only written after the Handler has returned, which is what makes
// NBD_FLAG_CAN_MULTI_CONN honest: all connections to an export share one
// Handler, so a FLUSH on any connection covers every write already replied
// to on all of them.
//
// READs offer the Handler to answer by reference (pipeline.FlagRef): a
// memory engine then lends its pages and the reply's writev copies them to
// the socket directly, one copy instead of two. The lent memory is live, so
// the reply carries every write completed before the READ was received and
// may carry any mix of old and new data of a write to the same range that
// is in flight at the same time. NBD lets a server process requests in
// flight in any order and promises no atomicity between overlapping ones
// (the copying path could already show a multi-chunk write half done); a
// client that needs an order waits for one reply before sending the
// overlapping request, as the kernel and libnbd users do.
//
// Choices where the spec leaves room:
//   - READ, TRIM and CACHE past the end of the export fail with EINVAL;
//     WRITE and WRITE_ZEROES past the end fail with ENOSPC (proto.md "Error
//     values": "SHOULD return ENOSPC if it receives a write request including
//     one or more sectors beyond the size of the device").
//   - A WRITE that is rejected (too large, read-only, out of range,
//     misaligned) has its payload read and discarded, then gets an error
//     reply; the connection stays up. A payload is at most 4 GiB, which the
//     client has to send anyway, and discarding uses no memory.
//   - Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE within the export are
//     successful no-ops that do not reach the Handler.
//   - Replies to commands other than READ and BLOCK_STATUS are simple
//     replies even when structured replies were negotiated (allowed: they
//     carry no payload). A failed structured READ gets one
//     NBD_REPLY_TYPE_ERROR chunk carrying the handler's message.
//   - Handler errors go on the wire as pipeline.Errno(err).
//   - The base:allocation meta context is offered. An export that
//     implements pipeline.Mapper has BLOCK_STATUS answered from its map
//     (holes as NBD_STATE_HOLE|NBD_STATE_ZERO, at most 128 extents per
//     reply, one under NBD_CMD_FLAG_REQ_ONE), by a worker; for any other
//     export the reader answers one extent with status 0 ("allocated"),
//     which the spec allows for any block. Errors of BLOCK_STATUS are
//     simple replies like those of the other non-READ commands.
//   - Back-pressure: a connection stops reading when MaxInFlight requests
//     are in flight or their payloads hold MaxBufferBytes.
//
// The reader does not run a request itself, even when idle: a pipeline
// stage may wait (QoS throttling, write coalescing) and must not stall the
// reading of the requests behind it. The exception is an export that
// implements Inliner and vouches for a request: the reader runs it and
// queues its reply, and writes the queued replies before anything that
// may block it (reading from the socket, waiting for a slot or for
// payload budget), so a reply never waits for a later request.
package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/pipeline"
)

// Export is one volume as the NBD server sees it (the daemon implements it).
type Export interface {
	pipeline.Handler
	// Size is read for every request, so a resize takes effect at once
	// (clients learn the new size when they reconnect).
	Size() int64
	ReadOnly() bool
	Description() string
	// MinBlockSize is 1 for byte-granular exports; above 1, offsets and
	// lengths must be multiples of it (a power of two).
	MinBlockSize() uint32
	PreferredBlockSize() uint32
}

// Inliner is implemented by exports that can tell that handling a request
// will wait for nothing but CPU and memory: no throttling, no device I/O,
// no timer, no lock held across any of those. The connection's reader
// then runs such a request itself and batches its reply with the others
// it reads in the same burst, saving a goroutine wakeup per request and
// keeping a write's payload in the cache of the core that received it.
// Inline is called for every request, so it must be cheap; a wrong true
// stalls the connection (not others) while the request waits.
type Inliner interface {
	Inline(r *pipeline.Request) bool
}

// WriteLender is implemented by Inliners whose storage can receive a
// write's payload in place: for a write that Inline vouched for,
// LendWrite returns the export's own memory for the range (or nil), the
// reader fills it from the socket, and Handle then finds the payload
// already there. Bytes land before the write completes and, if the client
// goes away mid-payload, a partial payload stays: both are allowed for a
// write that is not yet acknowledged.
type WriteLender interface {
	LendWrite(r *pipeline.Request) []byte
}

// Exports is the set of exports a Server offers.
type Exports interface {
	Export(name string) (Export, bool)
	// ExportNames lists the exports for NBD_OPT_LIST, sorted.
	ExportNames() []string
}

// Acquirer is implemented by Exports whose exports a client may use only
// once the server has taken them (a cluster volume's ownership, which one
// node holds at a time): NBD_OPT_GO and NBD_OPT_EXPORT_NAME call Acquire
// instead of Export, and a refusal's text reaches the client (with
// NBD_REP_ERR_UNKNOWN when NotFound says the export does not exist,
// NBD_REP_ERR_POLICY otherwise). Other options only look exports up.
type Acquirer interface {
	Acquire(name string) (Export, error)
	NotFound(err error) bool
}

// errUnknownExport is a lookup that found nothing.
var errUnknownExport = errors.New("unknown export")

// acquire takes export name for a client that is about to use it.
func (s *Server) acquire(name string) (Export, error) {
	if a, ok := s.exps.(Acquirer); ok {
		return a.Acquire(name)
	}
	if e, ok := s.exps.Export(name); ok {
		return e, nil
	}
	return nil, errUnknownExport
}

// Options tune a Server. The zero value is usable.
type Options struct {
	// MaxPayload bounds READ and WRITE lengths (advertised as the maximum
	// block size); default and recommended 32 MiB, at most 64 MiB.
	MaxPayload uint32
	// MaxInFlight bounds concurrently handled requests per connection;
	// default 128.
	MaxInFlight int
	// MaxBufferBytes bounds the payload bytes held by the requests in
	// flight on one connection (so 128 x 32 MiB writes cannot pin 4 GiB);
	// default 128 MiB. A single request of MaxPayload is always admitted.
	MaxBufferBytes int64
	// HandshakeTimeout bounds option haggling; default 30s.
	HandshakeTimeout time.Duration
	// Logger receives connection-level events (never per request);
	// default discards.
	Logger *slog.Logger
}

const (
	defaultMaxPayload     = 32 << 20
	defaultMaxInFlight    = 128
	defaultMaxBufferBytes = 128 << 20
	defaultHandshake      = 30 * time.Second
)

// Server serves Exports over NBD. Its methods are safe for concurrent use.
type Server struct {
	exps Exports
	opts Options
	log  *slog.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	shutting  atomic.Bool
	closed    bool
	wg        sync.WaitGroup // one per registered connection
}

// NewServer returns a Server for exps.
func NewServer(exps Exports, opts Options) *Server {
	if opts.MaxPayload == 0 {
		opts.MaxPayload = defaultMaxPayload
	}
	if opts.MaxPayload > 1<<maxClassShift {
		opts.MaxPayload = 1 << maxClassShift
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = defaultMaxInFlight
	}
	if opts.MaxBufferBytes <= 0 {
		opts.MaxBufferBytes = defaultMaxBufferBytes
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = defaultHandshake
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		exps:      exps,
		opts:      opts,
		log:       log,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}
}

// ErrServerClosed is returned by ServeConn/ServeKernel after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on ln (TCP or unix) and serves each on its own
// goroutine until Shutdown or Close, when it returns nil. It closes ln.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed || s.shutting.Load() {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.shutting.Load() || s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd accept: %w", err)
			}
			// Resource exhaustion (EMFILE...): back off instead of spinning.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("nbd accept", "err", err, "retry", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		c, err := s.register(nc)
		if err != nil {
			nc.Close()
			continue
		}
		// The connection goroutine is owned by the Server: it exits when
		// the client disconnects or Shutdown/Close ends the connection,
		// and Close waits for it through s.wg.
		go func() {
			defer s.unregister(c)
			if err := c.serve(context.Background(), nil); err != nil {
				s.log.Debug("nbd connection ended", "remote", nc.RemoteAddr(), "err", err)
			}
		}()
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// ServeConn runs the handshake and then the transmission phase on c until
// the client disconnects or the server shuts down. It closes c. It returns
// nil after a clean disconnect (NBD_CMD_DISC, NBD_OPT_ABORT, EOF) or a
// Shutdown, and ErrServerClosed when Close, Disconnect or the cancellation of
// ctx cut it short. ctx is also the parent of the Handler's context.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	cn, err := s.register(c)
	if err != nil {
		c.Close()
		return err
	}
	defer s.unregister(cn)
	return cn.serve(ctx, nil)
}

// ServeKernel runs only the transmission phase on c for export e: the Linux
// nbd driver is handed an already negotiated socket (one end of a
// socketpair) and uses simple replies only. It closes c.
func (s *Server) ServeKernel(ctx context.Context, c net.Conn, e Export) error {
	cn, err := s.register(c)
	if err != nil {
		c.Close()
		return err
	}
	defer s.unregister(cn)
	return cn.serve(ctx, e)
}

func (s *Server) register(nc net.Conn) (*conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.shutting.Load() {
		return nil, ErrServerClosed
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return c, nil
}

func (s *Server) unregister(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// NumConns returns the number of open connections (in handshake or
// transmission), for metrics.
func (s *Server) NumConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Disconnect closes every connection in transmission on export e (compared
// by identity) at once, as Close does for all; it returns how many it
// closed. Clients learn a new size or a deletion by reconnecting. Export
// values must be comparable (pointers are).
func (s *Server) Disconnect(e Export) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		if p := c.published.Load(); p != nil && *p == e {
			c.abort()
			n++
		}
	}
	return n
}

// Shutdown stops accepting connections and reading new requests, lets the
// requests in flight finish and their replies be written, then closes the
// connections. If ctx ends first it falls back to Close and returns
// ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutting.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.stopReading()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() { // exits when every connection goroutine has
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		return nil
	case <-ctx.Done():
		s.Close()
		<-done
		return ctx.Err()
	}
}

// Close closes listeners and connections at once, cancels the context of
// requests in flight and waits for every connection goroutine to exit.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.abort()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) shuttingDown() bool { return s.shutting.Load() }
