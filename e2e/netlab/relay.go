package netlab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// maxRelayDelay keeps a relay's stop (which waits out one delay) short.
	maxRelayDelay = 10 * time.Second
	// relayQueue datagrams wait in each direction at most; beyond, the
	// relay drops, like a router's full queue.
	relayQueue = 4096
	// relayClients bounds the per-client upstream sockets of one relay.
	relayClients = 1024
)

// RelayStats counts what a relay did.
type RelayStats struct {
	Requests uint64 // datagrams forwarded from clients to the target
	Replies  uint64 // datagrams forwarded from the target back to clients
	Dropped  uint64 // datagrams dropped: full queue, too many clients, send error
	Clients  int    // client addresses seen (one upstream socket each)
	// MeanLate and MaxLate: how long after its due time (arrival + delay)
	// a datagram was sent, the relay's own overhead on top of the delay.
	MeanLate, MaxLate time.Duration
}

type datagram struct {
	due  time.Time
	data []byte
	peer netip.AddrPort // the client
	up   *net.UDPConn   // the client's upstream socket
}

// relay forwards UDP datagrams between clients and one target with a fixed
// delay each way. Goroutines: one reads the listening socket, one per
// client reads its upstream socket, one per direction sends; stop ends all.
type relay struct {
	node   *Node
	delay  time.Duration
	target *net.UDPAddr
	ln     *net.UDPConn
	addr   string

	up, down chan datagram
	done     chan struct{}
	wg       sync.WaitGroup

	mu      sync.Mutex
	clients map[netip.AddrPort]*net.UDPConn
	stopped bool

	requests, replies, dropped atomic.Uint64
	lateN, lateSum, lateMax    atomic.Int64
}

// Relay starts a UDP relay inside node's namespace, listening on listen
// (e.g. ":0" or "IP:port") and forwarding each datagram to target after
// delay, and each reply back to its sender after delay, so a round trip
// through it costs 2×delay. Each client address gets its own upstream
// socket. It returns the relay's address (the node's IP when listen has
// no host). The relay stops at teardown or with StopRelay.
func (l *Lab) Relay(node int, listen, target string, delay time.Duration) (addr string) {
	l.t.Helper()
	l.checkNode(node)
	if delay < 0 || delay > maxRelayDelay {
		l.t.Fatalf("netlab: relay delay %v: want 0 to %v", delay, maxRelayDelay)
	}
	taddr, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		l.t.Fatalf("netlab: relay target: %v", err)
	}
	r := &relay{
		node:    l.nodes[node],
		delay:   delay,
		target:  taddr,
		up:      make(chan datagram, relayQueue),
		down:    make(chan datagram, relayQueue),
		done:    make(chan struct{}),
		clients: map[netip.AddrPort]*net.UDPConn{},
	}
	if err := r.node.Do(func() (err error) {
		laddr, err := net.ResolveUDPAddr("udp", listen)
		if err != nil {
			return err
		}
		r.ln, err = net.ListenUDP("udp", laddr)
		if err == nil {
			forceBuffers(r.ln)
		}
		return err
	}); err != nil {
		l.t.Fatalf("netlab: relay listen %s in node %d: %v", listen, node, err)
	}
	la := r.ln.LocalAddr().(*net.UDPAddr).AddrPort()
	host := la.Addr().Unmap()
	if host.IsUnspecified() {
		host = r.node.ip
	}
	r.addr = netip.AddrPortFrom(host, la.Port()).String()

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		r.ln.Close()
		l.t.Fatalf("netlab: relay: %v", errClosed)
	}
	l.relays[r.addr] = r
	l.mu.Unlock()

	r.wg.Add(3)
	go r.readClients()
	go r.send(r.up, r.forward, &r.requests)
	go r.send(r.down, func(d datagram) error { _, err := r.ln.WriteToUDPAddrPort(d.data, d.peer); return err }, &r.replies)
	return r.addr
}

// StopRelay stops the relay at addr and closes its sockets.
func (l *Lab) StopRelay(addr string) {
	l.t.Helper()
	l.mu.Lock()
	r := l.relays[addr] // kept, so that RelayStats still answers
	l.mu.Unlock()
	if r == nil {
		l.t.Fatalf("netlab: no relay at %s", addr)
	}
	r.stop()
}

// RelayStats reports the relay at addr (running or stopped by StopRelay
// before; a zero value for an unknown address).
func (l *Lab) RelayStats(addr string) RelayStats {
	l.mu.Lock()
	r := l.relays[addr]
	l.mu.Unlock()
	if r == nil {
		return RelayStats{}
	}
	return r.stats()
}

