package profile

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
)

// vmRSS returns the process's resident set size in bytes.
func vmRSS() (int64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS in /proc/self/status")
}

// TestRSS measures the process's RSS with 200 sequential stages over
// memory engines read sequentially at once, before, during and after the
// load, and while they idle. It is a measurement, not a check: it runs
// only with BLOCKD_PROFILE_RSS=1 (go test -run TestRSS -v ./profile/).
func TestRSS(t *testing.T) {
	if os.Getenv("BLOCKD_PROFILE_RSS") == "" {
		t.Skip("set BLOCKD_PROFILE_RSS=1 to measure")
	}
	const (
		stages = 200
		size   = 256 << 20
		load   = 10 * time.Second
	)
	rss := func() string {
		n, err := vmRSS()
		if err != nil {
			t.Fatal(err)
		}
		return mib(n)
	}
	hs := make([]pipeline.Handler, stages)
	sts := make([]*Stage, stages)
	for i := range sts {
		e, _ := ioengine.NewMemory(size)
		sts[i] = New(Sequential, rssOptions(Options{Size: e.Size}))
		hs[i] = sts[i].Wrap(ioengine.Handler(e))
	}
	defer func() {
		for _, st := range sts {
			st.Close()
		}
	}()
	t.Logf("before load: RSS %s", rss())
	var (
		stop atomic.Bool
		peak atomic.Int64
		wg   sync.WaitGroup
	)
	for i, h := range hs {
		wg.Go(func() {
			buf := make([]byte, 128<<10)
			pos := int64(i) * (1 << 20) % size
			for !stop.Load() {
				r := pipeline.Request{Op: pipeline.OpRead, Offset: pos, Length: uint32(len(buf)), Buf: buf}
				if err := h.Handle(context.Background(), &r); err != nil {
					t.Error(err)
					return
				}
				pos = (pos + int64(len(buf))) % size
			}
		})
	}
	sampler := make(chan struct{})
	go func() {
		defer close(sampler)
		for !stop.Load() {
			if n, err := vmRSS(); err == nil && n > peak.Load() {
				peak.Store(n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	time.Sleep(load)
	during := rss()
	stop.Store(true)
	wg.Wait()
	<-sampler
	t.Logf("during load (%v, %d stages reading): RSS %s, peak %s%s", load, stages, during, mib(peak.Load()), rssStats())
	idle := time.Now()
	for _, mark := range []time.Duration{0, time.Second, 3 * time.Second, 5 * time.Second, 15 * time.Second} {
		time.Sleep(time.Until(idle.Add(mark)))
		t.Logf("idle %2.0fs: RSS %s%s", mark.Seconds(), rss(), rssStats())
	}
}

func mib(n int64) string { return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB" }

// rssBudget is TestRSS's budget: 256 MiB, or BLOCKD_PROFILE_RSS_BUDGET_MB
// (0: none, each stage on its own).
var rssBudget = sync.OnceValue(func() *Budget {
	mb := int64(256)
	if v := os.Getenv("BLOCKD_PROFILE_RSS_BUDGET_MB"); v != "" {
		mb, _ = strconv.ParseInt(v, 10, 64)
	}
	if mb == 0 {
		return nil
	}
	return NewBudget(mb << 20)
})

func rssOptions(o Options) Options {
	o.Budget = rssBudget()
	return o
}

func rssStats() string {
	if b := rssBudget(); b != nil {
		s := b.Stats()
		return fmt.Sprintf(" (budget: limit %d MiB, in use %d MiB, high water %d MiB, %d denials)", s.Limit>>20, s.InUse>>20, s.HighWater>>20, s.Denials)
	}
	return " (no budget)"
}
