package nbd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// TestSysConn: writev delivers every byte in order across partial writes
// (far more than the socket buffers hold, in more vectors than IOV_MAX,
// empty ones included), reads see the stream and then EOF, and a read
// deadline interrupts a waiting read as on a net.Conn.
func TestSysConn(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	s := newSysConn(server)
	if s == nil {
		t.Fatal("no sysConn for a TCP connection")
	}

	var bufs [][]byte
	var want []byte
	// 24 MB, several times what the socket buffers hold, read in small
	// pieces: the writes are partial and the writer waits for room.
	for i := range 3000 {
		b := pattern(1+(i*7919)%16000, byte(i))
		if i%10 == 0 {
			b = nil
		}
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	got := make(chan []byte, 1)
	go func() {
		var all []byte
		buf := make([]byte, 1500)
		for len(all) < len(want) {
			n, err := client.Read(buf)
			if err != nil {
				break
			}
			all = append(all, buf[:n]...)
		}
		got <- all
	}()
	if err := s.writev(bufs); err != nil {
		t.Fatal(err)
	}
	if g := <-got; !bytes.Equal(g, want) {
		t.Fatalf("read back %d bytes, not the %d written in order", len(g), len(want))
	}
	if s.wwaits == 0 {
		t.Fatal("the writer never found the socket full: partial writes were not exercised")
	}

	msg := []byte("hello over a raw read")
	if _, err := client.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(s, buf); err != nil || !bytes.Equal(buf, msg) {
		t.Fatalf("read %q, %v", buf, err)
	}
	server.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := s.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want a deadline error", err)
	}
	server.SetReadDeadline(time.Time{})
	client.Close()
	if n, err := s.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read after the peer closed: %d, %v, want EOF", n, err)
	}
}
