package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// socketPair returns two connected unix stream sockets, the way the daemon
// hands one end to the kernel nbd driver.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// loadClient drives a connection already in the transmission phase with a
// fixed queue depth, without allocating per request, so allocation counts
// and profiles show the server alone.
type loadClient struct {
	nc         net.Conn
	bw         *bufio.Writer
	br         *bufio.Reader
	structured bool
	cmd        uint16
	bs         uint32
	span       uint64 // requests cycle over [0, span)
	qd         int
	req        [requestSize]byte
	payload    []byte
	rbuf       []byte
	tokens     chan struct{}
	errc       chan error
}

func newLoadClient(nc net.Conn, structured bool, cmd uint16, bs uint32, span uint64, qd int) *loadClient {
	l := &loadClient{
		nc: nc, structured: structured, cmd: cmd, bs: bs, span: span, qd: qd,
		bw:      bufio.NewWriterSize(nc, 256<<10),
		br:      bufio.NewReaderSize(nc, 256<<10),
		payload: make([]byte, bs),
		rbuf:    make([]byte, bs+64),
		tokens:  make(chan struct{}, qd),
		errc:    make(chan error, 2),
	}
	for range qd { // tokens go home with every reply, so fill once
		l.tokens <- struct{}{}
	}
	return l
}

// run sends n requests keeping up to qd in flight and waits for every reply.
func (l *loadClient) run(n int) error {
	go func() { l.errc <- l.receive(n) }()
	binary.BigEndian.PutUint32(l.req[0:], requestMagic)
	binary.BigEndian.PutUint16(l.req[6:], l.cmd)
	binary.BigEndian.PutUint32(l.req[24:], l.bs)
	blocks := l.span / uint64(l.bs)
	for i := range n {
		select {
		case <-l.tokens:
		default:
			// Out of tokens: push what is queued, then wait.
			if err := l.bw.Flush(); err != nil {
				return err
			}
			<-l.tokens
		}
		binary.BigEndian.PutUint64(l.req[8:], uint64(i))
		binary.BigEndian.PutUint64(l.req[16:], (uint64(i)*7919%blocks)*uint64(l.bs))
		l.bw.Write(l.req[:])
		if l.cmd == cmdWrite {
			l.bw.Write(l.payload)
		}
	}
	if err := l.bw.Flush(); err != nil {
		return err
	}
	return <-l.errc
}

func (l *loadClient) receive(n int) error {
	for range n {
		var hdr []byte
		var err error
		if l.structured && l.cmd == cmdRead {
			hdr, err = l.br.Peek(structHeaderSize)
		} else {
			hdr, err = l.br.Peek(simpleReplySize)
		}
		if err != nil {
			return err
		}
		switch binary.BigEndian.Uint32(hdr) {
		case simpleMagic:
			if e := binary.BigEndian.Uint32(hdr[4:]); e != 0 {
				return fmt.Errorf("errno %d", e)
			}
			l.br.Discard(simpleReplySize)
			if l.cmd == cmdRead {
				if _, err := io.ReadFull(l.br, l.rbuf[:l.bs]); err != nil {
					return err
				}
			}
		case structuredMagic:
			if typ := binary.BigEndian.Uint16(hdr[6:]); typ != replyTypeOffsetData {
				return fmt.Errorf("chunk type %d", typ)
			}
			n := binary.BigEndian.Uint32(hdr[16:])
			l.br.Discard(structHeaderSize)
			if _, err := io.ReadFull(l.br, l.rbuf[:n]); err != nil {
				return err
			}
		default:
			return fmt.Errorf("bad reply magic")
		}
		l.tokens <- struct{}{}
	}
	return nil
}

// kernelPair serves a memory export over a socketpair (no handshake,
// simple replies) and returns the client end.
func kernelPair(t testing.TB, size int64) net.Conn {
	exps, e, _ := oneExportSized(t, size)
	s := NewServer(exps, Options{})
	srv, cli := socketPair(t)
	done := make(chan error, 1)
	go func() { done <- s.ServeKernel(context.Background(), srv, e) }()
	t.Cleanup(func() {
		cli.Close()
		<-done
		s.Close()
	})
	return cli
}

