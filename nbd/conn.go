package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/blockd/blockd/pipeline"
)

const (
	readBufSize  = 128 << 10 // bufio for request headers and small payloads
	writeBufSize = 256 << 10 // reply headers and small payloads of one batch
	// Payloads of at least iovMin bytes are handed to writev as they are;
	// smaller ones are copied next to their header.
	iovMin = 2048
	// A batch is flushed early when it holds this many iovecs or bytes, so
	// one burst of huge reads does not delay every other reply.
	maxBatchIov   = 512
	maxBatchBytes = 4 << 20
	// maxExtents bounds the extents of one BLOCK_STATUS reply; a client
	// asks again from where the reply ended.
	maxExtents = 128
)

// slot is one request in flight. A connection has MaxInFlight of them; they
// cycle free -> reader -> worker -> reply path -> free, owned by one
// goroutine at a time, handed over through channels or the write lock.
type slot struct {
	req    pipeline.Request
	cookie uint64
	cmd    uint16
	cmdFl  uint16
	errno  uint32 // wire error; 0 = success
	err    error  // handler error, for the structured error message
	buf    *pbuf
	charge int64    // payload bytes counted in conn.bufBytes
	refs   [][]byte // room for a read answered by reference (req.Ref)
	// BLOCK_STATUS: room for the extents (allocated on first use) and the
	// answer, a prefix of it; ext is nil when the export cannot map.
	extRoom []pipeline.Extent
	ext     []pipeline.Extent
}

type conn struct {
	srv *Server
	nc  net.Conn
	sys *sysConn // nc's socket, read and written without entering the scheduler; nil if nc has none
	br  *bufio.Reader

	structured  bool   // negotiated NBD_OPT_STRUCTURED_REPLY
	metaAlloc   bool   // base:allocation selected (for metaName)
	metaName    string // export the meta context selection applies to
	exp         Export
	inl         Inliner                // exp, if it implements Inliner
	lender      WriteLender            // exp, if an Inliner that lends memory
	mapper      pipeline.Mapper        // exp, if it tells holes from data (BLOCK_STATUS)
	flushOnWait bool                   // c.sys flushes inline replies before a read waits
	published   atomic.Pointer[Export] // exp, for Server.Disconnect
	minBS       uint32
	maxPayload  uint32

	ctx      context.Context
	cancelMu sync.Mutex // guards cancel: abort runs on another goroutine
	cancel   context.CancelFunc

	slots   []slot
	free    freeList     // slots not in flight
	work    chan *slot   // reader -> idle worker (unbuffered)
	replies chan *slot   // reader/workers -> writer
	nwork   int          // workers started; touched only by the reader
	busy    atomic.Int32 // requests dispatched whose Handler has not returned

	// The doorbell: a pipe the bell worker waits on in the netpoller.
	// When the reader is about to wait for the next request, it rings the
	// bell instead of waking a parked worker through a channel: Go wakes
	// a second thread for every goroutine it makes runnable while a P is
	// idle, which at queue depth 1 cost about as much CPU as the rest of
	// the request; the pipe is instead found by the reader's own thread
	// when it polls the network on going idle. nil if os.Pipe failed.
	bellR, bellW *os.File
	bellq        chan *slot  // the rung request (capacity 1)
	bellIdle     atomic.Bool // the bell worker waits; a ring takes it
	bellByte     [1]byte

	bufBytes  atomic.Int64  // payload bytes of requests in flight
	bytesFree chan struct{} // signalled when bufBytes drops
	workers   sync.WaitGroup

	stopping atomic.Bool // Shutdown: stop reading new requests
	aborted  atomic.Bool // Close: tear down now

	// Writer state, guarded by wmu: held by the writer goroutine while it
	// encodes a batch, or by a worker that writes its own reply.
	wmu     sync.Mutex
	wbuf    []byte
	segOff  int // start of wbuf not yet covered by iov
	iov     [][]byte
	bufs    net.Buffers
	held    []*slot // slots whose payload is referenced by iov
	pending int     // bytes in the current batch
	wfailed bool
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:        s,
		nc:         nc,
		sys:        newSysConn(nc),
		maxPayload: s.opts.MaxPayload,
	}
	if c.sys != nil {
		c.br = bufio.NewReaderSize(c.sys, readBufSize)
	} else {
		c.br = bufio.NewReaderSize(nc, readBufSize)
	}
	return c
}

