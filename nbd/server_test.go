package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/pipeline"
)

const testSize = 8 << 20

func oneExport(t testing.TB) (exportSet, *testExport, *counting) {
	e, c := memExport(t, testSize)
	e.desc = "test volume"
	return exportSet{"vol": e}, e, c
}

func TestHandshakeExportName(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	for _, noZeroes := range []bool{false, true} {
		c := dialRaw(t, addr)
		cf := uint32(clientFixedNewstyle)
		if noZeroes {
			cf |= clientNoZeroes
		}
		c.greet(cf)
		c.sendOpt(optExportName, []byte("vol"))
		b := make([]byte, 10)
		c.readFull(b)
		if sz := binary.BigEndian.Uint64(b); sz != testSize {
			t.Fatalf("size %d", sz)
		}
		fl := binary.BigEndian.Uint16(b[8:])
		want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim |
			tflagSendWriteZeroes | tflagSendCache | tflagCanMultiConn)
		if fl != want {
			t.Fatalf("flags %#x, want %#x", fl, want)
		}
		if !noZeroes {
			z := make([]byte, 124)
			c.readFull(z)
			if !bytes.Equal(z, make([]byte, 124)) {
				t.Fatal("reserved bytes not zero")
			}
		}
		// The next bytes must be the reply to our first request: proves
		// that exactly 124 zeroes (or none) were sent.
		p := pattern(4096, 1)
		c.mustOK(cmdWrite, 0, 0, 4096, p)
		mustEqual(t, c.mustOK(cmdRead, 0, 0, 4096, nil).data, p)
	}
}

func TestHandshakeExportNameUnknownCloses(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	c.sendOpt(optExportName, []byte("nope"))
	c.expectClosed()
}

func TestHandshakeBadClientFlags(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	c := dialRaw(t, addr)
	c.greet(1 << 5)
	c.expectClosed()
}

func TestHandshakeBadOptionMagic(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle)
	c.write(make([]byte, 16))
	c.expectClosed()
}

func TestList(t *testing.T) {
	a, _ := memExport(t, 1<<20)
	b, _ := memExport(t, 2<<20)
	def, _ := memExport(t, 2<<20)
	a.desc, b.desc, def.desc = "desc a", "desc b", "desc "
	_, addr := startServer(t, exportSet{"b": b, "a": a, "": def}, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle)
	c.sendOpt(optList, nil)
	var names []string
	for {
		r := c.readOptReply()
		if r.typ == repAck {
			break
		}
		if r.typ != repServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n]))
		if desc := string(r.data[4+n:]); desc != "desc "+string(r.data[4:4+n]) {
			t.Fatalf("description %q", desc)
		}
	}
	if want := []string{"", "a", "b"}; !equalStrings(names, want) {
		t.Fatalf("names %q, want %q", names, want)
	}
	c.sendOpt(optList, []byte("x"))
	c.expectOpt(optList, repErrInvalid)
	c.sendOpt(optAbort, nil)
	c.expectOpt(optAbort, repAck)
	c.expectClosed()
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestInfoThenGo(t *testing.T) {
	e, _ := memExport(t, testSize)
	e.desc = "a description"
	e.minBS = 512
	ro, _ := memExport(t, 1<<20)
	ro.ro = true
	_, addr := startServer(t, exportSet{"vol": e, "ro": ro}, Options{MaxPayload: 1 << 20})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)

	c.sendOpt(optInfo, infoGoData("vol", infoName, infoDescription, infoBlockSize))
	infos := c.readInfos(optInfo)
	if c.size != testSize {
		t.Fatalf("size %d", c.size)
	}
	if string(infos[infoName]) != "vol" {
		t.Fatalf("name %q", infos[infoName])
	}
	if string(infos[infoDescription]) != "a description" {
		t.Fatalf("description %q", infos[infoDescription])
	}
	bs := infos[infoBlockSize]
	if len(bs) != 12 {
		t.Fatalf("block size info %x", bs)
	}
	if mn, pr, mx := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:]); mn != 512 || pr != 4096 || mx != 1<<20 {
		t.Fatalf("block sizes %d/%d/%d", mn, pr, mx)
	}

	// Read-only export: INFO shows the flag and no write features.
	c.sendOpt(optInfo, infoGoData("ro"))
	c.readInfos(optInfo)
	if c.flags&tflagReadOnly == 0 || c.flags&(tflagSendTrim|tflagSendWriteZeroes|tflagSendFUA) != 0 {
		t.Fatalf("read-only flags %#x", c.flags)
	}

	// Malformed INFO requests are refused, negotiation continues.
	c.sendOpt(optInfo, []byte{0, 0})
	c.expectOpt(optInfo, repErrInvalid)
	bad := infoGoData("vol", infoName)
	c.sendOpt(optGo, bad[:len(bad)-1])
	c.expectOpt(optGo, repErrInvalid)
	c.sendOpt(optGo, infoGoData("missing"))
	c.expectOpt(optGo, repErrUnknown)

	c.negotiateStructured()
	c.goExport("vol")
	if c.flags&tflagSendDF == 0 {
		t.Fatalf("structured connection lacks SEND_DF: %#x", c.flags)
	}
	p := pattern(1024, 3)
	c.mustOK(cmdWrite, 0, 512, 1024, p)
	mustEqual(t, c.mustOK(cmdRead, 0, 512, 1024, nil).data, p)
}

