// Command gonbd serves a memory export with github.com/pojntfx/go-nbd's
// server and memory backend, as a peer for the blockd benchmark. It is what
// a user of that library gets from its documented pieces; nothing is tuned.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/server"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:10809", "TCP address to listen on")
	size := flag.Int64("size", 1<<30, "export size in bytes")
	name := flag.String("name", "bench", "export name")
	showVersion := flag.Bool("version", false, "print the go-nbd version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("go-nbd", goNBDVersion())
		return
	}
	if err := run(*listen, *size, *name); err != nil {
		log.Fatal(err)
	}
}

func goNBDVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/pojntfx/go-nbd" {
				return d.Version
			}
		}
	}
	return "unknown"
}

// run serves until SIGINT or SIGTERM, then closes the listener and every
// connection and waits for their goroutines.
func run(listen string, size int64, name string) error {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	b := backend.NewMemoryBackend(make([]byte, size))
	exports := []*server.Export{{Name: name, Description: "blockd benchmark peer", Backend: b}}
	opts := &server.Options{SupportsMultiConn: true}

	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		wg    sync.WaitGroup
	)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	// The signal goroutine's exit is the shutdown: it closes the listener,
	// which ends the accept loop below.
	go func() {
		<-sig
		l.Close()
	}()
	log.Printf("go-nbd %s serving %q (%d bytes) on %s", goNBDVersion(), name, size, l.Addr())
	for {
		c, err := l.Accept()
		if err != nil {
			break
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		// One goroutine per connection, ending when server.Handle returns
		// (client disconnect, or the conn closed at shutdown).
		go func() {
			defer wg.Done()
			defer func() {
				// The library's memory backend returns with its mutex held on
				// an out-of-range request; a panic must not take the whole
				// peer down mid-benchmark without a trace.
				if r := recover(); r != nil {
					log.Printf("connection %s: panic: %v", c.RemoteAddr(), r)
				}
				c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			}()
			// io.EOF is a client that closed without NBD_CMD_DISC, as
			// libnbd does; not worth a log line per fio job.
			if err := server.Handle(c, exports, opts); err != nil && !errors.Is(err, io.EOF) {
				log.Printf("connection %s: %v", c.RemoteAddr(), err)
			}
		}()
	}
	mu.Lock()
	for c := range conns {
		c.Close()
	}
	mu.Unlock()
	wg.Wait()
	return nil
}