func (r *relay) stats() RelayStats {
	r.mu.Lock()
	clients := len(r.clients)
	r.mu.Unlock()
	s := RelayStats{
		Requests: r.requests.Load(),
		Replies:  r.replies.Load(),
		Dropped:  r.dropped.Load(),
		Clients:  clients,
		MaxLate:  time.Duration(r.lateMax.Load()),
	}
	if n := r.lateN.Load(); n > 0 {
		s.MeanLate = time.Duration(r.lateSum.Load() / n)
	}
	return s
}

// readClients reads datagrams from clients until the listening socket is
// closed.
func (r *relay) readClients() {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, from, err := r.ln.ReadFromUDPAddrPort(buf)
		if err != nil {
			return // closed by stop; an unconnected socket reports no ICMP errors
		}
		due := time.Now().Add(r.delay)
		up, err := r.client(from)
		if err != nil {
			r.dropped.Add(1)
			continue
		}
		r.enqueue(r.up, datagram{due: due, data: append([]byte(nil), buf[:n]...), peer: from, up: up})
	}
}

// client returns the upstream socket of a client, making it (in the node's
// namespace) and starting its reader on first use.
func (r *relay) client(from netip.AddrPort) (*net.UDPConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c := r.clients[from]; c != nil {
		return c, nil
	}
	if r.stopped {
		return nil, errClosed
	}
	if len(r.clients) >= relayClients {
		return nil, fmt.Errorf("relay %s: more than %d clients", r.addr, relayClients)
	}
	var c *net.UDPConn
	if err := r.node.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, r.target)
		if err == nil {
			forceBuffers(c)
		}
		return err
	}); err != nil {
		return nil, err
	}
	r.clients[from] = c
	r.wg.Add(1)
	go r.readTarget(c, from)
	return c, nil
}

// readTarget reads the target's replies to one client until its socket is
// closed.
func (r *relay) readTarget(c *net.UDPConn, client netip.AddrPort) {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if errors.Is(err, syscall.ECONNREFUSED) {
			continue // the target is not listening (yet): an ICMP error, once per datagram
		}
		if err != nil {
			return // closed by stop
		}
		due := time.Now().Add(r.delay)
		r.enqueue(r.down, datagram{due: due, data: append([]byte(nil), buf[:n]...), peer: client})
	}
}

// forward sends a client's datagram to the target. A connected UDP socket
// reports an ICMP error of an earlier datagram (target port closed) on the
// next send, which then did not happen: send once more.
func (r *relay) forward(d datagram) error {
	_, err := d.up.Write(d.data)
	if errors.Is(err, syscall.ECONNREFUSED) {
		_, err = d.up.Write(d.data)
	}
	return err
}

func (r *relay) enqueue(q chan datagram, d datagram) {
	select {
	case q <- d:
	default:
		r.dropped.Add(1)
	}
}

// send sends one direction's datagrams in order, each at its due time.
// Delays are equal, so due times follow arrival order and a flow is never
// reordered. It sleeps with clock_nanosleep and a 1 ns timer slack on a
// thread of its own (Go timers overshoot sub-millisecond sleeps by about a
// millisecond); the thread stays locked and is discarded when send returns.
func (r *relay) send(q chan datagram, write func(datagram) error, sent *atomic.Uint64) {
	defer r.wg.Done()
	runtime.LockOSThread()
	unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
	for {
		select {
		case <-r.done:
			return
		case d := <-q:
			sleepUntil(d.due)
			late := int64(time.Since(d.due))
			r.lateN.Add(1)
			r.lateSum.Add(late)
			for old := r.lateMax.Load(); late > old && !r.lateMax.CompareAndSwap(old, late); old = r.lateMax.Load() {
			}
			// Count before the write, so that whoever receives the
			// datagram finds it counted.
			sent.Add(1)
			if err := write(d); err != nil {
				sent.Add(^uint64(0))
				r.dropped.Add(1)
			}
		}
	}
}

// sleepUntil blocks the thread until t; the loop ends because each sleep
// covers the time left, and nanosleep returns early only on a signal.
func sleepUntil(t time.Time) {
	for {
		d := time.Until(t)
		if d <= 0 {
			return
		}
		ts := unix.NsecToTimespec(int64(d))
		unix.Nanosleep(&ts, nil)
	}
}

// stop closes the sockets, ends every goroutine and waits for them (at
// most one delay, for a sender asleep on a datagram).
func (r *relay) stop() {
	r.mu.Lock()
	if r.stopped {
		r.mu.Unlock()
		return
	}
	r.stopped = true
	close(r.done)
	r.ln.Close()
	for _, c := range r.clients {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// forceBuffers gives a UDP socket 4 MiB buffers beyond net.core.rmem_max
// (root may), so a burst waits in the socket instead of being dropped
// there: the lab's faults should be the only loss. Best effort.
func forceBuffers(c *net.UDPConn) {
	sc, err := c.SyscallConn()
	if err != nil {
		return
	}
	sc.Control(func(fd uintptr) {
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 4<<20)
	})
}
