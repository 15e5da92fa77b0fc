package e2e

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/e2e/checker"
	"github.com/blockd/blockd/e2e/netlab"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/transport"
)

// Fault tests of replication: daemons in network namespaces, real kill
// -9, SIGSTOP, nftables partitions and loss. A writer checker runs in
// every scenario: after it, every acknowledged-and-flushed write must read
// back from the owner, and `volume verify` must find the in-sync replicas
// identical.

const replVolSize = 64 << 20

// replFlags are short timeouts, so that a dropped replica costs a second.
var replFlags = []string{"--repl-timeout", "500ms", "--repl-last-timeout", "1s"}

func createRepl(t *testing.T, owner *clusterNode, vol string, repl int, nodes ...string) {
	t.Helper()
	if _, err := owner.api().CreateVolume(api.Spec{Name: vol, Size: replVolSize, Repl: repl, Nodes: nodes, Profile: "none"}); err != nil {
		t.Fatal(err)
	}
}

// startRepl starts n nodes and creates volume v with repl copies owned by
// the first node, on the next repl-1 nodes.
func startRepl(t *testing.T, n, repl int, flags ...string) (*testCluster, []*clusterNode) {
	t.Helper()
	c := newTestCluster(t, n, append(replFlags, flags...)...)
	c.startAll()
	var others []string
	for _, o := range c.nodes[1:repl] {
		others = append(others, o.name)
	}
	createRepl(t, c.nodes[0], "v", repl, others...)
	return c, c.nodes
}

// mustDial opens an NBD connection to the node's volume, closed at the
// end of the test.
func (n *clusterNode) mustDial(vol string) *nbd.Client {
	n.c.t.Helper()
	c, err := n.dial(context.Background(), vol)
	if err != nil {
		n.c.t.Fatal(err)
	}
	n.c.t.Cleanup(func() { c.Close() })
	return c
}

func ownerDial(n *clusterNode, vol string) func(context.Context) (*nbd.Client, error) {
	return func(ctx context.Context) (*nbd.Client, error) { return n.dial(ctx, vol) }
}

// A replica killed with -9 under the checker: no write fails, nothing is
// lost; it returns and receives exactly the regions written while it was
// gone; the copies are identical.
func TestReplicaKill9(t *testing.T) {
	_, ns := startRepl(t, 2, 2)
	a, b := ns[0], ns[1]
	ck := checker.New(0, 2048, 4) // 8 MiB of blocks
	ctx, cancel := context.WithCancel(context.Background())
	done := runChecker(ctx, ck, ownerDial(a, "v"))
	waitFlushes(t, ck, 8)
	b.kill9()
	a.waitState("v", b.name, api.ReplicaUnreachable, 10*time.Second)
	time.Sleep(500 * time.Millisecond)
	cancel()
	<-done
	if ck.Errors.Load() != 0 {
		t.Fatalf("%d writes failed (first: %v); a replica's death must not fail I/O", ck.Errors.Load(), ck.FirstError())
	}
	left := a.volume("v").Replicas[0].BytesLeft
	b.start()
	st := a.waitInSync("v", 30*time.Second).Replicas[0]
	// Nothing was written after the checker stopped: the resync copies
	// exactly what the bitmap marked.
	if st.CopiedBytes != left || left == 0 {
		t.Errorf("resync copied %d bytes; %d were marked while the replica was gone", st.CopiedBytes, left)
	}
	t.Logf("resync copied %d bytes (%d regions of 64KiB)", st.CopiedBytes, st.CopiedBytes/(64<<10))
	verifyChecker(t, ck, a, "v")
	a.verify("v")
}

// fio with verification runs through a replica's kill -9: no error.
func TestReplicaKill9UnderFio(t *testing.T) {
	need(t, "fio")
	_, ns := startRepl(t, 2, 2)
	a, b := ns[0], ns[1]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fio := exec.CommandContext(ctx, "fio", "--name=verify", "--ioengine=nbd",
		"--uri=nbd+unix:///v?socket="+a.nbdSock(), "--rw=randwrite", "--bs=4k", "--size=16M",
		"--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--fsync=32",
		"--verify_state_save=0", "--randseed=7", "--output-format=terse")
	fio.Dir = t.TempDir()
	var out bytes.Buffer
	fio.Stdout, fio.Stderr = &out, &out
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	b.kill9()
	if err := fio.Wait(); err != nil || strings.Contains(out.String(), "verify:") {
		t.Fatalf("fio with a replica killed: %v\n%s", err, out.String())
	}
	b.start()
	a.waitInSync("v", 30*time.Second)
	a.verify("v")
}

