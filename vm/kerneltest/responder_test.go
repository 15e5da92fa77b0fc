//go:build vmtest

package kerneltest

import (
	"encoding/binary"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/pipeline"
)

// This is a deliberately minimal transmission-phase NBD server (simple
// replies, one request at a time per socket) that proves the kernel side
// before the real server (nbd.ServeKernel) replaces it in these tests.

const (
	requestMagic = 0x25609513
	replyMagic   = 0x67446698

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
)

type responder struct {
	e     ioengine.Engine
	wg    sync.WaitGroup
	conns []*os.File
	// served counts requests per connection, to prove multi-conn use.
	served []atomic.Int64
	// ops counts requests by NBD command type.
	ops [8]atomic.Int64
}

// socketPairs returns n connected pairs: kernel ends and server ends.
func socketPairs(t testing.TB, n int) (kernel, server []*os.File) {
	t.Helper()
	for range n {
		k, srv, err := nbdnl.SocketPair()
		if err != nil {
			t.Fatal(err)
		}
		kernel = append(kernel, k)
		server = append(server, srv)
	}
	return kernel, server
}

// serve starts one goroutine per connection; each exits when its socket
// reaches EOF (kernel disconnect) or is closed by stop.
func serve(e ioengine.Engine, conns []*os.File) *responder {
	r := &responder{e: e, conns: conns, served: make([]atomic.Int64, len(conns))}
	for i, c := range conns {
		r.wg.Add(1)
		go func() { // owner: r; exits on socket EOF/close or NBD_CMD_DISC
			defer r.wg.Done()
			r.conn(i, c)
		}()
	}
	return r
}

// stop closes the server ends and waits for every connection goroutine.
func (r *responder) stop() {
	for _, c := range r.conns {
		c.Close()
	}
	r.wg.Wait()
}

// wait waits for the connection goroutines without closing anything.
func (r *responder) wait() { r.wg.Wait() }

func (r *responder) conn(i int, c *os.File) {
	var hdr [28]byte
	var rep [16]byte
	buf := make([]byte, 32<<20)
	binary.BigEndian.PutUint32(rep[0:], replyMagic)
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		if binary.BigEndian.Uint32(hdr[0:]) != requestMagic {
			return
		}
		flags := binary.BigEndian.Uint16(hdr[4:])
		typ := binary.BigEndian.Uint16(hdr[6:])
		copy(rep[8:], hdr[8:16]) // handle
		off := int64(binary.BigEndian.Uint64(hdr[16:]))
		n := int64(binary.BigEndian.Uint32(hdr[24:]))
		if n > int64(len(buf)) && (typ == cmdRead || typ == cmdWrite) {
			return // the kernel never sends more than max_sectors
		}
		r.served[i].Add(1)
		r.ops[typ&7].Add(1)
		var err error
		var payload []byte
		switch typ {
		case cmdRead:
			payload = buf[:n]
			_, err = r.e.ReadAt(payload, off)
		case cmdWrite:
			if _, rerr := io.ReadFull(c, buf[:n]); rerr != nil {
				return
			}
			_, err = r.e.WriteAt(buf[:n], off)
			if err == nil && flags&cmdFlagFUA != 0 {
				err = r.e.Flush()
			}
		case cmdDisc:
			return
		case cmdFlush:
			err = r.e.Flush()
		case cmdTrim:
			err = r.e.Trim(off, n)
		case cmdWriteZeroes:
			err = r.e.WriteZeroes(off, n, flags&cmdFlagNoHole != 0)
		default:
			err = pipeline.ErrNotSupported
		}
		var code uint32
		if err != nil {
			code = uint32(pipeline.Errno(err))
			payload = nil // an error reply carries no data
		}
		binary.BigEndian.PutUint32(rep[4:], code)
		if _, err := c.Write(rep[:]); err != nil {
			return
		}
		if payload != nil {
			if _, err := c.Write(payload); err != nil {
				return
			}
		}
	}
}

// closeAll closes files (the kernel keeps its own socket references).
func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}
