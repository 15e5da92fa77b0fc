package nbd_test

import (
	"context"
	"log"
	"net"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/pipeline"
)

// volume is how a daemon might present one volume to the NBD server: its
// pipeline as the Handler plus the facts the handshake advertises.
type volume struct {
	pipeline.Handler
	eng ioengine.Engine
}

func (v *volume) Size() int64                { return v.eng.Size() }
func (v *volume) ReadOnly() bool             { return false }
func (v *volume) Description() string        { return "scratch volume" }
func (v *volume) MinBlockSize() uint32       { return 1 }
func (v *volume) PreferredBlockSize() uint32 { return 4096 }

type registry map[string]*volume

func (r registry) Export(name string) (nbd.Export, bool) {
	v, ok := r[name]
	if !ok {
		return nil, false // a nil *volume must not become a non-nil Export
	}
	return v, true
}

func (r registry) ExportNames() []string { return []string{"scratch"} }

// Example shows the daemon's wiring: one Server for all volumes, a TCP
// listener, and graceful shutdown.
func Example() {
	eng, err := ioengine.NewMemory(1 << 30)
	if err != nil {
		log.Fatal(err)
	}
	vols := registry{"scratch": {Handler: ioengine.Handler(eng), eng: eng}}
	srv := nbd.NewServer(vols, nbd.Options{})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	// ... clients connect to nbd://ADDR/scratch; for the kernel driver the
	// daemon passes one end of a socketpair to srv.ServeKernel ...

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Print(err)
	}
	if err := <-served; err != nil {
		log.Print(err)
	}
	// Output:
}