// stopReading makes the reader stop at the next request boundary (or now,
// if it is waiting for one); requests in flight complete normally.
func (c *conn) stopReading() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
}

// abort closes the connection at once and cancels requests in flight.
func (c *conn) abort() {
	c.aborted.Store(true)
	c.stopping.Store(true)
	c.nc.Close()
	c.cancelMu.Lock()
	if c.cancel != nil {
		c.cancel()
	}
	c.cancelMu.Unlock()
}

// serve runs the connection to its end and closes it. With e != nil the
// handshake is skipped (kernel socket).
func (c *conn) serve(ctx context.Context, e Export) error {
	defer c.nc.Close()
	if c.stopping.Load() {
		return ErrServerClosed
	}
	// Cancelling ctx ends the connection like Close does (the daemon uses
	// this to drop the clients of a deleted volume).
	stop := context.AfterFunc(ctx, c.abort)
	defer stop()
	if e == nil {
		var err error
		e, err = c.handshake()
		if err != nil {
			if errors.Is(err, errAbort) || errors.Is(err, io.EOF) {
				return nil
			}
			if c.stopping.Load() {
				return ErrServerClosed
			}
			return err
		}
	}
	c.exp = e
	c.inl, _ = e.(Inliner)
	if c.inl != nil && c.sys != nil {
		// The socket reads themselves flush the batch when they would
		// wait (sysConn.beforeWait), so the reader need not guess from
		// its buffer.
		c.sys.beforeWait = c.flushInline
		c.flushOnWait = true
	}
	if c.inl != nil {
		c.lender, _ = e.(WriteLender)
	}
	c.mapper, _ = e.(pipeline.Mapper)
	c.published.Store(&e)
	c.minBS = max(e.MinBlockSize(), 1)
	return c.transmit(ctx)
}

// transmit runs the transmission phase. It owns the workers and the writer
// and returns only after all of them have exited.
func (c *conn) transmit(parent context.Context) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	c.cancelMu.Lock()
	c.ctx, c.cancel = ctx, cancel
	c.cancelMu.Unlock()
	if c.aborted.Load() { // Close raced with the handshake
		return ErrServerClosed
	}
	n := c.srv.opts.MaxInFlight
	c.slots = make([]slot, n)
	c.free.init(c.slots)
	c.work = make(chan *slot)
	c.bytesFree = make(chan struct{}, 1)
	c.replies = make(chan *slot, n)
	c.wbuf = make([]byte, 0, writeBufSize)
	c.iov = make([][]byte, 0, 2*maxBatchIov+2)
	c.held = make([]*slot, 0, n)

	if r, w, err := os.Pipe(); err == nil {
		c.bellR, c.bellW = r, w
		c.bellq = make(chan *slot, 1)
		c.bellIdle.Store(true)
		c.workers.Add(1)
		go c.bellWorker() // exits when transmit closes the bell
	}

	writerDone := make(chan struct{})
	go func() { // the writer; exits when replies is closed and drained
		defer close(writerDone)
		c.writeLoop()
	}()

	rerr := c.readLoop()

	// Wait for every slot to come home: then no request is in flight and
	// every reply has been written (or dropped, if the socket failed).
	for range n {
		c.free.get()
	}
	close(c.work)
	if c.bellR != nil {
		c.bellR.Close()
		c.bellW.Close()
	}
	c.workers.Wait()
	close(c.replies)
	<-writerDone
	kept := 0
	for i := range c.slots {
		if b := c.slots[i].buf; b != nil {
			putBuf(b)
			c.slots[i].buf = nil
			kept++
		}
	}
	if testHookKept != nil {
		testHookKept(kept)
	}

	switch {
	case c.aborted.Load():
		// Close, Disconnect or the caller's context cut it short, even
		// if the reader saw the closed socket as an end of file first.
		return ErrServerClosed
	case rerr == nil, errors.Is(rerr, io.EOF), c.stopping.Load():
		return nil
	}
	return rerr
}

