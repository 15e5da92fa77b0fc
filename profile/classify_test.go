package profile

import (
	"testing"

	"github.com/blockd/blockd/pipeline"
)

// feed adds one tick's worth of I/O to c: ops requests of size bytes, seq of
// them continuing a stream, and closes the tick.
func feed(c *classifier, ops, seq int, size uint32, op pipeline.Op, flags pipeline.Flags) (Profile, bool) {
	r := pipeline.Request{Op: op, Flags: flags, Length: size}
	for i := range ops {
		c.observe(&r, i < seq)
	}
	return c.tick()
}

// A clear change of workload is followed in confirm ticks, even while the
// older ticks of the window still outweigh it; a mixed tick is left to
// the window and its hysteresis.
func TestClassifierFollowsClearChange(t *testing.T) {
	var c classifier
	c.init()
	for range window {
		feed(&c, 2000, 0, 4096, pipeline.OpRead, 0) // QD8 4k random reads
	}
	// Large sequential reads, far fewer requests per tick: the window
	// stays mostly random for a while.
	if p, ok := feed(&c, 500, 500, 128<<10, pipeline.OpRead, 0); ok && p == Sequential {
		t.Fatal("switched to sequential after one tick")
	}
	if p, ok := feed(&c, 500, 500, 128<<10, pipeline.OpRead, 0); !ok || p != Sequential {
		t.Fatalf("after two clearly sequential ticks: %v %v, want sequential (the window alone is %d%% sequential)",
			p, ok, 100*1000/(1000+2*2000))
	}
	// Back to random: followed in two ticks as well.
	feed(&c, 2000, 0, 4096, pipeline.OpRead, 0)
	if p, ok := feed(&c, 2000, 0, 4096, pipeline.OpRead, 0); !ok || p != Random {
		t.Fatalf("after two clearly random ticks: %v %v, want random", p, ok)
	}
	// Random writes with a FUA on each: db, from the newest tick too.
	feed(&c, 2000, 0, 4096, pipeline.OpWrite, pipeline.FlagFUA)
	if p, ok := feed(&c, 2000, 0, 4096, pipeline.OpWrite, pipeline.FlagFUA); !ok || p != DB {
		t.Fatalf("after two ticks of FUA writes: %v %v, want db", p, ok)
	}
	// Mixed ticks (half sequential) are no clear verdict; with the window in
	// the hysteresis band nothing is decided.
	for range window + 2 {
		if p, ok := feed(&c, 1000, 500, 4096, pipeline.OpRead, 0); ok && p != DB {
			t.Fatalf("mixed workload decided %v", p)
		}
	}
	// One clear tick between mixed ones is not enough.
	if _, ok := feed(&c, 1000, 1000, 4096, pipeline.OpRead, 0); ok {
		t.Fatal("decided after a single clear tick")
	}
	if p, ok := feed(&c, 1000, 500, 4096, pipeline.OpRead, 0); ok {
		t.Fatalf("mixed tick after one clear tick decided %v", p)
	}
	// An idle tick decides nothing.
	if _, ok := feed(&c, 3, 3, 4096, pipeline.OpRead, 0); ok {
		t.Fatal("decided on an idle tick")
	}
}
