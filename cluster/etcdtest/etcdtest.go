// Package etcdtest runs a real etcd for tests: Debian's etcd-server (make
// deps installs it), one member, its data in a temp dir.
package etcdtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Binary finds etcd, or fails t with how to install it.
func Binary(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatalf("etcd not found (apt-get install etcd-server, or make deps): %v", err)
	}
	return p
}

// Args are the flags of a one-member etcd named name with its data in dir,
// serving clients at clientURL and its (unused) peer port at peerURL.
func Args(name, dir, clientURL, peerURL string) []string {
	return []string{
		"--name", name, "--data-dir", dir,
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", name + "=" + peerURL, "--initial-cluster-state", "new",
		"--log-level", "warn", "--logger", "zap",
		// A test machine's disk may be slow: no heartbeat warnings.
		"--heartbeat-interval", "100", "--election-timeout", "1000",
	}
}

// Server is a running etcd.
type Server struct {
	URL string
	cmd *exec.Cmd
	log *strings.Builder
}

// Start runs an etcd on loopback until the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := Binary(t)
	cu, pu := "http://"+freeAddr(t), "http://"+freeAddr(t)
	s := &Server{URL: cu, log: &strings.Builder{}}
	s.cmd = exec.Command(bin, Args("test", t.TempDir(), cu, pu)...)
	w := &lockedWriter{b: s.log}
	s.cmd.Stdout, s.cmd.Stderr = w, w
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.cmd.Process.Signal(syscall.SIGCONT)
		s.cmd.Process.Kill()
		s.cmd.Wait()
		if t.Failed() {
			w.mu.Lock()
			t.Logf("etcd's log:\n%s", s.log)
			w.mu.Unlock()
		}
	})
	if err := WaitReady(cu, 20*time.Second); err != nil {
		t.Fatalf("etcd did not come up: %v", err)
	}
	return s
}

// Signal sends the etcd process a signal (SIGSTOP: an outage).
func (s *Server) Signal(sig os.Signal) error { return s.cmd.Process.Signal(sig) }

// WaitReady waits until an etcd at url answers a read.
func WaitReady(url string, within time.Duration) error {
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: time.Second, Logger: zap.NewNop()})
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, err = cli.Get(ctx, "health")
			cancel()
			cli.Close()
			if err == nil {
				return nil
			}
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no answer within %s: %v", within, last)
}

func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
