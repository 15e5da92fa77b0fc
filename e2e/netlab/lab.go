package netlab

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	namePrefix = "nlab"
	netnsDir   = "/run/netns"
	lockDir    = "/run/netlab"
	maxNodes   = 200
	// readyTimeout bounds the wait for every switch port to come up.
	readyTimeout = 5 * time.Second
)

// Options tunes a lab. The zero value is a good default.
type Options struct {
	// MTU of every link; 0 means 1500.
	MTU int
	// IPv6 leaves IPv6 enabled in the lab's namespaces. It is off by
	// default so that only the test's IPv4 traffic and ARP cross the links.
	IPv6 bool
}

// Lab is a set of nodes on one switch, with the faults applied between them.
type Lab struct {
	t      testing.TB
	ipPath string
	nft    string
	prefix string
	subnet netip.Prefix
	lock   *os.File
	sw     *netns
	nodes  []*Node

	// nsMu is held for reading while a thread is inside one of the lab's
	// namespaces and for writing while Close closes their descriptors, so a
	// late Do never enters a reused descriptor.
	nsMu     sync.RWMutex
	nsClosed bool

	mu      sync.Mutex // guards the fields below; held across nft runs
	closed  bool
	faults  faults
	applied []string // the ruleset last loaded into each node
	relays  map[string]*relay
	closers []io.Closer
	cmds    []*exec.Cmd // made by Node.Command
}

// netns is one namespace of the lab: its name under /run/netns and an open
// descriptor of it (-1 until opened).
type netns struct {
	name string
	fd   int
}

// New builds a lab of n nodes for the test and registers its teardown with
// t.Cleanup. It skips the test when not root, when the kernel lacks network
// namespaces, veth or bridge, or when ip or nft is missing; with CI=true it
// fails instead, as the rest of the project's tests do.
func New(t testing.TB, n int, opts Options) *Lab {
	t.Helper()
	if n < 1 || n > maxNodes {
		t.Fatalf("netlab: %d nodes; a lab has 1 to %d", n, maxNodes)
	}
	ipPath, nftPath := preflight(t)
	sweepOnce.Do(func() { sweep(t.Logf, ipPath, processStart) })

	l := &Lab{t: t, ipPath: ipPath, nft: nftPath, relays: map[string]*relay{}}
	l.faults.init()
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("netlab: teardown of %s: %v", l.prefix, err)
		}
	})
	if err := l.claimPrefix(); err != nil {
		t.Fatalf("netlab: %v", err)
	}
	if err := l.build(n, opts); err != nil {
		if errors.Is(err, errUnsupported) {
			skipOrFail(t, "netlab: the kernel cannot build a lab: %v", err)
		}
		t.Fatalf("netlab: build %s: %v", l.prefix, err)
	}
	return l
}

// errUnsupported marks a kernel that lacks a feature the lab needs.
var errUnsupported = errors.New("kernel feature missing")

func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// preflight checks what New needs before it creates anything and returns
// the paths of ip and nft.
func preflight(t testing.TB) (ipPath, nftPath string) {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "netlab: needs root (network namespaces, veth, nftables)")
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		skipOrFail(t, "netlab: the kernel has no network namespaces: %v", err)
	}
	return lookTool(t, "ip", "iproute2"), lookTool(t, "nft", "nftables")
}

// lookTool finds a tool in PATH or the sbin directories, which a test's
// PATH may lack.
func lookTool(t testing.TB, name, pkg string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
	}
	skipOrFail(t, "netlab: %s is not installed (Debian package %s; make deps installs it)", name, pkg)
	return ""
}

// claimPrefix picks a random prefix no live lab holds and locks it.
func (l *Lab) claimPrefix() error {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return fmt.Errorf("claim a prefix: %w", err)
	}
	for range 64 {
		var b [2]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Errorf("claim a prefix: %w", err)
		}
		prefix := fmt.Sprintf("%s%02x%02x", namePrefix, b[0], b[1])
		path := lockPath(prefix)
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("claim a prefix: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			continue // a sweeper holds it for a moment; the file is not ours to remove then
		}
		// A namespace of this prefix that no lock covers is a leftover the
		// sweep did not take (too young): leave it alone and pick another.
		if matches, _ := filepath.Glob(filepath.Join(netnsDir, prefix+"-*")); len(matches) > 0 {
			os.Remove(path)
			f.Close()
			continue
		}
		fmt.Fprintf(f, "pid %d since %s\n", os.Getpid(), time.Now().UTC().Format(time.RFC3339))
		l.lock, l.prefix = f, prefix
		l.subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, b[0], b[1], 0}), 24)
		return nil
	}
	return errors.New("claim a prefix: 64 random prefixes were all taken")
}

