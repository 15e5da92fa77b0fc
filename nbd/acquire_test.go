package nbd

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// acquiring is an export set whose exports must be taken before use, as a
// cluster volume's ownership is.
type acquiring struct {
	exportSet
	calls atomic.Int64
}

var errOwnedElsewhere = errors.New("volume v is owned by node n2")

func (a *acquiring) Acquire(name string) (Export, error) {
	a.calls.Add(1)
	switch name {
	case "free":
		return a.exportSet[name], nil
	case "owned":
		return nil, errOwnedElsewhere
	}
	return nil, errors.New("no such volume")
}

func (a *acquiring) NotFound(err error) bool { return !errors.Is(err, errOwnedElsewhere) }

// NBD_OPT_GO takes an export through Acquire, and a refusal's text
// reaches the client; listing and NBD_OPT_INFO only look exports up.
func TestAcquirer(t *testing.T) {
	free, _ := memExport(t, 1<<20)
	owned, _ := memExport(t, 1<<20)
	a := &acquiring{exportSet: exportSet{"free": free, "owned": owned}}
	_, addr := startServer(t, a, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "tcp", addr, "free")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	_, err = Dial(ctx, "tcp", addr, "owned")
	if err == nil || !strings.Contains(err.Error(), "owned by node n2") || !strings.Contains(err.Error(), "0x80000002") {
		t.Fatalf("dial of a volume owned elsewhere: %v; want the refusal's text with NBD_REP_ERR_POLICY", err)
	}
	_, err = Dial(ctx, "tcp", addr, "gone")
	if err == nil || !strings.Contains(err.Error(), "0x80000006") {
		t.Fatalf("dial of an unknown volume: %v; want NBD_REP_ERR_UNKNOWN", err)
	}
	if n := a.calls.Load(); n != 3 {
		t.Fatalf("Acquire called %d times, want 3", n)
	}
	rc := dialRaw(t, addr)
	rc.greet(clientFixedNewstyle | clientNoZeroes)
	rc.sendOpt(optInfo, infoGoData("owned"))
	if infos := rc.readInfos(optInfo); len(infos) == 0 {
		t.Fatal("NBD_OPT_INFO of an export owned elsewhere found nothing")
	}
	if n := a.calls.Load(); n != 3 {
		t.Fatalf("NBD_OPT_INFO called Acquire (%d calls)", n)
	}
}
