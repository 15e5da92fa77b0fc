package attach

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/kernel/nbdnl"
)

// A kernel that refuses every replacement socket: the daemon tries a
// bounded number of times, logs the failure once, and the sockets of its
// failed attempts (never handed to the kernel) start no new round.
func TestReplaceSocketBounded(t *testing.T) {
	r := newRig(t)
	r.nl.drop = true
	r.nl.reconfErr = errors.New("fake: reconfigure refused")
	r.opts.replaceBackoff = time.Millisecond
	r.opts.replaceAttempts = 4
	r.volume("v", "memory")
	d := r.devices()
	base := runtime.NumGoroutine()
	if _, err := d.Attach("v", api.AttachRequest{Connections: 2}); err != nil {
		t.Fatal(err)
	}
	// Both sockets die at once (the fake keeps none): one round of
	// replacement for the device, then it gives up.
	deadline := time.Now().Add(5 * time.Second)
	for len(r.log.errors()) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after 5s, %d reconfigure attempts and no final error logged", r.nl.reconfigures())
		}
		time.Sleep(5 * time.Millisecond)
	}
	n := r.nl.reconfigures()
	time.Sleep(300 * time.Millisecond) // 300 backoff periods
	if m := r.nl.reconfigures(); m != n || n != r.opts.replaceAttempts {
		t.Errorf("reconfigure attempts: %d when the failure was logged, %d later; want %d in all", n, m, r.opts.replaceAttempts)
	}
	errs := r.log.errors()
	if len(errs) != 1 || !strings.Contains(errs[0], "volume=v") || !strings.Contains(errs[0], "fake: reconfigure refused") {
		t.Errorf("error log = %q, want one line naming the volume and the cause", errs)
	}
	if _, err := d.Detach("v"); err != nil {
		t.Fatal(err)
	}
	d.Close()
	waitGoroutines(t, base, 2*time.Second)
}

// Detach and Close win at once over a replacement that is backing off
// (or retrying a kernel that has not yet marked the socket dead).
func TestReplaceSocketYields(t *testing.T) {
	for _, stop := range []string{"Detach", "Close"} {
		t.Run(stop, func(t *testing.T) {
			r := newRig(t)
			r.nl.drop = true
			r.nl.reconfErr = fmt.Errorf("fake: %w", nbdnl.ErrNoDeadSocket)
			r.opts.replaceBackoff = 300 * time.Millisecond // then 600ms, 1.2s, ...
			r.opts.replaceAttempts = 5
			r.volume("v", "memory")
			d := r.devices()
			base := runtime.NumGoroutine()
			if _, err := d.Attach("v", api.AttachRequest{Connections: 1}); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for r.nl.reconfigures() < 2 {
				if time.Now().After(deadline) {
					t.Fatalf("%d replacement attempts 5s after the socket died, want 2", r.nl.reconfigures())
				}
				time.Sleep(5 * time.Millisecond)
			}
			time.Sleep(50 * time.Millisecond) // into the third wait (1.2s)
			t0 := time.Now()
			switch stop {
			case "Detach":
				if _, err := d.Detach("v"); err != nil {
					t.Fatal(err)
				}
			case "Close":
				d.Close()
			}
			if el := time.Since(t0); el > 500*time.Millisecond {
				t.Errorf("%s took %v while a socket replacement was pending; want well under a second", stop, el)
			}
			n := r.nl.reconfigures()
			d.Close()
			waitGoroutines(t, base, 2*time.Second)
			if m := r.nl.reconfigures(); m != n {
				t.Errorf("%d reconfigure attempts after %s returned", m-n, stop)
			}
			if errs := r.log.errors(); len(errs) != 0 {
				t.Errorf("a replacement given up for %s logged errors: %q", stop, errs)
			}
		})
	}
}