func TestUnsupportedOptions(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle)
	for _, opt := range []uint32{optStartTLS, 4, 99, 1 << 30} {
		c.sendOpt(opt, []byte("data"))
		c.expectOpt(opt, repErrUnsup)
	}
	c.sendOpt(optStructuredReply, []byte{1})
	c.expectOpt(optStructuredReply, repErrInvalid)
	// An option larger than the server reads into memory is skipped and
	// refused; the session continues.
	c.sendOpt(optInfo, make([]byte, maxOptLen+1))
	c.expectOpt(optInfo, repErrTooBig)
	c.goExport("vol")
	c.mustOK(cmdFlush, 0, 0, 0, nil)
}

func TestHugeOptionCloses(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle)
	var b [16]byte
	binary.BigEndian.PutUint64(b[0:], optMagic)
	binary.BigEndian.PutUint32(b[8:], optGo)
	binary.BigEndian.PutUint32(b[12:], 0xffffffff)
	c.write(b[:])
	c.expectClosed()
}

func TestCommands(t *testing.T) {
	for _, structured := range []bool{false, true} {
		exps, _, cnt := oneExport(t)
		_, addr := startServer(t, exps, Options{})
		c := connect(t, addr, "vol", structured)

		p := pattern(64<<10, 9)
		c.mustOK(cmdWrite, 0, 4096, uint32(len(p)), p)
		r := c.mustOK(cmdRead, 0, 4096, uint32(len(p)), nil)
		mustEqual(t, r.data, p)
		if structured && (r.chunkType != replyTypeOffsetData || r.chunks != 1) {
			t.Fatalf("structured read: type %d chunks %d", r.chunkType, r.chunks)
		}
		// Small, unaligned read (copied into the reply batch, not writev'd).
		mustEqual(t, c.mustOK(cmdRead, 0, 4097, 100, nil).data, p[1:101])
		mustEqual(t, c.mustOK(cmdRead, cmdFlagFUA, 4096, 10, nil).data, p[:10])

		c.mustOK(cmdWrite, cmdFlagFUA, 0, 512, pattern(512, 1))
		if cnt.fua.Load() != 2 || cnt.writes.Load() != 2 {
			t.Fatalf("fua %d writes %d", cnt.fua.Load(), cnt.writes.Load())
		}
		c.mustOK(cmdFlush, 0, 0, 0, nil)
		if cnt.flushes.Load() != 1 {
			t.Fatalf("flushes %d", cnt.flushes.Load())
		}

		c.mustOK(cmdTrim, 0, 8192, 4096, nil)
		mustEqual(t, c.mustOK(cmdRead, 0, 8192, 4096, nil).data, make([]byte, 4096))
		c.mustOK(cmdWriteZeroes, 0, 4096, 100, nil)
		c.mustOK(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 16384, 8192, nil)
		got := c.mustOK(cmdRead, 0, 4096, uint32(len(p)), nil).data
		want := bytes.Clone(p)
		clear(want[0:100])
		clear(want[4096:8192])
		clear(want[12288:20480])
		mustEqual(t, got, want)
		if cnt.trims.Load() != 1 || cnt.zeroes.Load() != 2 || cnt.noHole.Load() != 1 {
			t.Fatalf("trims %d zeroes %d nohole %d", cnt.trims.Load(), cnt.zeroes.Load(), cnt.noHole.Load())
		}
		c.mustOK(cmdCache, 0, 0, 1<<20, nil)
		if cnt.caches.Load() != 1 {
			t.Fatalf("caches %d", cnt.caches.Load())
		}

		// Zero-length requests are no-ops that succeed.
		r = c.mustOK(cmdRead, 0, 100, 0, nil)
		if len(r.data) != 0 || (structured && r.chunkType != replyTypeNone) {
			t.Fatalf("zero-length read: %d bytes, type %d", len(r.data), r.chunkType)
		}
		c.mustOK(cmdWrite, 0, testSize, 0, nil)
		c.mustOK(cmdTrim, 0, 0, 0, nil)

		// The whole export, end to end.
		c.mustOK(cmdRead, 0, testSize-4096, 4096, nil)

		// DISC: the server answers what is in flight, then closes.
		c.send(cmdWrite, 0, 1, 0, 4096, pattern(4096, 5))
		c.send(cmdDisc, 0, 2, 0, 0, nil)
		if r := c.readReply(); r.cookie != 1 || r.errno != 0 {
			t.Fatalf("write before DISC: %+v", r)
		}
		c.expectClosed()
	}
}