// readLoop reads requests until DISC, EOF, a protocol violation or
// shutdown. It never holds a slot when it returns.
func (c *conn) readLoop() error {
	// Replies of requests run inline wait in the batch until the reader
	// would block; on the way out they go now (transmit waits for their
	// slots).
	defer c.flushInline()
	for {
		if c.stopping.Load() {
			return nil
		}
		if c.br.Buffered() < requestSize && !c.flushOnWait {
			c.flushInline() // Peek may wait for the client
		}
		hdr, err := c.br.Peek(requestSize)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && c.stopping.Load() {
				return nil
			}
			if errors.Is(err, io.EOF) && len(hdr) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if binary.BigEndian.Uint32(hdr[0:]) != requestMagic {
			return fmt.Errorf("nbd request: %w %#x", errBadMagic, binary.BigEndian.Uint32(hdr[0:]))
		}
		cmdFl := binary.BigEndian.Uint16(hdr[4:])
		cmd := binary.BigEndian.Uint16(hdr[6:])
		cookie := binary.BigEndian.Uint64(hdr[8:])
		off := binary.BigEndian.Uint64(hdr[16:])
		length := binary.BigEndian.Uint32(hdr[24:])
		c.br.Discard(requestSize)

		if cmd == cmdDisc {
			return nil
		}
		if c.free.empty() {
			c.flushInline() // its slots come home
		}
		s := c.free.get()
		s.cookie, s.cmd, s.cmdFl = cookie, cmd, cmdFl
		s.err = nil
		s.req = pipeline.Request{Offset: int64(off), Length: length}

		errno := c.check(s, off, length)
		inline := false
		if cmd == cmdWrite {
			if c.br.Buffered() < int(length) && !c.flushOnWait {
				c.flushInline() // the payload may keep us waiting
			}
			if errno != 0 {
				// Consume the payload so the stream stays in sync.
				if err := c.readPayload(nil, int(length)); err != nil {
					c.release(s)
					return fmt.Errorf("nbd write payload: %w", err)
				}
			} else if length > 0 {
				// Decided before the payload arrives, so that a vouched
				// write can be received straight into the export.
				inline = c.inl != nil && c.inl.Inline(&s.req)
				if inline && c.lender != nil {
					s.req.Buf = c.lender.LendWrite(&s.req)
				}
				if s.req.Buf == nil {
					c.attachBuf(s, length)
				}
				if err := c.readPayload(s.req.Buf, 0); err != nil {
					c.release(s)
					return fmt.Errorf("nbd write payload: %w", err)
				}
			}
		}
		if errno != 0 || (length == 0 && cmd != cmdFlush) || (cmd == cmdBlockStatus && c.mapper == nil) {
			s.errno = errno
			c.replies <- s
			continue
		}
		if cmd == cmdBlockStatus {
			// Maps may wait for the filesystem (lseek takes the inode
			// lock): a worker runs them.
			c.busy.Add(1)
			c.dispatch(s)
			continue
		}
		if cmd == cmdRead {
			c.attachBuf(s, length)
		}
		if inline || (cmd != cmdWrite && c.inl != nil && c.inl.Inline(&s.req)) {
			c.runInline(s)
			continue
		}
		if c.busy.Add(1) == 1 && c.br.Buffered() < requestSize && c.bellIdle.CompareAndSwap(true, false) {
			// Nothing else in flight and the reader is about to wait
			// for data (queue depth 1): the bell worker runs this
			// request on this thread once the reader parks. With more
			// in flight the Ps are busy and a channel is cheaper than
			// the pipe's two syscalls.
			c.bellq <- s
			if _, err := c.bellW.Write(c.bellByte[:]); err != nil {
				// Cannot happen with a live pipe; do not strand s.
				<-c.bellq
				c.dispatch(s)
			}
			continue
		}
		c.dispatch(s)
	}
}

// testHookKept, set only by tests before any server starts, is told how
// many slots kept a buffer when a connection ended.
var testHookKept func(int)

// testHookPayload, set only by tests before any server starts, runs when
// the reader starts on a write payload.
var testHookPayload func()

// payloadGrace is how long a write payload may keep arriving after
// Shutdown stopped the reader in the middle of it.
const payloadGrace = 5 * time.Second

// readPayload fills p, or with p nil discards n bytes. When Shutdown's
// deadline strikes in the middle of a payload, the request was already
// partly received, so the deadline is extended to let it complete and be
// answered.
func (c *conn) readPayload(p []byte, n int) error {
	if testHookPayload != nil {
		testHookPayload()
	}
	for {
		var err error
		if p != nil {
			var k int
			k, err = io.ReadFull(c.br, p)
			p = p[k:]
		} else {
			var k int
			k, err = c.br.Discard(n)
			n -= k
		}
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) || !c.stopping.Load() || c.aborted.Load() {
			return err
		}
		c.nc.SetReadDeadline(time.Now().Add(payloadGrace))
	}
}

