package replication_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/replication"
)

// A new repl-3 volume: its copies are made empty and in sync, and every
// write, trim, write-zeroes and flush reaches both before it completes.
func TestReplicatesEveryOp(t *testing.T) {
	c := newCluster(t, "b", "c")
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(8192, 1))
	c.write(1<<20, pattern(64<<10, 2))
	if err := c.do(pipeline.OpTrim, 4096, nil, 4096); err != nil {
		t.Fatal(err)
	}
	if err := c.do(pipeline.OpWriteZeroes, 1<<20+512, nil, 1024); err != nil {
		t.Fatal(err)
	}
	r := pipeline.Request{Op: pipeline.OpWrite, Flags: pipeline.FlagFUA, Offset: 2 << 20, Length: 4096, Buf: pattern(4096, 3)}
	if err := c.handler.Handle(context.Background(), &r); err != nil {
		t.Fatal(err)
	}
	c.flush()
	c.same("b")
	c.same("c")
	for _, st := range c.rep.Status() {
		if st.State != api.ReplicaInSync {
			t.Fatalf("%s is %s", st.Node, st.State)
		}
	}
	if s := c.savedState(); s.Generation != 1 || !s.Replicas[0].InSync || !s.Replicas[1].InSync {
		t.Fatalf("state changed by healthy writes: %+v", s)
	}
}

// A replica that stops answering is dropped after the timeout, the new
// in-sync set and generation are persisted before the write completes,
// its missed regions are recorded, and when it returns it gets exactly
// those regions and is in sync again.
func TestDropAndDeltaResync(t *testing.T) {
	c := newCluster(t, "b", "c")
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(testSize, 9)) // the whole volume, everywhere
	c.flush()
	c.net.SetDown("b", true)
	start := time.Now()
	c.write(64<<10, pattern(4096, 10)) // region 1
	if d := time.Since(start); d < c.node.Timeout {
		t.Fatalf("the write completed in %s, before b's timeout", d)
	}
	s := c.savedState()
	if s.Replicas[0].InSync || !s.Replicas[1].InSync || s.Generation != 2 {
		t.Fatalf("after b timed out: %+v", s)
	}
	if g := c.copies["c"].copies["v"].Replication().Generation; g != 2 {
		t.Fatalf("c was not told the new generation: %d", g)
	}
	// Out of sync: writes go on at full speed, recorded for b.
	start = time.Now()
	c.write(3*64<<10+100, pattern(64<<10, 11)) // regions 3 and 4
	c.write(10*64<<10, pattern(1, 12))         // region 10
	if d := time.Since(start); d > c.node.Timeout {
		t.Fatalf("writes waited %s for a dropped replica", d)
	}
	c.flush()
	c.same("c")
	copiedBefore := c.rep.CopiedBytes("b")
	c.net.SetDown("b", false)
	c.waitState("b", api.ReplicaInSync, 5*time.Second)
	copied := c.rep.CopiedBytes("b") - copiedBefore
	if want := int64(4 * 64 << 10); copied != want {
		t.Errorf("resync copied %d bytes, want %d (regions 1, 3, 4, 10)", copied, want)
	}
	c.same("b")
	if s := c.savedState(); !s.Replicas[0].InSync || s.Generation != 3 {
		t.Fatalf("after resync: %+v", s)
	}
}