func TestBadRequestsKeepConnection(t *testing.T) {
	for _, structured := range []bool{false, true} {
		e, _ := memExport(t, testSize)
		e.minBS = 512
		_, addr := startServer(t, exportSet{"vol": e}, Options{MaxPayload: 1 << 20})
		c := connect(t, addr, "vol", structured)
		ok := func() {
			t.Helper()
			p := pattern(512, 42)
			c.mustOK(cmdWrite, 0, 1024, 512, p)
			mustEqual(t, c.mustOK(cmdRead, 0, 1024, 512, nil).data, p)
		}
		c.expectErr(errInval, cmdRead, 0, testSize, 512, nil)
		c.expectErr(errInval, cmdRead, 0, testSize-512, 1024, nil)
		c.expectErr(errInval, cmdRead, 0, 1<<63, 512, nil)
		c.expectErr(errInval, cmdRead, 0, ^uint64(0)-511, 512, nil)
		ok()
		c.expectErr(errNoSpc, cmdWrite, 0, testSize-512, 1024, pattern(1024, 1))
		ok()
		c.expectErr(errOverflow, cmdRead, 0, 0, 2<<20, nil)
		c.expectErr(errOverflow, cmdWrite, 0, 0, 2<<20, pattern(2<<20, 1))
		ok()
		c.expectErr(errInval, cmdRead, 0, 100, 512, nil)
		c.expectErr(errInval, cmdWrite, 0, 512, 100, pattern(100, 1))
		c.expectErr(errInval, cmdTrim, 0, 0, 513, nil)
		ok()
		c.expectErr(errInval, cmdTrim, 0, testSize, 512, nil)
		c.expectErr(errNoSpc, cmdWriteZeroes, 0, testSize, 512, nil)
		c.expectErr(errInval, cmdCache, 0, testSize, 512, nil)
		c.expectErr(errInval, 42, 0, 0, 0, nil)
		c.expectErr(errInval, cmdBlockStatus, 0, 0, 512, nil)
		c.expectErr(errInval, cmdWrite, 1<<7, 0, 512, pattern(512, 1))
		c.expectErr(errInval, cmdRead, cmdFlagNoHole, 0, 512, nil)
		if !structured {
			c.expectErr(errInval, cmdRead, cmdFlagDF, 0, 512, nil)
		} else {
			c.mustOK(cmdRead, cmdFlagDF, 0, 512, nil)
		}
		ok()
	}
}