// check validates a request and fills s.req; it returns a wire error or 0.
func (c *conn) check(s *slot, off uint64, length uint32) uint32 {
	e := c.exp
	size := uint64(max(e.Size(), 0))
	inRange := off <= size && uint64(length) <= size-off
	aligned := c.minBS == 1 || (off%uint64(c.minBS) == 0 && length%c.minBS == 0)
	fl := s.cmdFl
	if fl&cmdFlagFUA != 0 {
		s.req.Flags |= pipeline.FlagFUA
	}
	switch s.cmd {
	case cmdRead:
		s.req.Op = pipeline.OpRead
		// Offer to take the data by reference: a memory engine then
		// lends its pages and writev copies them to the socket once,
		// instead of a copy into the payload buffer first. Room for one
		// slice per MiB (the memory engine's chunk) and the two ends.
		if s.refs == nil {
			s.refs = make([][]byte, 0, int(c.maxPayload>>20)+2)
		}
		s.req.Flags |= pipeline.FlagRef
		s.req.Ref = s.refs[:0]
		allowed := uint16(cmdFlagFUA)
		if c.structured {
			allowed |= cmdFlagDF
		}
		switch {
		case fl&^allowed != 0:
			return errInval
		case length > c.maxPayload:
			return errOverflow
		case !inRange, !aligned:
			return errInval
		}
	case cmdWrite:
		s.req.Op = pipeline.OpWrite
		switch {
		case fl&^cmdFlagFUA != 0:
			return errInval
		case e.ReadOnly():
			return errPerm
		case length > c.maxPayload:
			return errOverflow
		case !inRange:
			return errNoSpc
		case !aligned:
			return errInval
		}
	case cmdFlush:
		s.req.Op = pipeline.OpFlush
		s.req.Offset, s.req.Length = 0, 0
		if fl&^cmdFlagFUA != 0 {
			return errInval
		}
	case cmdTrim:
		s.req.Op = pipeline.OpTrim
		switch {
		case fl&^cmdFlagFUA != 0:
			return errInval
		case e.ReadOnly():
			return errPerm
		case !inRange, !aligned:
			return errInval
		}
	case cmdWriteZeroes:
		s.req.Op = pipeline.OpWriteZeroes
		if fl&cmdFlagNoHole != 0 {
			s.req.Flags |= pipeline.FlagNoHole
		}
		switch {
		case fl&^(cmdFlagFUA|cmdFlagNoHole) != 0:
			return errInval
		case e.ReadOnly():
			return errPerm
		case !inRange:
			return errNoSpc
		case !aligned:
			return errInval
		}
	case cmdCache:
		s.req.Op = pipeline.OpCache
		switch {
		case fl&^cmdFlagFUA != 0:
			return errInval
		case !inRange, !aligned:
			return errInval
		}
	case cmdBlockStatus:
		// A worker asks the export's Mapper; an export without one gets
		// the whole range as "allocated, contents unknown" (status 0)
		// from the reader, which the spec allows for any block.
		switch {
		case !c.metaAlloc, fl&^(cmdFlagFUA|cmdFlagReqOne) != 0, length == 0:
			return errInval
		case !inRange, !aligned:
			return errInval
		}
	default:
		return errInval
	}
	return 0
}

// attachBuf gives s a payload buffer of at least length bytes, first
// waiting while the connection's payload budget is spent (the requests
// holding it finish without the reader's help).
func (c *conn) attachBuf(s *slot, length uint32) {
	need := int64(length)
	for {
		held := c.bufBytes.Load()
		if held == 0 || held+need <= c.srv.opts.MaxBufferBytes {
			break
		}
		c.flushInline() // inline replies may hold buffers
		<-c.bytesFree
	}
	c.bufBytes.Add(need)
	s.charge = need
	cl := classOf(length)
	if s.buf != nil && s.buf.class != cl {
		putBuf(s.buf)
		s.buf = nil
	}
	if s.buf == nil {
		s.buf = getBuf(cl)
	}
	s.req.Buf = s.buf.b[:length]
}