func lockPath(prefix string) string { return filepath.Join(lockDir, prefix+".lock") }

// build creates the namespaces, the bridge and the veths, and loads an
// empty fault table into every node.
func (l *Lab) build(n int, opts Options) error {
	mtu := opts.MTU
	if mtu == 0 {
		mtu = 1500
	}
	l.sw = &netns{name: l.prefix + "-sw", fd: -1}
	l.nodes = make([]*Node, n)
	for i := range l.nodes {
		ip := l.subnet.Addr().As4()
		ip[3] = byte(i + 1)
		l.nodes[i] = &Node{
			lab:    l,
			index:  i,
			ns:     &netns{name: fmt.Sprintf("%s-%d", l.prefix, i), fd: -1},
			ifname: fmt.Sprintf("%s-n%d", l.prefix, i),
			ip:     netip.AddrFrom4(ip),
		}
	}
	l.applied = make([]string, n)

	var add []string
	for _, ns := range l.namespaces() {
		add = append(add, "netns add "+ns.name)
	}
	if err := l.ip("", add...); err != nil {
		return err
	}
	for _, ns := range l.namespaces() {
		fd, err := unix.Open(filepath.Join(netnsDir, ns.name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", ns.name, err)
		}
		ns.fd = fd
		if !opts.IPv6 {
			if err := l.do(ns, disableIPv6); err != nil {
				return fmt.Errorf("netns %s: %w", ns.name, err)
			}
		}
	}

	br := l.prefix + "-br"
	// Multicast snooping off: a snooping bridge now and then sends an IGMPv3
	// report of its own (from 0.0.0.0), which the nodes' rules would drop
	// and count as the test's traffic.
	sw := []string{"link add " + br + " type bridge stp_state 0 mcast_snooping 0"}
	for i, nd := range l.nodes {
		port := fmt.Sprintf("%s-s%d", l.prefix, i)
		sw = append(sw,
			fmt.Sprintf("link add %s mtu %d type veth peer name %s mtu %d netns %s", port, mtu, nd.ifname, mtu, nd.ns.name),
			fmt.Sprintf("link set %s master %s up", port, br))
	}
	sw = append(sw, "link set "+br+" mtu "+fmt.Sprint(mtu)+" up")
	if err := l.ip(l.sw.name, sw...); err != nil {
		return err
	}
	for _, nd := range l.nodes {
		if err := l.ip(nd.ns.name,
			"link set lo up",
			fmt.Sprintf("addr add %s/%d dev %s", nd.ip, l.subnet.Bits(), nd.ifname),
			fmt.Sprintf("link set %s up", nd.ifname)); err != nil {
			return err
		}
	}
	if err := l.waitReady(br); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.applyLocked(true)
}

// disableIPv6 runs inside a namespace: /proc/sys/net belongs to the
// namespace of the thread that opens it.
func disableIPv6() error {
	for _, p := range []string{"all", "default"} {
		err := os.WriteFile("/proc/sys/net/ipv6/conf/"+p+"/disable_ipv6", []byte("1\n"), 0)
		if err != nil && !errors.Is(err, fs.ErrNotExist) { // a kernel without IPv6 is fine
			return fmt.Errorf("disable ipv6: %w", err)
		}
	}
	return nil
}

// waitReady waits until every switch port is up (both ends of its veth are
// up and the bridge forwards on it).
func (l *Lab) waitReady(br string) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		out, err := exec.Command(l.ipPath, "-n", l.sw.name, "-o", "link", "show", "master", br).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip link show master %s: %v: %s", br, err, bytes.TrimSpace(out))
		}
		up := strings.Count(string(out), "state UP")
		if up == len(l.nodes) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d switch ports up after %v:\n%s", up, len(l.nodes), readyTimeout, out)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// namespaces lists the switch and node namespaces (those built so far).
