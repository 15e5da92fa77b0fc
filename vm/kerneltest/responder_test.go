//go:build vmtest

package kerneltest

import (
	"context"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/pipeline"
)

// The kernel-interface tests serve their devices with the real NBD server
// (nbd.Server.ServeKernel) over an ioengine, one export wrapper per socket
// so that the tests can see which socket carried how many requests of
// which kind.

// NBD command types, to index responder.ops.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
)

var cmdOf = map[pipeline.Op]int{
	pipeline.OpRead: cmdRead, pipeline.OpWrite: cmdWrite, pipeline.OpFlush: cmdFlush,
	pipeline.OpTrim: cmdTrim, pipeline.OpWriteZeroes: cmdWriteZeroes,
}

type responder struct {
	srv    *nbd.Server
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	conns  []net.Conn
	// served counts requests per connection, to prove multi-conn use.
	served []atomic.Int64
	// ops counts requests by NBD command type.
	ops [8]atomic.Int64
}

// countingExport is an ioengine served as an NBD export, counting
// requests for one connection.
type countingExport struct {
	h      pipeline.Handler
	e      ioengine.Engine
	r      *responder
	served *atomic.Int64
}

func (x *countingExport) Handle(ctx context.Context, req *pipeline.Request) error {
	x.served.Add(1)
	if c, ok := cmdOf[req.Op]; ok {
		x.r.ops[c].Add(1)
	}
	return x.h.Handle(ctx, req)
}
func (x *countingExport) Size() int64                { return x.e.Size() }
func (x *countingExport) ReadOnly() bool             { return false }
func (x *countingExport) Description() string        { return "kerneltest" }
func (x *countingExport) MinBlockSize() uint32       { return 512 }
func (x *countingExport) PreferredBlockSize() uint32 { return 4096 }

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

// serve serves each server end with nbd.Server.ServeKernel on its own
// goroutine; each exits when its socket reaches EOF (kernel disconnect) or
// stop closes it. The files are handed over (closed here).
func serve(e ioengine.Engine, files []*os.File) *responder {
	r := &responder{srv: nbd.NewServer(nil, nbd.Options{}), served: make([]atomic.Int64, len(files))}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	h := ioengine.Handler(e)
	for i, f := range files {
		c, err := net.FileConn(f) // dups the fd
		f.Close()
		if err != nil {
			panic("kerneltest: FileConn of a socketpair end: " + err.Error())
		}
		r.conns = append(r.conns, c)
		x := &countingExport{h: h, e: e, r: r, served: &r.served[i]}
		r.wg.Add(1)
		go func() { // owner: r; exits on socket EOF, close or cancel
			defer r.wg.Done()
			r.srv.ServeKernel(r.ctx, c, x)
		}()
	}
	return r
}

// stop closes the server ends and waits for every connection goroutine.
func (r *responder) stop() {
	r.cancel()
	for _, c := range r.conns {
		c.Close()
	}
	r.wg.Wait()
}

// wait waits for the connection goroutines without closing anything.
func (r *responder) wait() { r.wg.Wait() }

// closeAll closes files (the kernel keeps its own socket references).
func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// serveMemory serves a new memory engine of size bytes over conns socket
// pairs until the test ends; it returns the kernel ends (for
// nbdnl.Config.Socks; close them after Connect) and the responder.
func serveMemory(t testing.TB, size int64, conns int) ([]*os.File, *responder) {
	t.Helper()
	e, err := ioengine.NewMemory(size)
	if err != nil {
		t.Fatal(err)
	}
	kern, srv := socketPairs(t, conns)
	r := serve(e, srv)
	t.Cleanup(r.stop)
	return kern, r
}