// dispatch hands s to an idle worker, starting one if none is idle and
// fewer than MaxInFlight exist. Workers are owned by the connection: they
// exit when transmit closes c.work after every slot came home.
func (c *conn) dispatch(s *slot) {
	select {
	case c.work <- s:
		return
	default:
	}
	if c.nwork < len(c.slots) {
		c.nwork++
		c.workers.Add(1)
		go c.worker(s)
		return
	}
	c.work <- s
}

func (c *conn) worker(s *slot) {
	defer c.workers.Done()
	for {
		c.exec(s)
		c.complete(s)
		var ok bool
		if s, ok = <-c.work; !ok {
			return
		}
	}
}

// runInline runs s on the reader (the export promised it cannot wait)
// and adds its reply to the batch, which goes out when the reader would
// block or the batch is full: a burst of requests costs one writev and
// no goroutine wakeup.
func (c *conn) runInline(s *slot) {
	c.exec(s)
	c.wmu.Lock()
	c.encode(s)
	if len(c.iov) >= maxBatchIov || c.pending >= maxBatchBytes || len(c.wbuf) > writeBufSize-4096 {
		c.flush()
	}
	c.wmu.Unlock()
}

// flushInline writes the replies waiting in the batch. The reader calls it
// before anything that may block: nothing else would send the replies of
// requests it ran inline.
func (c *conn) flushInline() {
	if c.inl == nil {
		return
	}
	c.wmu.Lock()
	if len(c.wbuf) > 0 || len(c.iov) > 0 {
		c.flush()
	}
	c.wmu.Unlock()
}

// bellWorker runs the requests rung on the doorbell, one at a time (the
// reader rings only while bellIdle, so a Handler that blocks here makes the
// reader dispatch to the other workers). It exits when the bell is closed.
func (c *conn) bellWorker() {
	defer c.workers.Done()
	var b [1]byte
	for {
		if _, err := c.bellR.Read(b[:]); err != nil {
			return
		}
		s := <-c.bellq
		c.exec(s)
		c.complete(s)
		c.bellIdle.Store(true)
	}
}

// complete queues the reply of an executed request. When no other request
// is executing and no reply is queued, no batch can form, so the worker
// writes the reply itself instead of waking the writer.
func (c *conn) complete(s *slot) {
	if c.busy.Add(-1) == 0 && len(c.replies) == 0 && c.wmu.TryLock() {
		c.encode(s)
		c.flush()
		c.wmu.Unlock()
		return
	}
	c.replies <- s
}

// exec runs the request on the export; the reply is sent only afterwards.
func (c *conn) exec(s *slot) {
	if s.cmd == cmdBlockStatus {
		c.mapExtents(s)
		return
	}
	err := c.exp.Handle(c.ctx, &s.req)
	if err != nil {
		s.err = err
		s.errno = uint32(wireErrno(err))
		return
	}
	s.errno = 0
}

// mapExtents answers a BLOCK_STATUS from the export's Mapper: at most
// maxExtents extents (one with NBD_CMD_FLAG_REQ_ONE), covering a prefix of
// the range.
func (c *conn) mapExtents(s *slot) {
	if s.extRoom == nil {
		s.extRoom = make([]pipeline.Extent, 0, maxExtents)
	}
	dst := s.extRoom[:0]
	if s.cmdFl&cmdFlagReqOne != 0 {
		dst = dst[:0:1]
	}
	ext, err := c.mapper.Map(dst, s.req.Offset, int64(s.req.Length))
	if err == nil {
		// The wire wants at least one non-empty extent and none past
		// the request; a Mapper that breaks its contract is a bug, not
		// a reason to send a malformed reply.
		left := int64(s.req.Length)
		for i, x := range ext {
			if x.Length <= 0 || x.Length > left {
				err = fmt.Errorf("nbd: block status: export mapped extent %d as %+v with %d bytes of the request left", i, x, left)
				break
			}
			left -= x.Length
		}
		if len(ext) == 0 && err == nil {
			err = fmt.Errorf("nbd: block status: export mapped no extent")
		}
	}
	if err != nil {
		s.err = err
		s.errno = uint32(wireErrno(err))
		return
	}
	s.ext = ext
	s.errno = 0
}

// wireErrno maps a handler error to its wire value. pipeline.Errno only
// yields values the NBD spec lists (EPERM, EIO, ENOMEM, EINVAL, ENOSPC,
// EOVERFLOW, ENOTSUP, ESHUTDOWN), EIO for anything unknown.
func wireErrno(err error) syscall.Errno { return pipeline.Errno(err) }