func (l *Lab) namespaces() []*netns {
	var all []*netns
	if l.sw != nil {
		all = append(all, l.sw)
	}
	for _, nd := range l.nodes {
		all = append(all, nd.ns)
	}
	return all
}

// ip runs `ip [-n ns] -batch -` with the commands, one a line.
func (l *Lab) ip(ns string, cmds ...string) error { return runIP(l.ipPath, ns, false, cmds...) }

// runIP runs `ip [-n ns] -batch -`; with force, ip goes on past a failed
// line (and still reports the failure).
func runIP(ipPath, ns string, force bool, cmds ...string) error {
	var args []string
	if ns != "" {
		args = append(args, "-n", ns)
	}
	if force {
		args = append(args, "-force")
	}
	args = append(args, "-batch", "-")
	cmd := exec.Command(ipPath, args...)
	cmd.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		err = fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, msg)
		if strings.Contains(msg, "Unknown device type") || strings.Contains(msg, "not supported") {
			return fmt.Errorf("%w: %w", errUnsupported, err)
		}
		return err
	}
	return nil
}

// Prefix is the lab's name prefix; every namespace and link of the lab
// starts with it.
func (l *Lab) Prefix() string { return l.prefix }

// Subnet is the lab's /24.
func (l *Lab) Subnet() netip.Prefix { return l.subnet }

// N is the number of nodes.
func (l *Lab) N() int { return len(l.nodes) }

// Node returns node i (0-based).
func (l *Lab) Node(i int) *Node {
	l.t.Helper()
	l.checkNode(i)
	return l.nodes[i]
}

func (l *Lab) checkNode(i int) {
	l.t.Helper()
	if i < 0 || i >= len(l.nodes) {
		l.t.Fatalf("netlab: node %d out of range (lab has %d)", i, len(l.nodes))
	}
}

// track closes c at teardown; after teardown it closes c at once.
func (l *Lab) track(c io.Closer) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return errClosed
	}
	l.closers = append(l.closers, c)
	return nil
}

var errClosed = errors.New("netlab: lab is closed")

// Close tears the lab down: relays, sockets made by the Node helpers,
// processes left in its namespaces, the namespaces, the lock. New registers
// it with t.Cleanup; calling it earlier is allowed and it runs only once.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	relays, closers, cmds := l.relays, l.closers, l.cmds
	l.relays, l.closers, l.cmds = nil, nil, nil
	l.mu.Unlock()

	var errs []error
	for _, r := range relays {
		r.stop()
	}
	for _, c := range closers {
		c.Close() // the test may have closed it already
	}
	// A command started just now may still be ip, not yet in the
	// namespace, where the scan below would miss it: kill it by its pid.
	for _, cmd := range cmds {
		if cmd.Process != nil && cmd.Process.Kill() == nil {
			l.t.Logf("netlab: killed %s (pid %d), started with Command and not waited for", cmd.Args[4], cmd.Process.Pid)
		}
	}

	l.nsMu.Lock()
	l.nsClosed = true
	all := l.namespaces()
	var del []string
	for _, ns := range all {
		if _, err := os.Stat(filepath.Join(netnsDir, ns.name)); err != nil {
			continue // never created
		}
		del = append(del, "netns del "+ns.name)
		killed, err := killIn(ns.name)
		if err != nil {
			errs = append(errs, err)
		}
		for _, p := range killed {
			l.t.Logf("netlab: killed pid %d (%s) left running in %s", p.pid, p.comm, ns.name)
		}
	}
	for _, ns := range all {
		if ns.fd >= 0 {
			unix.Close(ns.fd)
			ns.fd = -1
		}
	}
	l.nsMu.Unlock()
	if len(del) > 0 {
		// Deleting the switch namespace destroys the bridge and every veth
		// pair, even while a node namespace lingers for a socket still open.
		if err := runIP(l.ipPath, "", true, del...); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ns := range all {
		if _, err := os.Stat(filepath.Join(netnsDir, ns.name)); err == nil {
			errs = append(errs, fmt.Errorf("netns %s still exists", ns.name))
		}
	}
	if l.lock != nil {
		os.Remove(l.lock.Name())
		l.lock.Close() // releases the flock
		l.lock = nil
	}
	return errors.Join(errs...)
}