func TestReadOnlyExport(t *testing.T) {
	e, cnt := memExport(t, testSize)
	e.ro = true
	_, addr := startServer(t, exportSet{"ro": e}, Options{})
	c := connect(t, addr, "ro", false)
	if c.flags&tflagReadOnly == 0 {
		t.Fatalf("flags %#x", c.flags)
	}
	c.expectErr(errPerm, cmdWrite, 0, 0, 4096, pattern(4096, 1))
	c.expectErr(errPerm, cmdTrim, 0, 0, 4096, nil)
	c.expectErr(errPerm, cmdWriteZeroes, 0, 0, 4096, nil)
	mustEqual(t, c.mustOK(cmdRead, 0, 0, 4096, nil).data, make([]byte, 4096))
	c.mustOK(cmdFlush, 0, 0, 0, nil)
	if cnt.writes.Load()+cnt.trims.Load()+cnt.zeroes.Load() != 0 {
		t.Fatal("a write reached the read-only engine")
	}
}

func TestBadMagicClosesOnlyThatConnection(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	a := connect(t, addr, "vol", false)
	b := connect(t, addr, "vol", true)
	a.mustOK(cmdFlush, 0, 0, 0, nil)
	garbage := make([]byte, requestSize)
	copy(garbage, "junk")
	a.write(garbage)
	a.expectClosed()
	p := pattern(4096, 77)
	b.mustOK(cmdWrite, 0, 0, 4096, p)
	mustEqual(t, b.mustOK(cmdRead, 0, 0, 4096, nil).data, p)
}

// failing fails requests touching the first MiB with EIO and maps a quota
// error at 1 MiB to ENOSPC.
type failing struct{ next pipeline.Handler }

func (f failing) Handle(ctx context.Context, r *pipeline.Request) error {
	switch {
	case r.Op == pipeline.OpFlush:
		return errors.New("flush exploded")
	case r.Offset < 1<<20:
		return errors.New("disk on fire")
	case r.Offset == 1<<20:
		return syscall.EDQUOT
	}
	return f.next.Handle(ctx, r)
}

func TestBackendErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		e, cnt := memExport(t, testSize)
		e.Handler = failing{next: cnt}
		_, addr := startServer(t, exportSet{"vol": e}, Options{})
		c := connect(t, addr, "vol", structured)
		r := c.do(cmdRead, 0, 0, 4096, nil)
		if r.errno != errIO || r.data != nil {
			t.Fatalf("read error reply %+v", r)
		}
		// The message is the errno's text: the backend's own error (which
		// may name files) stays in the server.
		if structured && (r.chunkType != replyTypeError || r.msg != syscall.EIO.Error()) {
			t.Fatalf("structured read error: type %d msg %q, want %q", r.chunkType, r.msg, syscall.EIO.Error())
		}
		c.expectErr(errIO, cmdWrite, 0, 0, 4096, pattern(4096, 1))
		c.expectErr(errIO, cmdFlush, 0, 0, 0, nil)
		c.expectErr(errNoSpc, cmdWrite, 0, 1<<20, 4096, pattern(4096, 1))
		p := pattern(4096, 3)
		c.mustOK(cmdWrite, 0, 2<<20, 4096, p)
		mustEqual(t, c.mustOK(cmdRead, 0, 2<<20, 4096, nil).data, p)
	}
}

// gate holds requests at offset 0 until released; others pass at once.
type gate struct {
	next    pipeline.Handler
	held    chan struct{} // one token per request that reached the gate
	release chan struct{}
}