func oneExportSized(t testing.TB, size int64) (exportSet, *testExport, *counting) {
	e, c := memExport(t, size)
	return exportSet{"vol": e}, e, c
}

// structuredConn serves a memory export over TCP and negotiates structured
// replies with NBD_OPT_GO, returning the connection in transmission phase.
func structuredConn(t testing.TB, size int64) net.Conn {
	exps, _, _ := oneExportSized(t, size)
	_, addr := startServer(t, exps, Options{})
	c := connect(t, addr, "vol", true)
	c.nc.SetDeadline(time.Time{})
	if c.br.Buffered() != 0 {
		t.Fatal("unexpected buffered bytes after GO")
	}
	return c.nc
}

const benchSpan = 64 << 20

func benchIO(b *testing.B, cmd uint16, bs uint32, qd int) {
	nc := kernelPair(b, benchSpan)
	l := newLoadClient(nc, false, cmd, bs, benchSpan, qd)
	if err := l.run(2 * int(benchSpan/int64(bs))); err != nil { // touch every chunk first
		b.Fatal(err)
	}
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	cpu := cpuTime()
	if err := l.run(b.N); err != nil {
		b.Fatal(err)
	}
	reportCPU(b, cpu)
}

// cpuTime is the process's user+system CPU time. On a shared machine
// CPU time per request (server and load client together) is a steadier
// measure of efficiency than wall-clock time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}

func BenchmarkRead4K(b *testing.B)     { benchIO(b, cmdRead, 4096, 32) }
func BenchmarkWrite4K(b *testing.B)    { benchIO(b, cmdWrite, 4096, 32) }
func BenchmarkRead4KQD1(b *testing.B)  { benchIO(b, cmdRead, 4096, 1) }
func BenchmarkRead128K(b *testing.B)   { benchIO(b, cmdRead, 128<<10, 8) }
func BenchmarkWrite128K(b *testing.B)  { benchIO(b, cmdWrite, 128<<10, 8) }
func BenchmarkRead1MQD4(b *testing.B)  { benchIO(b, cmdRead, 1<<20, 4) }
func BenchmarkWrite1MQD4(b *testing.B) { benchIO(b, cmdWrite, 1<<20, 4) }
func BenchmarkStructuredRead4K(b *testing.B) {
	nc := structuredConn(b, benchSpan)
	l := newLoadClient(nc, true, cmdRead, 4096, benchSpan, 32)
	if err := l.run(10000); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	cpu := cpuTime()
	if err := l.run(b.N); err != nil {
		b.Fatal(err)
	}
	reportCPU(b, cpu)
}

// TestZeroAllocsPerRequest counts heap allocations in the whole process
// (server and load client) over many requests in steady state. The client
// allocates nothing per request, so the count is the server's.
func TestZeroAllocsPerRequest(t *testing.T) {
	const warm, n = 20000, 20000
	cases := []struct {
		name       string
		structured bool
		cmd        uint16
		bs         uint32
	}{
		{"read4k", false, cmdRead, 4096},
		{"write4k", false, cmdWrite, 4096},
		{"read64k", false, cmdRead, 64 << 10},
		{"structured-read4k", true, cmdRead, 4096},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var nc net.Conn
			if tc.structured {
				nc = structuredConn(t, 16<<20)
			} else {
				nc = kernelPair(t, 16<<20)
			}
			l := newLoadClient(nc, tc.structured, tc.cmd, tc.bs, 16<<20, 16)
			if err := l.run(warm); err != nil {
				t.Fatal(err)
			}
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			if err := l.run(n); err != nil {
				t.Fatal(err)
			}
			runtime.ReadMemStats(&after)
			allocs := after.Mallocs - before.Mallocs
			t.Logf("%d allocations over %d requests", allocs, n)
			if raceEnabled && classOf(tc.bs) > keepClass {
				t.Skipf("%d-byte buffers come from a sync.Pool, which drops items under the race detector; checked without -race (make test runs this test both ways)", tc.bs)
			}
			// A few dozen process-wide allocations (runtime wait
			// records recreated after a GC, the test framework, a late
			// worker start) may land in the window, more under -race on
			// a loaded machine; one per request would be 20000.
			if allocs > n/200 {
				t.Fatalf("%d allocations over %d requests: the request path allocates", allocs, n)
			}
		})
	}
}
