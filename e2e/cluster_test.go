package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cluster/etcdtest"
	"github.com/blockd/blockd/e2e/checker"
	"github.com/blockd/blockd/e2e/netlab"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/transport"
)

// testCluster is blockd daemons on the nodes of a network lab, each in
// its own network namespace, joined by replication over QUIC with a
// cluster CA of the test's. Clients reach a node's volumes through its
// NBD unix socket (the file system is shared), its API through its API
// socket.
type testCluster struct {
	t     testing.TB
	lab   *netlab.Lab
	nodes []*clusterNode
	certs string
	ca    *transport.CA
	// flags every daemon runs with, after the common ones.
	flags []string
	// etcd, if set, joins the daemons to a cluster through an etcd on
	// lab node 0 (the daemons are lab nodes 1..n then).
	etcd *etcdNode
}

// etcdNode is the etcd of a cluster test, alone on lab node 0.
type etcdNode struct {
	url string
	cmd *exec.Cmd
	log *syncBuffer
}

const etcdLabNode = 0

type clusterNode struct {
	c    *testCluster
	i    int
	name string
	dir  string
	cmd  *exec.Cmd
	log  *syncBuffer
	args []string // extra serve flags of this node
	// peerAddr overrides where this node reaches a peer (a relay).
	peerAddr map[string]string
}

const replPort = "10810"

func newTestCluster(t testing.TB, n int, flags ...string) *testCluster {
	t.Helper()
	return newLabCluster(t, n, 0, flags)
}