// A replica partitioned away mid-workload and healed: the same.
func TestReplicaPartition(t *testing.T) {
	c, ns := startRepl(t, 2, 2)
	a, b := ns[0], ns[1]
	ck := checker.New(0, 2048, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := runChecker(ctx, ck, ownerDial(a, "v"))
	time.Sleep(300 * time.Millisecond)
	c.lab.Partition(0, 1)
	a.waitState("v", b.name, api.ReplicaUnreachable, 10*time.Second)
	time.Sleep(500 * time.Millisecond)
	c.lab.Heal(0, 1)
	a.waitInSync("v", 30*time.Second)
	time.Sleep(300 * time.Millisecond)
	cancel()
	<-done
	if ck.Errors.Load() != 0 {
		t.Fatalf("%d writes failed (first: %v)", ck.Errors.Load(), ck.FirstError())
	}
	a.waitInSync("v", 30*time.Second)
	verifyChecker(t, ck, a, "v")
	a.verify("v")
}

// 5% packet loss on a replica: writes go on (QUIC retransmits) within a
// bounded latency. Then the replica's answers are dropped (ack-only): it
// is dropped from the in-sync set once, not again and again, and the
// other replica stays in sync: never the last copy.
func TestReplicaLossAndAckDrop(t *testing.T) {
	c, ns := startRepl(t, 3, 3)
	a, b, cc := ns[0], ns[1], ns[2]
	dev := a.mustDial("v")
	c.lab.Loss(1, 5)
	var worst time.Duration
	buf := bytes.Repeat([]byte{0x5a}, 4096)
	for i := 0; i < 400; i++ {
		start := time.Now()
		if _, err := dev.WriteAt(buf, int64(i%1024)*4096); err != nil {
			t.Fatalf("write %d under 5%% loss: %v", i, err)
		}
		worst = max(worst, time.Since(start))
	}
	c.lab.ClearLoss(1)
	t.Logf("worst write latency under 5%% loss: %s", worst)
	if worst > 1500*time.Millisecond {
		t.Errorf("a write took %s under 5%% loss", worst)
	}
	gen := a.volume("v").Replication.Generation
	// b's answers (from its replication port) never reach a.
	c.lab.DropOneWay(1, 0, netlab.Selector{Proto: "udp", SrcPort: 10810})
	for i := 0; i < 200; i++ {
		if _, err := dev.WriteAt(buf, int64(i%1024)*4096); err != nil {
			t.Fatalf("write %d with b's acks dropped: %v", i, err)
		}
	}
	v := a.volume("v")
	for _, r := range v.Replicas {
		switch r.Node {
		case b.name:
			if r.State == api.ReplicaInSync {
				t.Errorf("b is in sync although its answers are dropped")
			}
		case cc.name:
			if r.State != api.ReplicaInSync {
				t.Errorf("c left the in-sync set: %+v", r)
			}
		}
	}
	if drops := logCount(a, `msg="replica dropped from the in-sync set`); drops != 1 || v.Replication.Generation != gen+1 {
		t.Errorf("%d drops, generation %d -> %d; want one drop", drops, gen, v.Replication.Generation)
	}
	c.lab.HealAll()
	a.waitInSync("v", 30*time.Second)
	a.verify("v")
}

// The link is cut several times during the resync of 256 MiB of changes:
// progress never goes back, and the copies end identical.
func TestResyncSurvivesCuts(t *testing.T) {
	c := newTestCluster(t, 2, append(replFlags, "--resync-rate", "96MiB", "--resync-min-rate", "0")...)
	c.startAll()
	a, b := c.nodes[0], c.nodes[1]
	if _, err := a.api().CreateVolume(api.Spec{Name: "v", Size: 512 << 20, Repl: 2, Profile: "none"}); err != nil {
		t.Fatal(err)
	}
	b.stop()
	dev, err := a.dial(context.Background(), "v")
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("resync me "), 104858)[:1<<20]
	for i := 0; i < 256; i++ {
		chunk[0] = byte(i)
		if _, err := dev.WriteAt(chunk, int64(i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	dev.Flush()
	dev.Close()
	b.start()
	a.waitState("v", b.name, api.ReplicaResyncing, 20*time.Second)
	prev := int64(1 << 62)
	cuts := 0
	deadline := time.Now().Add(2 * time.Minute)
	for {
		v := a.volume("v")
		r := v.Replicas[0]
		if r.State == api.ReplicaInSync {
			break
		}
		if r.State == api.ReplicaResyncing && r.BytesLeft > prev {
			t.Fatalf("resync went back: %d bytes left, %d before", r.BytesLeft, prev)
		}
		if r.BytesLeft > 0 {
			prev = min(prev, r.BytesLeft)
		}
		if cuts < 3 && r.BytesLeft < (256-64*int64(cuts+1))<<20 {
			c.lab.Partition(0, 1)
			time.Sleep(1500 * time.Millisecond)
			c.lab.Heal(0, 1)
			cuts++
		}
		if time.Now().After(deadline) {
			t.Fatalf("not in sync after 2 minutes: %+v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if cuts < 2 {
		t.Errorf("only %d cuts landed during the resync", cuts)
	}
	st := a.volume("v").Replicas[0]
	t.Logf("resync of 256MiB with %d cuts copied %d bytes", cuts, st.CopiedBytes)
	if st.CopiedBytes > 300<<20 {
		t.Errorf("copied %d bytes for 256MiB of changes: restarts from zero?", st.CopiedBytes)
	}
	a.verify("v")
}

// The owner dies with writes in flight; a replica is promoted: every
// acknowledged-and-flushed write is on it. The old owner comes back: it is
// fenced (the replicas refuse its epoch) and resyncs as a replica.
func TestOwnerKillPromote(t *testing.T) {
	_, ns := startRepl(t, 3, 3)
	a, b := ns[0], ns[1]
	ck := checker.New(0, 2048, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := runChecker(ctx, ck, ownerDial(a, "v"))
	waitFlushes(t, ck, 8)
	a.kill9()
	cancel()
	<-done
	start := time.Now()
	if _, err := b.api().Promote("v", false); err != nil {
		t.Fatalf("promote on %s: %v", b.name, err)
	}
	t.Logf("promote took %s", time.Since(start))
	verifyChecker(t, ck, b, "v")
	// New writes on the new owner.
	ck2 := checker.New(16<<20, 512, 2) // past ck's 8 MiB
	ctx2, cancel2 := context.WithTimeout(context.Background(), 500*time.Millisecond)
	<-runChecker(ctx2, ck2, ownerDial(b, "v"))
	cancel2()
	a.start()
	// a finds it was replaced: a replica of b, resynced.
	b.waitInSync("v", 60*time.Second)
	if v := a.volume("v"); v.Replication.Role != api.RoleReplica || v.Replication.Owner != b.name {
		t.Fatalf("the old owner after its return: %+v", v.Replication)
	}
	verifyChecker(t, ck, b, "v")
	verifyChecker(t, ck2, b, "v")
	b.verify("v")
}

// The owner is paused (SIGSTOP) with a write queued; another node is
// promoted and writes; the old owner resumes: its write is refused by the
// replicas and lands nowhere.
func TestPausedOwnerFenced(t *testing.T) {
	_, ns := startRepl(t, 3, 3)
	a, b := ns[0], ns[1]
	old := a.mustDial("v")
	orig := bytes.Repeat([]byte{0x11}, 4096)
	if _, err := old.WriteAt(orig, 0); err != nil {
		t.Fatal(err)
	}
	old.Flush()
	a.signal(syscall.SIGSTOP)
	stale := bytes.Repeat([]byte{0xee}, 4096)
	res := make(chan error, 1)
	go func() { _, err := old.WriteAt(stale, 0); res <- err }() // sits in a's socket
	if _, err := b.api().Promote("v", false); err != nil {
		t.Fatalf("promote while the owner is paused: %v", err)
	}
	fresh := bytes.Repeat([]byte{0x22}, 4096)
	nb := b.mustDial("v")
	if _, err := nb.WriteAt(fresh, 4096); err != nil {
		t.Fatal(err)
	}
	nb.Flush()
	a.signal(syscall.SIGCONT)
	select {
	case err := <-res:
		if err == nil {
			t.Fatal("the paused owner acknowledged a write after another node took over")
		}
		t.Logf("the old owner's write after SIGCONT: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the old owner's write neither completed nor failed within 30s")
	}
	got := make([]byte, 4096)
	if _, err := nb.ReadAt(got, 0); err != nil || !bytes.Equal(got, orig) {
		t.Fatalf("block 0 on the new owner: %x..., %v; the fenced write must not land", got[:4], err)
	}
	b.waitInSync("v", 60*time.Second)
	b.verify("v")
}

// A node whose certificate names another node, or comes from another CA,
// and plain traffic are refused: nothing reaches the replica service.
func TestReplicationRefusesStrangers(t *testing.T) {
	for _, tc := range []struct{ name, node string }{{"WrongName", "n9"}, {"WrongCA", "n2"}} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestCluster(t, 2, replFlags...)
			a, b := c.nodes[0], c.nodes[1]
			ca, err := transport.GenerateCA("blockd-test-ca", time.Hour) // the same CA name, not the same CA
			if err != nil {
				t.Fatal(err)
			}
			caFile := filepath.Join(c.certs, "ca.crt")
			if tc.name == "WrongCA" {
				pem, _, _ := ca.PEM()
				caFile = filepath.Join(c.certs, "other-ca.crt")
				writeFile(t, caFile, pem)
			} else {
				ca = c.ca
			}
			cert, err := ca.Issue(tc.node, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			crt, key, _ := transport.CertPEM(cert)
			writeFile(t, filepath.Join(c.certs, "stranger.crt"), crt)
			writeFile(t, filepath.Join(c.certs, "stranger.key"), key)
			// b runs as tc.node with that certificate; a knows it as n2.
			b.args = []string{"--node", tc.node, "--tls-ca", caFile,
				"--tls-cert", filepath.Join(c.certs, "stranger.crt"), "--tls-key", filepath.Join(c.certs, "stranger.key")}
			a.start()
			b.start()
			_, err = a.api().CreateVolume(api.Spec{Name: "v", Size: replVolSize, Repl: 2})
			if err == nil {
				t.Fatal("a replica was made on a stranger")
			}
			t.Logf("create with a stranger: %v", err)
			if vs, err := b.api().ListVolumes(); err != nil || len(vs) != 0 {
				t.Fatalf("the stranger holds copies: %v %v", vs, err)
			}
			if !strings.Contains(a.log.String(), "refused") {
				t.Errorf("a logged no refusal:\n%s", a.log)
			}
			// Plain UDP garbage and TCP to the replication port.
			if conn, err := c.lab.Node(1).Dial("udp", a.ip()+":"+replPort); err == nil {
				conn.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
				conn.Close()
			}
			if tc, err := c.lab.Node(1).Dial("tcp", a.ip()+":"+replPort); err == nil {
				tc.Close()
				t.Error("the replication port accepts TCP")
			}
			if _, err := a.api().ListVolumes(); err != nil {
				t.Fatalf("a after garbage: %v", err)
			}
		})
	}
}

// A node whose certificate does not name it refuses to start, saying so.
func TestReplicationCertMustNameNode(t *testing.T) {
	c := newTestCluster(t, 2, replFlags...)
	b := c.nodes[1]
	b.args = []string{"--tls-cert", filepath.Join(c.certs, "n1.crt"), "--tls-key", filepath.Join(c.certs, "n1.key")}
	b.cmd = nil
	out, err := b.startExpectingExit()
	if err == nil || !strings.Contains(out, `certificate names "n1", not node "n2"`) {
		t.Fatalf("start with another node's certificate: %v\n%s", err, out)
	}
}