// release returns s to the free list; large buffers go back to the pool.
func (c *conn) release(s *slot) {
	if s.charge != 0 {
		c.bufBytes.Add(-s.charge)
		s.charge = 0
		select {
		case c.bytesFree <- struct{}{}:
		default:
		}
	}
	if s.buf != nil && s.buf.class > keepClass {
		putBuf(s.buf)
		s.buf = nil
	}
	s.req.Buf = nil
	clear(s.req.Ref) // do not pin engine memory (a trimmed chunk) while idle
	s.req.Ref = nil
	s.ext = nil
	s.err = nil
	c.free.put(s)
}

// freeList holds the slots not in flight, most recently freed first: a
// connection at queue depth d cycles through d slots and their kept
// buffers, not through all MaxInFlight of them, so its memory follows the
// depth it runs at (a FIFO would give every slot a buffer in turn: 16 MiB
// per connection of 128 KiB reads at queue depth 1).
type freeList struct {
	sem   chan struct{} // one token per slot on the stack
	mu    sync.Mutex
	stack []*slot
}

func (f *freeList) init(slots []slot) {
	f.sem = make(chan struct{}, len(slots))
	f.stack = make([]*slot, 0, len(slots))
	for i := len(slots) - 1; i >= 0; i-- {
		f.put(&slots[i])
	}
}

func (f *freeList) empty() bool { return len(f.sem) == 0 }

// get takes the most recently freed slot, waiting for one.
func (f *freeList) get() *slot {
	<-f.sem
	f.mu.Lock()
	s := f.stack[len(f.stack)-1]
	f.stack = f.stack[:len(f.stack)-1]
	f.mu.Unlock()
	return s
}

func (f *freeList) put(s *slot) {
	f.mu.Lock()
	f.stack = append(f.stack, s)
	f.mu.Unlock()
	f.sem <- struct{}{}
}

// writeLoop encodes replies into batches and flushes a batch when no more
// replies are queued, so a burst of completions costs one writev.
func (c *conn) writeLoop() {
	for s := range c.replies {
		// Holding wmu across the batch (and the Gosched) makes finishing
		// workers queue their replies here instead of writing alone.
		c.wmu.Lock()
		c.encode(s)
		if len(c.replies) == 0 && c.busy.Load() > 0 {
			// Requests are executing right now: give their workers a
			// chance to finish so their replies share this write.
			runtime.Gosched()
		}
		if len(c.replies) == 0 || len(c.iov) >= maxBatchIov || c.pending >= maxBatchBytes ||
			len(c.wbuf) > writeBufSize-4096 {
			c.flush()
		}
		c.wmu.Unlock()
	}
	c.wmu.Lock()
	c.flush()
	c.wmu.Unlock()
}

func (c *conn) encode(s *slot) {
	if c.wfailed {
		c.release(s)
		return
	}
	if s.cmd == cmdRead && c.structured {
		c.encodeStructuredRead(s)
		return
	}
	if s.cmd == cmdBlockStatus && s.errno == 0 {
		n := max(len(s.ext), 1) // no Mapper: one extent, all allocated
		start := len(c.wbuf)
		b := binary.BigEndian.AppendUint32(c.wbuf, structuredMagic)
		b = binary.BigEndian.AppendUint16(b, replyFlagDone)
		b = binary.BigEndian.AppendUint16(b, replyTypeBlockStatus)
		b = binary.BigEndian.AppendUint64(b, s.cookie)
		b = binary.BigEndian.AppendUint32(b, uint32(4+8*n))
		b = binary.BigEndian.AppendUint32(b, metaIDBaseAllocation)
		if s.ext == nil {
			b = binary.BigEndian.AppendUint32(b, s.req.Length)
			b = binary.BigEndian.AppendUint32(b, 0)
		}
		for _, x := range s.ext {
			var flags uint32
			if x.Hole {
				flags = stateHole | stateZero
			}
			b = binary.BigEndian.AppendUint32(b, uint32(x.Length))
			b = binary.BigEndian.AppendUint32(b, flags)
		}
		c.wbuf = b
		c.pending += len(b) - start
		c.release(s)
		return
	}
	var h [simpleReplySize]byte
	binary.BigEndian.PutUint32(h[0:], simpleMagic)
	binary.BigEndian.PutUint32(h[4:], s.errno)
	binary.BigEndian.PutUint64(h[8:], s.cookie)
	c.wbuf = append(c.wbuf, h[:]...)
	c.pending += simpleReplySize
	if s.cmd == cmdRead && s.errno == 0 && s.req.Length > 0 {
		c.addPayload(s)
		return
	}
	c.release(s)
}