func (g *gate) Handle(ctx context.Context, r *pipeline.Request) error {
	if r.Offset == 0 && r.Op != pipeline.OpFlush {
		g.held <- struct{}{}
		select {
		case <-g.release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.next.Handle(ctx, r)
}

func TestOutOfOrderCompletion(t *testing.T) {
	e, cnt := memExport(t, testSize)
	g := &gate{next: cnt, held: make(chan struct{}, 64), release: make(chan struct{})}
	e.Handler = g
	_, addr := startServer(t, exportSet{"vol": e}, Options{MaxInFlight: 16})
	c := connect(t, addr, "vol", true)

	// Reordering between requests in flight is allowed, so the data read
	// concurrently below is written beforehand.
	for i := range 100 {
		off := uint64(4096 * (i + 1))
		c.mustOK(cmdWrite, 0, off, 4096, pattern(4096, byte(i)))
	}
	// 8 slow reads at offset 0, then 100 fast writes and 100 fast reads
	// elsewhere: the fast ones must all be answered while the slow ones
	// are stuck, even though 200 > MaxInFlight (slots are recycled).
	for i := range 8 {
		c.send(cmdRead, 0, uint64(1000+i), 0, 4096, nil)
	}
	for range 8 {
		<-g.held
	}
	var wg sync.WaitGroup
	wg.Add(1)
	sendErr := make(chan error, 1)
	go func() {
		defer wg.Done()
		for i := range 100 {
			c.mu.Lock()
			c.lens[uint64(2*i+1)] = 4096
			c.mu.Unlock()
			req := makeRequest(cmdWrite, 0, uint64(2*i), uint64(4096*(i+200)), 4096)
			req = append(req, pattern(4096, byte(i))...)
			req = append(req, makeRequest(cmdRead, 0, uint64(2*i+1), uint64(4096*(i+1)), 4096)...)
			if _, err := c.nc.Write(req); err != nil {
				sendErr <- err
				return
			}
		}
	}()
	seen := map[uint64]bool{}
	for range 200 {
		r := c.readReply()
		if r.errno != 0 || r.cookie >= 1000 {
			t.Fatalf("unexpected reply %+v before the slow reads were released", r)
		}
		if r.cookie%2 == 1 {
			i := int(r.cookie / 2)
			mustEqual(t, r.data, pattern(4096, byte(i)))
		}
		seen[r.cookie] = true
	}
	wg.Wait()
	select {
	case err := <-sendErr:
		t.Fatal(err)
	default:
	}
	if len(seen) != 200 {
		t.Fatalf("%d distinct replies", len(seen))
	}
	close(g.release)
	for range 8 {
		r := c.readReply()
		if r.cookie < 1000 || r.errno != 0 || len(r.data) != 4096 {
			t.Fatalf("slow reply %+v", r)
		}
	}
}

// volatileEngine models a disk with a write cache: writes land in a cache,
// Flush makes them durable. durable tells what survived a power cut.
type volatileEngine struct {
	mu      sync.Mutex
	cache   map[int64][]byte
	durable map[int64][]byte
}

func (v *volatileEngine) Handle(_ context.Context, r *pipeline.Request) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch r.Op {
	case pipeline.OpWrite:
		v.cache[r.Offset] = bytes.Clone(r.Buf)
		if r.Flags&pipeline.FlagFUA != 0 {
			v.durable[r.Offset] = bytes.Clone(r.Buf)
		}
	case pipeline.OpFlush:
		for k, b := range v.cache {
			v.durable[k] = b
		}
	case pipeline.OpRead:
		copy(r.Buf, v.cache[r.Offset])
	}
	return nil
}

// TestMultiConnFlush proves NBD_FLAG_CAN_MULTI_CONN: a write completed on
// connection A is durable once a FLUSH on connection B has been answered.
func TestMultiConnFlush(t *testing.T) {
	v := &volatileEngine{cache: map[int64][]byte{}, durable: map[int64][]byte{}}
	e := &testExport{Handler: v}
	e.size.Store(testSize)
	_, addr := startServer(t, exportSet{"vol": e}, Options{})
	a := connect(t, addr, "vol", false)
	b := connect(t, addr, "vol", true)
	if a.flags&tflagCanMultiConn == 0 {
		t.Fatal("CAN_MULTI_CONN not advertised")
	}
	for i := range 20 {
		off := int64(i) * 4096
		p := pattern(4096, byte(i))
		a.mustOK(cmdWrite, 0, uint64(off), 4096, p)
		b.mustOK(cmdFlush, 0, 0, 0, nil)
		v.mu.Lock()
		got := v.durable[off]
		v.mu.Unlock()
		mustEqual(t, got, p)
	}
}

func TestShutdownFinishesInFlight(t *testing.T) {
	e, cnt := memExport(t, testSize)
	g := &gate{next: cnt, held: make(chan struct{}, 4), release: make(chan struct{})}
	e.Handler = g
	s, addr := startServer(t, exportSet{"vol": e}, Options{})
	c := connect(t, addr, "vol", false)
	idle := connect(t, addr, "vol", true)
	idle.mustOK(cmdFlush, 0, 0, 0, nil)
	c.send(cmdWrite, 0, 1, 0, 4096, pattern(4096, 1))
	<-g.held

	done := make(chan error, 1)
	go func() { done <- s.Shutdown(context.Background()) }()
	// Shutdown must wait for the gated request.
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	idle.expectClosed()
	close(g.release)
	if r := c.readReply(); r.cookie != 1 || r.errno != 0 {
		t.Fatalf("in-flight reply %+v", r)
	}
	c.expectClosed()
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if cnt.writes.Load() != 1 {
		t.Fatal("write did not reach the engine")
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Fatal("listener still accepting")
	}
}

func TestShutdownTimeoutCloses(t *testing.T) {
	e, cnt := memExport(t, testSize)
	g := &gate{next: cnt, held: make(chan struct{}, 4), release: make(chan struct{})}
	e.Handler = g
	s, addr := startServer(t, exportSet{"vol": e}, Options{})
	c := connect(t, addr, "vol", false)
	c.send(cmdRead, 0, 1, 0, 4096, nil)
	<-g.held
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	// The gate honours ctx, so Close's cancellation ends the request.
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	c.expectClosed()
}

func TestServeKernel(t *testing.T) {
	exps, e, _ := oneExport(t)
	s := NewServer(exps, Options{})
	defer s.Close()
	srvEnd, cliEnd := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeKernel(context.Background(), srvEnd, e) }()
	c := &rawClient{t: t, nc: cliEnd, br: newReader(cliEnd), lens: map[uint64]uint32{}}
	cliEnd.SetDeadline(time.Now().Add(30 * time.Second))
	p := pattern(4096, 11)
	c.mustOK(cmdWrite, cmdFlagFUA, 8192, 4096, p)
	mustEqual(t, c.mustOK(cmdRead, 0, 8192, 4096, nil).data, p)
	c.send(cmdDisc, 0, 0, 0, 0, nil)
	if err := <-done; err != nil {
		t.Fatalf("ServeKernel: %v", err)
	}
	cliEnd.Close()
}

