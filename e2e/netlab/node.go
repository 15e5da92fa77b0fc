package netlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Node is one namespace of the lab, with one address on the switch.
type Node struct {
	lab    *Lab
	index  int
	ns     *netns
	ifname string
	ip     netip.Addr
}

// IP is the node's IPv4 address on the switch, e.g. "10.58.162.1".
func (n *Node) IP() string { return n.ip.String() }

// Addr is IP as a netip.Addr.
func (n *Node) Addr() netip.Addr { return n.ip }

// Name is the node's namespace name, for `ip netns exec NAME …`.
func (n *Node) Name() string { return n.ns.name }

// Index is the node's number in the lab.
func (n *Node) Index() int { return n.index }

// Interface is the name of the node's veth inside its namespace.
func (n *Node) Interface() string { return n.ifname }

// Command returns a command that runs name inside the node's namespace
// (through `ip netns exec`, which execs name in place, so the command's pid
// is the program's, and mounts the namespace's own /sys). At teardown the
// lab kills the command if it was started, and every other process still
// in its namespaces (the command's children too). Start it from the test's
// goroutine, or before teardown can begin.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, n.lab.ipPath, append([]string{"netns", "exec", n.ns.name, name}, args...)...)
	n.lab.mu.Lock()
	n.lab.cmds = append(n.lab.cmds, cmd)
	n.lab.mu.Unlock()
	return cmd
}

// Do runs fn on an OS thread that has entered the node's namespace. Sockets
// fn creates stay in the namespace after Do returns. fn must not start
// goroutines that expect to be in the namespace: they are not.
func (n *Node) Do(fn func() error) error { return n.lab.do(n.ns, fn) }

// Listen is net.Listen inside the node. The listener is closed at teardown
// if the test has not closed it.
func (n *Node) Listen(network, address string) (net.Listener, error) {
	return openIn(n, "listen "+network+" "+address, func() (net.Listener, error) {
		return net.Listen(network, address)
	})
}

// ListenPacket is net.ListenPacket inside the node; for "udp" the result is
// a *net.UDPConn. It is closed at teardown if the test has not closed it.
func (n *Node) ListenPacket(network, address string) (net.PacketConn, error) {
	return openIn(n, "listen "+network+" "+address, func() (net.PacketConn, error) {
		return net.ListenPacket(network, address)
	})
}

// Dial is net.Dial from inside the node. Through a partition a TCP dial
// waits for the kernel's SYN retries; use DialContext to bound it.
func (n *Node) Dial(network, address string) (net.Conn, error) {
	return n.DialContext(context.Background(), network, address)
}

// DialContext is net.Dialer.DialContext from inside the node. The
// connection is closed at teardown if the test has not closed it.
func (n *Node) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return openIn(n, "dial "+network+" "+address, func() (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	})
}

// openIn makes a socket inside the node and has the lab close it at
// teardown.
func openIn[T io.Closer](n *Node, what string, open func() (T, error)) (T, error) {
	var c, zero T
	if err := n.Do(func() (err error) { c, err = open(); return err }); err != nil {
		return zero, fmt.Errorf("%s in %s: %w", what, n.ns.name, err)
	}
	if err := n.lab.track(c); err != nil {
		return zero, err
	}
	return c, nil
}

// do runs fn on a fresh goroutine locked to its thread, with the thread
// moved into ns and back. If the thread cannot move back it stays locked,
// so the runtime ends it with the goroutine instead of reusing it in the
// wrong namespace.
func (l *Lab) do(ns *netns, fn func() error) error {
	l.nsMu.RLock()
	defer l.nsMu.RUnlock()
	if l.nsClosed || ns.fd < 0 {
		return errClosed
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(ns.fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", ns.name, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leave netns %s: %w", ns.name, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// runIn runs a program inside ns and returns its combined output. The
// child is forked from a thread inside ns and so starts there: this saves
// the extra exec of `ip netns exec` on every fault change.
func (l *Lab) runIn(ns *netns, stdin string, name string, args ...string) ([]byte, error) {
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	cmd.Stdout, cmd.Stderr = &out, &out // one writer: os/exec copies through one pipe
	if err := l.do(ns, cmd.Start); err != nil {
		return nil, err
	}
	err := cmd.Wait()
	return out.Bytes(), err
}