func (c *conn) encodeStructuredRead(s *slot) {
	var h [structHeaderSize + 8]byte
	binary.BigEndian.PutUint32(h[0:], structuredMagic)
	binary.BigEndian.PutUint16(h[4:], replyFlagDone)
	binary.BigEndian.PutUint64(h[8:], s.cookie)
	switch {
	case s.errno != 0:
		// The wire carries the errno's own text, not the backend's error:
		// that names backing files and paths, which are no business of a
		// network client.
		msg := syscall.Errno(s.errno).Error()
		if len(msg) > maxErrMsgLen {
			msg = msg[:maxErrMsgLen]
		}
		binary.BigEndian.PutUint16(h[6:], replyTypeError)
		binary.BigEndian.PutUint32(h[16:], uint32(6+len(msg)))
		binary.BigEndian.PutUint32(h[20:], s.errno)
		binary.BigEndian.PutUint16(h[24:], uint16(len(msg)))
		c.wbuf = append(c.wbuf, h[:26]...)
		c.wbuf = append(c.wbuf, msg...)
		c.pending += 26 + len(msg)
		c.release(s)
	case s.req.Length == 0:
		binary.BigEndian.PutUint16(h[6:], replyTypeNone)
		c.wbuf = append(c.wbuf, h[:structHeaderSize]...)
		c.pending += structHeaderSize
		c.release(s)
	default:
		binary.BigEndian.PutUint16(h[6:], replyTypeOffsetData)
		binary.BigEndian.PutUint32(h[16:], 8+s.req.Length)
		binary.BigEndian.PutUint64(h[20:], uint64(s.req.Offset))
		c.wbuf = append(c.wbuf, h[:]...)
		c.pending += len(h)
		c.addPayload(s)
	}
}

// addPayload appends the read data of s to the batch: the engine's own
// memory when it lent it (req.Ref), else the payload buffer. Large pieces
// go by reference (writev, no copy), small ones are copied next to their
// header. Lent memory is copied out by the writev that sends the reply, so
// the reply still carries every write that completed before the read was
// received.
func (c *conn) addPayload(s *slot) {
	c.pending += int(s.req.Length)
	held := false
	if len(s.req.Ref) > 0 {
		for _, p := range s.req.Ref {
			held = c.addSeg(p) || held
		}
	} else {
		held = c.addSeg(s.req.Buf[:s.req.Length])
	}
	if held {
		c.held = append(c.held, s)
		return
	}
	c.release(s)
}

// addSeg adds p to the batch and reports whether the batch references it.
func (c *conn) addSeg(p []byte) bool {
	if len(p) < iovMin {
		c.wbuf = append(c.wbuf, p...)
		return false
	}
	if len(c.wbuf) > c.segOff {
		c.iov = append(c.iov, c.wbuf[c.segOff:])
		c.segOff = len(c.wbuf)
	}
	c.iov = append(c.iov, p)
	return true
}

// flush writes the batch and releases the slots it referenced. After a
// write error the connection is closed (so the reader stops) and later
// replies are dropped.
func (c *conn) flush() {
	if !c.wfailed && (len(c.wbuf) > 0 || len(c.iov) > 0) {
		var err error
		if c.sys == nil && len(c.iov) == 0 {
			_, err = c.nc.Write(c.wbuf)
		} else {
			if len(c.wbuf) > c.segOff {
				c.iov = append(c.iov, c.wbuf[c.segOff:])
			}
			if c.sys != nil {
				err = c.sys.writev(c.iov)
			} else {
				c.bufs = c.iov
				_, err = c.bufs.WriteTo(c.nc)
			}
		}
		if err != nil {
			c.wfailed = true
			c.nc.Close()
		}
	}
	clear(c.iov)
	c.iov = c.iov[:0]
	c.wbuf = c.wbuf[:0]
	c.segOff = 0
	c.pending = 0
	for i, s := range c.held {
		c.held[i] = nil
		c.release(s)
	}
	c.held = c.held[:0]
}
