package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// TestMain fails the package if connection goroutines or file descriptors
// outlive the tests that created them.
func TestMain(m *testing.M) {
	// The runtime's network poller opens its descriptors on first use and
	// keeps them: start it before counting.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	fds := countFDs()
	code := m.Run()
	if code == 0 {
		if err := waitNoLeaks(fds); err != nil {
			os.Stderr.WriteString("leak check: " + err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

func waitNoLeaks(fds int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		leaked := strings.Contains(stacks, "blockd/nbd.(*conn)") ||
			strings.Contains(stacks, "blockd/nbd.(*Server)")
		nfd := countFDs()
		if !leaked && (fds < 0 || nfd <= fds) {
			return nil
		}
		if time.Now().After(deadline) {
			if leaked {
				return errors.New("goroutines leaked:\n" + stacks)
			}
			return errors.New("file descriptors leaked")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testExport adapts a Handler into an Export.
type testExport struct {
	pipeline.Handler
	size  atomic.Int64
	ro    bool
	desc  string
	minBS uint32
}

func (e *testExport) Size() int64                { return e.size.Load() }
func (e *testExport) ReadOnly() bool             { return e.ro }
func (e *testExport) Description() string        { return e.desc }
func (e *testExport) MinBlockSize() uint32       { return max(e.minBS, 1) }
func (e *testExport) PreferredBlockSize() uint32 { return 4096 }

type exportSet map[string]Export

func (s exportSet) Export(name string) (Export, bool) {
	e, ok := s[name]
	return e, ok
}

func (s exportSet) ExportNames() []string {
	names := make([]string, 0, len(s))
	for n := range s {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// counting wraps a Handler and counts what reaches it.
type counting struct {
	next    pipeline.Handler
	writes  atomic.Int64
	fua     atomic.Int64
	flushes atomic.Int64
	trims   atomic.Int64
	zeroes  atomic.Int64
	noHole  atomic.Int64
	caches  atomic.Int64
}

func (c *counting) Handle(ctx context.Context, r *pipeline.Request) error {
	switch r.Op {
	case pipeline.OpWrite:
		c.writes.Add(1)
	case pipeline.OpFlush:
		c.flushes.Add(1)
	case pipeline.OpTrim:
		c.trims.Add(1)
	case pipeline.OpWriteZeroes:
		c.zeroes.Add(1)
		if r.Flags&pipeline.FlagNoHole != 0 {
			c.noHole.Add(1)
		}
	case pipeline.OpCache:
		c.caches.Add(1)
	}
	if r.Flags&pipeline.FlagFUA != 0 {
		c.fua.Add(1)
	}
	return c.next.Handle(ctx, r)
}

func memExport(t testing.TB, size int64) (*testExport, *counting) {
	t.Helper()
	m, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	c := &counting{next: ioengine.Handler(m)}
	e := &testExport{Handler: c}
	e.size.Store(size)
	return e, c
}

// startServer serves exps on a 127.0.0.1 port until the test ends.
func startServer(t testing.TB, exps Exports, opts Options) (*Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(exps, opts)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve returned %v, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after Close")
		}
	})
	return s, ln.Addr().String()
}

// rawClient speaks the NBD protocol byte by byte so tests control every
// field.
type rawClient struct {
	t          testing.TB
	nc         net.Conn
	br         *bufio.Reader
	structured bool
	size       uint64
	flags      uint16
	mu         sync.Mutex
	lens       map[uint64]uint32 // read lengths by cookie, for simple replies
}

func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	return &rawClient{t: t, nc: nc, br: bufio.NewReader(nc), lens: map[uint64]uint32{}}
}

// greet reads the server greeting and sends client flags.
func (c *rawClient) greet(cflags uint32) {
	c.t.Helper()
	var b [18]byte
	c.readFull(b[:])
	if binary.BigEndian.Uint64(b[0:]) != nbdMagic || binary.BigEndian.Uint64(b[8:]) != optMagic {
		c.t.Fatalf("bad greeting %x", b)
	}
	if hf := binary.BigEndian.Uint16(b[16:]); hf != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", hf)
	}
	c.write(be32(cflags))
}

func (c *rawClient) readFull(p []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.br, p); err != nil {
		c.t.Fatalf("read: %v", err)
	}
}

func (c *rawClient) write(p []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(p); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *rawClient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], optMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *rawClient) readOptReply() optReply {
	c.t.Helper()
	var b [20]byte
	c.readFull(b[:])
	if m := binary.BigEndian.Uint64(b[0:]); m != repMagic {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(b[8:]), typ: binary.BigEndian.Uint32(b[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(b[16:]))
	c.readFull(r.data)
	return r
}

func (c *rawClient) expectOpt(opt, typ uint32) optReply {
	c.t.Helper()
	r := c.readOptReply()
	if r.opt != opt || r.typ != typ {
		c.t.Fatalf("option reply opt=%d type=%#x (%q), want opt=%d type=%#x", r.opt, r.typ, r.data, opt, typ)
	}
	return r
}

func (c *rawClient) negotiateStructured() {
	c.t.Helper()
	c.sendOpt(optStructuredReply, nil)
	c.expectOpt(optStructuredReply, repAck)
	c.structured = true
}

func infoGoData(name string, infos ...uint16) []byte {
	b := be32(uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// goExport enters transmission with NBD_OPT_GO and returns the infos seen.
func (c *rawClient) goExport(name string, infos ...uint16) map[uint16][]byte {
	c.t.Helper()
	c.sendOpt(optGo, infoGoData(name, infos...))
	return c.readInfos(optGo)
}

func (c *rawClient) readInfos(opt uint32) map[uint16][]byte {
	c.t.Helper()
	got := map[uint16][]byte{}
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ == repAck {
			break
		}
		if r.typ != repInfo {
			c.t.Fatalf("reply type %#x (%q)", r.typ, r.data)
		}
		it := binary.BigEndian.Uint16(r.data)
		got[it] = r.data[2:]
		if it == infoExport {
			c.size = binary.BigEndian.Uint64(r.data[2:])
			c.flags = binary.BigEndian.Uint16(r.data[10:])
		}
	}
	if _, ok := got[infoExport]; !ok {
		c.t.Fatal("no NBD_INFO_EXPORT")
	}
	return got
}

// connect dials, greets and enters transmission on name.
func connect(t testing.TB, addr, name string, structured bool) *rawClient {
	t.Helper()
	c := dialRaw(t, addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	if structured {
		c.negotiateStructured()
	}
	c.goExport(name)
	return c
}

func (c *rawClient) send(cmd, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := makeRequest(cmd, flags, cookie, off, length)
	if cmd == cmdRead {
		c.mu.Lock()
		c.lens[cookie] = length
		c.mu.Unlock()
	}
	c.write(append(b, payload...))
}

type reply struct {
	cookie uint64
	errno  uint32
	data   []byte
	// structured replies only
	chunkType uint16
	chunks    int
	msg       string
}

// readReply reads one whole reply (all chunks of a structured one).
func (c *rawClient) readReply() reply {
	c.t.Helper()
	var m [4]byte
	c.readFull(m[:])
	switch binary.BigEndian.Uint32(m[:]) {
	case simpleMagic:
		var b [12]byte
		c.readFull(b[:])
		r := reply{errno: binary.BigEndian.Uint32(b[0:]), cookie: binary.BigEndian.Uint64(b[4:])}
		c.mu.Lock()
		n, isRead := c.lens[r.cookie]
		delete(c.lens, r.cookie)
		c.mu.Unlock()
		if isRead && r.errno == 0 {
			r.data = make([]byte, n)
			c.readFull(r.data)
		}
		return r
	case structuredMagic:
		if !c.structured {
			c.t.Fatal("structured reply without negotiation")
		}
		var r reply
		for {
			var b [16]byte
			c.readFull(b[:])
			flags := binary.BigEndian.Uint16(b[0:])
			r.chunkType = binary.BigEndian.Uint16(b[2:])
			r.cookie = binary.BigEndian.Uint64(b[4:])
			p := make([]byte, binary.BigEndian.Uint32(b[12:]))
			c.readFull(p)
			r.chunks++
			switch r.chunkType {
			case replyTypeOffsetData:
				r.data = append(r.data, p[8:]...)
			case replyTypeError, replyTypeErrorOffset:
				r.errno = binary.BigEndian.Uint32(p)
				r.msg = string(p[6 : 6+binary.BigEndian.Uint16(p[4:])])
			case replyTypeBlockStatus:
				r.data = append(r.data, p...)
			case replyTypeNone:
			default:
				c.t.Fatalf("chunk type %d", r.chunkType)
			}
			if flags&replyFlagDone != 0 {
				c.mu.Lock()
				delete(c.lens, r.cookie)
				c.mu.Unlock()
				return r
			}
			var m [4]byte
			c.readFull(m[:])
			if binary.BigEndian.Uint32(m[:]) != structuredMagic {
				c.t.Fatal("bad chunk magic")
			}
		}
	default:
		c.t.Fatalf("reply magic %x", m)
	}
	panic("unreachable")
}

// do sends one request and returns its reply.
func (c *rawClient) do(cmd, flags uint16, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	c.send(cmd, flags, 7, off, length, payload)
	r := c.readReply()
	if r.cookie != 7 {
		c.t.Fatalf("cookie %d", r.cookie)
	}
	return r
}

func (c *rawClient) mustOK(cmd, flags uint16, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	r := c.do(cmd, flags, off, length, payload)
	if r.errno != 0 {
		c.t.Fatalf("cmd %d off %d len %d: errno %d (%s)", cmd, off, length, r.errno, r.msg)
	}
	return r
}

func (c *rawClient) expectErr(want uint32, cmd, flags uint16, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	r := c.do(cmd, flags, off, length, payload)
	if r.errno != want {
		c.t.Fatalf("cmd %d off %d len %d: errno %d, want %d", cmd, off, length, r.errno, want)
	}
	if r.data != nil {
		c.t.Fatalf("error reply carried %d bytes of data", len(r.data))
	}
}

// expectClosed asserts the server closed the connection.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c.br)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		c.t.Fatalf("want EOF, got %v after %d bytes", err, n)
	}
}

func makeRequest(cmd, flags uint16, cookie, off uint64, length uint32) []byte {
	b := make([]byte, requestSize)
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], cmd)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return b
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func mustEqual(t testing.TB, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("data mismatch: got %d bytes %x..., want %d bytes %x...", len(got), head(got), len(want), head(want))
	}
}

func head(b []byte) []byte { return b[:min(len(b), 16)] }

func newReader(nc net.Conn) *bufio.Reader { return bufio.NewReader(nc) }