func TestCloseUnblocksIdle(t *testing.T) {
	exps, _, _ := oneExport(t)
	s, addr := startServer(t, exps, Options{})
	var n atomic.Int32
	for range 4 {
		c := connect(t, addr, "vol", true)
		c.mustOK(cmdFlush, 0, 0, 0, nil)
		n.Add(1)
	}
	half := dialRaw(t, addr) // stuck in the handshake
	half.greet(clientFixedNewstyle)
	s.Close()
	half.expectClosed()
	if err := s.ServeConn(context.Background(), nopConn()); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ServeConn after Close: %v", err)
	}
}

func nopConn() net.Conn {
	a, b := net.Pipe()
	b.Close()
	return a
}

func TestDisconnectAndContextEndConnections(t *testing.T) {
	a, _ := memExport(t, testSize)
	b, _ := memExport(t, testSize)
	s, addr := startServer(t, exportSet{"a": a, "b": b}, Options{})
	ca1 := connect(t, addr, "a", false)
	ca2 := connect(t, addr, "a", true)
	cb := connect(t, addr, "b", false)
	for _, c := range []*rawClient{ca1, ca2, cb} {
		c.mustOK(cmdFlush, 0, 0, 0, nil)
	}
	if n := s.NumConns(); n != 3 {
		t.Fatalf("NumConns %d", n)
	}
	if n := s.Disconnect(a); n != 2 {
		t.Fatalf("Disconnect closed %d connections, want 2", n)
	}
	ca1.expectClosed()
	ca2.expectClosed()
	cb.mustOK(cmdFlush, 0, 0, 0, nil)

	// Cancelling the context given to ServeConn ends that connection.
	ctx, cancel := context.WithCancel(context.Background())
	srvEnd, cliEnd := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(ctx, srvEnd) }()
	c := &rawClient{t: t, nc: cliEnd, br: newReader(cliEnd), lens: map[uint64]uint32{}}
	cliEnd.SetDeadline(time.Now().Add(30 * time.Second))
	c.greet(clientFixedNewstyle | clientNoZeroes)
	c.goExport("b")
	c.mustOK(cmdFlush, 0, 0, 0, nil)
	cancel()
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ServeConn after cancel: %v", err)
	}
	c.expectClosed()
}