// The last in-sync replica gets the longer timeout before it is dropped.
func TestLastReplicaLongerTimeout(t *testing.T) {
	c := newCluster(t, "b")
	c.start(newVolumeState("b"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.net.SetDown("b", true)
	start := time.Now()
	c.write(0, pattern(4096, 1))
	if d := time.Since(start); d < c.node.LastTimeout {
		t.Fatalf("the last replica was dropped after %s, before LastTimeout %s", d, c.node.LastTimeout)
	}
	if s := c.savedState(); s.Replicas[0].InSync {
		t.Fatalf("not dropped: %+v", s)
	}
}

// A replica that knows a higher epoch fences the owner: the write fails,
// every later request fails, and the daemon is told.
func TestStaleEpochFences(t *testing.T) {
	c := newCluster(t, "b", "c")
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(4096, 1))
	// Another node took over at epoch 5 (it told b).
	cp := c.copies["b"].copies["v"]
	r := cp.Replication()
	r.Epoch, r.Owner = 5, "x"
	cp.SetReplication(r)
	err := c.do(pipeline.OpWrite, 8192, pattern(4096, 2), 0)
	if !errors.Is(err, replication.ErrFenced) {
		t.Fatalf("write after a newer owner appeared: %v, want ErrFenced", err)
	}
	select {
	case e := <-c.fenced:
		if e != 5 {
			t.Fatalf("fenced with epoch %d, want 5", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnFenced never called")
	}
	if err := c.do(pipeline.OpWrite, 0, pattern(4096, 3), 0); !errors.Is(err, replication.ErrFenced) {
		t.Fatalf("later write: %v", err)
	}
	if err := c.do(pipeline.OpFlush, 0, nil, 0); !errors.Is(err, replication.ErrFenced) {
		t.Fatalf("later flush: %v", err)
	}
	// The fenced write never reached the replica that refused it.
	got := make([]byte, 4096)
	c.copies["b"].engine("v").ReadAt(got, 8192)
	if !isZero(got) {
		t.Fatal("a write refused for its epoch landed on b")
	}
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// A replica whose copy is gone (a new node) has no history: its resync
// compares checksums and sends only the regions that differ; holes are
// not read.
func TestCompareResyncSendsOnlyDifferences(t *testing.T) {
	c := newCluster(t, "b")
	c.start(newVolumeState("b"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(256<<10, 1)) // regions 0..3
	c.write(1<<20, pattern(64<<10, 2))
	c.flush()
	// b loses its copy; a fresh one appears (a replacement node).
	c.net.SetDown("b", true)
	c.copies["b"].DeleteCopy("v")
	c.write(2<<20, pattern(4096, 3)) // dropped after the timeout, region 32 marked
	c.net.SetDown("b", false)
	c.waitState("b", api.ReplicaInSync, 5*time.Second)
	c.same("b")
	// Every region with data differs from the empty copy: 0..3, 16, 32.
	if got, want := c.rep.CopiedBytes("b"), int64(6*64<<10); got != want {
		t.Errorf("copied %d bytes, want %d", got, want)
	}
	if s := c.savedState(); s.Replicas[0].Compare {
		t.Errorf("compare mode left on after the resync: %+v", s)
	}
}

// Writers racing on overlapping ranges while a replica drops out and
// resyncs: every copy ends identical to the owner.
func TestConcurrentWritesWithResync(t *testing.T) {
	c := newCluster(t, "b", "c")
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((w*7919+i*104729)%(testSize/512-64)) * 512
				var err error
				switch i % 7 {
				case 5:
					err = c.do(pipeline.OpTrim, off, nil, 8192)
				case 6:
					err = c.do(pipeline.OpFlush, 0, nil, 0)
				default:
					err = c.do(pipeline.OpWrite, off, pattern(512*(1+i%16), uint64(w*1000+i)), 0)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	time.Sleep(100 * time.Millisecond)
	c.net.SetDown("c", true)
	time.Sleep(300 * time.Millisecond)
	c.net.SetDown("c", false)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	c.waitState("c", api.ReplicaInSync, 10*time.Second)
	c.same("b")
	c.same("c")
}

// Verify finds no difference between in-sync copies, and names the
// regions of one that was changed behind the owner's back.
func TestVerify(t *testing.T) {
	c := newCluster(t, "b", "c")
	c.start(newVolumeState("b", "c"), true)
	if err := c.rep.CreateReplicas(); err != nil {
		t.Fatal(err)
	}
	c.write(0, pattern(1<<20, 5))
	c.flush()
	for _, res := range c.rep.Verify(context.Background()) {
		if res.Error != "" || len(res.Differ) != 0 || res.Compared != testSize {
			t.Fatalf("healthy copies: %+v", res)
		}
	}
	c.copies["c"].engine("v").WriteAt([]byte("bit rot"), 3*64<<10+17)
	for _, res := range c.rep.Verify(context.Background()) {
		switch res.Node {
		case "b":
			if len(res.Differ) != 0 {
				t.Errorf("b: %+v", res)
			}
		case "c":
			if len(res.Differ) != 1 || res.Differ[0] != 3 {
				t.Errorf("c: differing regions %v, want [3]", res.Differ)
			}
		}
	}
}