// newEtcdCluster is n daemons joined through a real etcd (lab node 0)
// with serve --cluster: they learn each other from it, no --peer flags.
func newEtcdCluster(t testing.TB, n int, flags ...string) *testCluster {
	t.Helper()
	c := newLabCluster(t, n, 1, flags)
	e := &etcdNode{log: &syncBuffer{}}
	node := c.lab.Node(etcdLabNode)
	e.url = "http://" + node.IP() + ":2379"
	e.cmd = node.Command(context.Background(), etcdtest.Binary(t), etcdtest.Args("e2e", t.TempDir(), e.url, "http://"+node.IP()+":2380")...)
	e.cmd.Stdout, e.cmd.Stderr = e.log, e.log
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.cmd.Process.Kill()
		e.cmd.Wait()
		if t.Failed() {
			t.Logf("etcd's log:\n%s", e.log)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		conn, err := node.Dial("tcp", node.IP()+":2379")
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd did not listen within 20s: %v\n%s", err, e.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.etcd = e
	return c
}

func newLabCluster(t testing.TB, n, first int, flags []string) *testCluster {
	t.Helper()
	c := &testCluster{t: t, lab: netlab.New(t, n+first, netlab.Options{}), certs: t.TempDir(), flags: flags}
	ca, err := transport.GenerateCA("blockd-test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c.ca = ca
	caPEM, _, err := ca.PEM()
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(c.certs, "ca.crt"), caPEM)
	for i := 0; i < n; i++ {
		nd := &clusterNode{c: c, i: i + first, name: fmt.Sprintf("n%d", i+1), dir: t.TempDir(), log: &syncBuffer{}}
		c.nodes = append(c.nodes, nd)
		cert, err := ca.Issue(nd.name, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		crt, key, err := transport.CertPEM(cert)
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(c.certs, nd.name+".crt"), crt)
		writeFile(t, filepath.Join(c.certs, nd.name+".key"), key)
	}
	t.Cleanup(func() {
		for _, nd := range c.nodes {
			if nd.cmd != nil && nd.cmd.ProcessState == nil {
				nd.cmd.Process.Signal(syscall.SIGCONT)
				nd.cmd.Process.Kill()
				nd.cmd.Wait()
			}
			if t.Failed() {
				t.Logf("log of %s:\n%s", nd.name, nd.log)
			}
		}
	})
	return c
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (n *clusterNode) ip() string       { return n.c.lab.Node(n.i).IP() }
func (n *clusterNode) sock() string     { return filepath.Join(n.dir, "blockd.sock") }
func (n *clusterNode) nbdSock() string  { return filepath.Join(n.dir, "nbd.sock") }
func (n *clusterNode) api() *api.Client { return api.NewClient(n.sock()) }

// start runs the node's daemon and waits until its API answers.
func (n *clusterNode) start() {
	t := n.c.t
	t.Helper()
	n.cmd = n.command()
	fmt.Fprintf(n.log, "=== start %s\n", time.Now().Format(time.TimeOnly))
	n.cmd.Stdout, n.cmd.Stderr = n.log, n.log
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for n.api().Health() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not come up in 20s:\n%s", n.name, n.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startExpectingExit runs the node's daemon to its end (within 20s) and
// returns its output.
func (n *clusterNode) startExpectingExit() (string, error) {
	cmd := n.command()
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
		return string(out), err
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		return string(out), fmt.Errorf("still running after 20s")
	}
}

func (n *clusterNode) command() *exec.Cmd {
	args := []string{"serve", "--state-dir", n.dir, "--kernel-devices=false", "--probes", "off",
		"--nbd-listen", "", "--nbd-socket", n.nbdSock(), "--metrics-listen", "",
		"--node", n.name, "--repl-listen", n.ip() + ":" + replPort,
		"--tls-ca", filepath.Join(n.c.certs, "ca.crt"),
		"--tls-cert", filepath.Join(n.c.certs, n.name+".crt"), "--tls-key", filepath.Join(n.c.certs, n.name+".key")}
	if n.c.etcd != nil {
		args = append(args, "--cluster", "etcd="+n.c.etcd.url, "--label", "zone=z"+strconv.Itoa(n.i))
	}
	for _, o := range n.c.nodes {
		if o != n && n.c.etcd == nil {
			addr := o.ip() + ":" + replPort
			if a := n.peerAddr[o.name]; a != "" {
				addr = a
			}
			args = append(args, "--peer", o.name+"="+addr)
		}
	}
	args = append(append(args, n.c.flags...), n.args...)
	cmd := n.c.lab.Node(n.i).Command(context.Background(), os.Args[0], args...)
	cmd.Env = append(os.Environ(), "BLOCKD_TEST_AS_DAEMON=1")
	return cmd
}

func (n *clusterNode) kill9() {
	n.cmd.Process.Signal(syscall.SIGCONT) // a stopped process dies too
	n.cmd.Process.Kill()
	n.cmd.Wait()
	fmt.Fprintf(n.log, "=== killed %s\n", time.Now().Format(time.TimeOnly))
}

func (n *clusterNode) stop() {
	n.cmd.Process.Signal(syscall.SIGTERM)
	if err := n.cmd.Wait(); err != nil {
		n.c.t.Fatalf("%s exited with %v after SIGTERM:\n%s", n.name, err, n.log)
	}
}

func (n *clusterNode) signal(s syscall.Signal) {
	if err := n.cmd.Process.Signal(s); err != nil {
		n.c.t.Fatal(err)
	}
}

// dial opens an NBD connection to the node's volume.
func (n *clusterNode) dial(ctx context.Context, vol string) (*nbd.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return nbd.Dial(ctx, "unix", n.nbdSock(), vol)
}

func (c *testCluster) startAll() {
	for _, n := range c.nodes {
		n.start()
	}
}

// volume returns node n's view of vol.
func (n *clusterNode) volume(vol string) api.Volume {
	n.c.t.Helper()
	v, err := n.api().GetVolume(vol)
	if err != nil {
		n.c.t.Fatalf("%s: get %s: %v", n.name, vol, err)
	}
	return v
}

// waitInSync waits until every replica of vol on its owner n is in sync.
func (n *clusterNode) waitInSync(vol string, within time.Duration) api.Volume {
	n.c.t.Helper()
	deadline := time.Now().Add(within)
	for {
		v, err := n.api().GetVolume(vol)
		if err == nil && len(v.Replicas) > 0 {
			all := true
			for _, r := range v.Replicas {
				all = all && r.State == api.ReplicaInSync
			}
			if all {
				return v
			}
		}
		if time.Now().After(deadline) {
			n.c.t.Fatalf("%s: %s not in sync within %s: %+v %v", n.name, vol, within, v.Replicas, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitState waits until replica node's state on owner n is state.
func (n *clusterNode) waitState(vol, replica, state string, within time.Duration) api.ReplicaStatus {
	n.c.t.Helper()
	deadline := time.Now().Add(within)
	for {
		if v, err := n.api().GetVolume(vol); err == nil {
			for _, r := range v.Replicas {
				if r.Node == replica && r.State == state {
					return r
				}
			}
		}
		if time.Now().After(deadline) {
			n.c.t.Fatalf("%s: replica %s of %s not %s within %s: %+v", n.name, replica, vol, state, within, n.volume(vol).Replicas)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// verify runs `volume verify` on the owner and fails on any difference.
func (n *clusterNode) verify(vol string) {
	n.c.t.Helper()
	res, err := n.api().Verify(vol)
	if err != nil || !res.OK {
		n.c.t.Fatalf("%s: verify %s: %+v %v", n.name, vol, res, err)
	}
}

// runChecker drives the checker against the node that dial picks, until
// ctx ends.
func runChecker(ctx context.Context, ck *checker.Checker, dial func(ctx context.Context) (*nbd.Client, error)) chan struct{} {
	done := make(chan struct{})
	go func() { // owned by the test: it waits on done
		defer close(done)
		ck.Run(ctx, checker.Options{FlushEvery: 8, Dial: func(ctx context.Context, _ int) (checker.Device, error) {
			c, err := dial(ctx)
			if err != nil {
				return nil, err
			}
			return c, nil
		}})
	}()
	return done
}

// waitFlushes waits until the checker's writers have n acknowledged
// FLUSHes behind them (a fixed sleep is not enough on a loaded machine).
func waitFlushes(t *testing.T, ck *checker.Checker, n int64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for ck.Flushes.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the checker made %d flushes in 30s, want %d (errors %d: %v)", ck.Flushes.Load(), n, ck.Errors.Load(), ck.FirstError())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// verifyChecker reads every checker block through node n's volume.
func verifyChecker(t *testing.T, ck *checker.Checker, n *clusterNode, vol string) {
	t.Helper()
	c, err := n.dial(context.Background(), vol)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rep, err := ck.Verify(c)
	if err != nil || rep.Lost != 0 || rep.Flushed == 0 {
		t.Fatalf("checker against %s: %v, %v", n.name, rep, err)
	}
	t.Logf("checker: %d writes, %d acknowledged, %d flushes, %d errors; %s", ck.Writes.Load(), ck.Acks.Load(), ck.Flushes.Load(), ck.Errors.Load(), rep)
}

func logCount(n *clusterNode, s string) int { return strings.Count(n.log.String(), s) }