func metaData(name string, queries ...string) []byte {
	b := be32(uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func TestMetaContextBlockStatus(t *testing.T) {
	exps, _, _ := oneExport(t)
	_, addr := startServer(t, exps, Options{})
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	// Meta contexts need structured replies first.
	c.sendOpt(optSetMetaContext, metaData("vol", metaBaseAllocation))
	c.expectOpt(optSetMetaContext, repErrInvalid)
	c.negotiateStructured()

	for _, q := range [][]string{nil, {"base:"}, {metaBaseAllocation}} {
		c.sendOpt(optListMetaContext, metaData("vol", q...))
		r := c.expectOpt(optListMetaContext, repMetaContext)
		if string(r.data[4:]) != metaBaseAllocation {
			t.Fatalf("context %q", r.data[4:])
		}
		c.expectOpt(optListMetaContext, repAck)
	}
	c.sendOpt(optListMetaContext, metaData("vol", "qemu:dirty-bitmap:x"))
	c.expectOpt(optListMetaContext, repAck)
	c.sendOpt(optSetMetaContext, metaData("nope", metaBaseAllocation))
	c.expectOpt(optSetMetaContext, repErrUnknown)
	c.sendOpt(optSetMetaContext, metaData("vol", metaBaseAllocation)[:9])
	c.expectOpt(optSetMetaContext, repErrInvalid)

	c.sendOpt(optSetMetaContext, metaData("vol", "x-other:thing", metaBaseAllocation))
	r := c.expectOpt(optSetMetaContext, repMetaContext)
	if id := binary.BigEndian.Uint32(r.data); id != metaIDBaseAllocation || string(r.data[4:]) != metaBaseAllocation {
		t.Fatalf("set context id %d name %q", id, r.data[4:])
	}
	c.expectOpt(optSetMetaContext, repAck)
	c.goExport("vol")

	c.send(cmdBlockStatus, 0, 9, 4096, 1<<20, nil)
	var m [4]byte
	c.readFull(m[:])
	var h [16]byte
	c.readFull(h[:])
	p := make([]byte, binary.BigEndian.Uint32(h[12:]))
	c.readFull(p)
	if binary.BigEndian.Uint32(m[:]) != structuredMagic || binary.BigEndian.Uint16(h[2:]) != replyTypeBlockStatus ||
		binary.BigEndian.Uint16(h[0:])&replyFlagDone == 0 || binary.BigEndian.Uint64(h[4:]) != 9 {
		t.Fatalf("block status chunk header %x %x", m, h)
	}
	if len(p) != 12 || binary.BigEndian.Uint32(p) != metaIDBaseAllocation ||
		binary.BigEndian.Uint32(p[4:]) != 1<<20 || binary.BigEndian.Uint32(p[8:]) != 0 {
		t.Fatalf("block status payload %x", p)
	}
	c.expectErr(errInval, cmdBlockStatus, 0, testSize, 512, nil)
	c.expectErr(errInval, cmdBlockStatus, 0, 0, 0, nil)

	// Without a selected context BLOCK_STATUS is refused.
	d := connect(t, addr, "vol", true)
	d.expectErr(errInval, cmdBlockStatus, 0, 0, 4096, nil)
}

// TestBufferBudget: with a 1 MiB budget, a second 1 MiB request waits
// until the first one's buffer is released, and then everything completes.
func TestBufferBudget(t *testing.T) {
	e, cnt := memExport(t, testSize)
	g := &gate{next: cnt, held: make(chan struct{}, 64), release: make(chan struct{})}
	e.Handler = g
	_, addr := startServer(t, exportSet{"vol": e}, Options{MaxBufferBytes: 1 << 20, MaxPayload: 1 << 20})
	c := connect(t, addr, "vol", false)
	c.send(cmdRead, 0, 100, 0, 1<<20, nil) // held at the gate, owns the budget
	<-g.held
	c.send(cmdRead, 0, 101, 0, 1<<20, nil) // must wait for the budget
	c.send(cmdFlush, 0, 102, 0, 0, nil)
	// Negative check: a broken budget would let 101 reach the gate at once.
	select {
	case <-g.held:
		t.Fatal("second 1 MiB request dispatched beyond the buffer budget")
	case <-time.After(200 * time.Millisecond):
	}
	close(g.release)
	got := map[uint64]int{}
	for range 3 {
		r := c.readReply()
		if r.errno != 0 {
			t.Fatalf("reply %+v", r)
		}
		got[r.cookie] = len(r.data)
	}
	if got[100] != 1<<20 || got[101] != 1<<20 || len(got) != 3 {
		t.Fatalf("replies %v", got)
	}
}

// TestShutdownMidPayload: a write whose payload is still arriving when
// Shutdown starts is completed and answered.
func TestShutdownMidPayload(t *testing.T) {
	inPayload := make(chan struct{}, 1)
	testHookPayload = func() { inPayload <- struct{}{} }
	t.Cleanup(func() { testHookPayload = nil }) // runs after the server's Close
	exps, _, cnt := oneExport(t)
	s, addr := startServer(t, exps, Options{})
	c := connect(t, addr, "vol", false)
	c.mustOK(cmdFlush, 0, 0, 0, nil)
	p := pattern(64<<10, 5)
	req := append(makeRequest(cmdWrite, 0, 1, 0, uint32(len(p))), p...)
	c.write(req[:requestSize+1000])
	<-inPayload
	done := make(chan error, 1)
	go func() { done <- s.Shutdown(context.Background()) }()
	for !s.shuttingDown() {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // let the read deadline strike
	c.write(req[requestSize+1000:])
	if r := c.readReply(); r.cookie != 1 || r.errno != 0 {
		t.Fatalf("reply %+v", r)
	}
	c.expectClosed()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if cnt.writes.Load() != 1 {
		t.Fatalf("writes %d", cnt.writes.Load())
	}
}

func TestHandlerErrnoMapping(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{pipeline.ErrReadOnly, errPerm},
		{pipeline.ErrOutOfRange, errInval},
		{pipeline.ErrNoSpace, errNoSpc},
		{pipeline.ErrTooLarge, errOverflow},
		{pipeline.ErrNotSupported, 95},
		{pipeline.ErrShutdown, errShutdown},
		{syscall.EFBIG, errNoSpc},
		{syscall.EBADF, errIO},
	} {
		e, _ := memExport(t, testSize)
		e.Handler = pipeline.HandlerFunc(func(context.Context, *pipeline.Request) error { return tc.err })
		_, addr := startServer(t, exportSet{"vol": e}, Options{})
		c := connect(t, addr, "vol", false)
		c.expectErr(tc.want, cmdWriteZeroes, 0, 0, 4096, nil)
	}
}
