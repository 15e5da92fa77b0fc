package uring

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/internal/leakcheck"
)

func newRing(t *testing.T, entries, flags uint32) *Ring {
	t.Helper()
	r, err := New(entries, flags)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// mmapBuf returns memory the Go runtime never moves, as the kernel needs
// for buffers it writes after the submitting syscall returned.
func mmapBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func TestLayout(t *testing.T) {
	if s := unsafe.Sizeof(SQE{}); s != 64 {
		t.Fatalf("SQE is %d bytes, want 64", s)
	}
	if s := unsafe.Sizeof(CQE{}); s != 16 {
		t.Fatalf("CQE is %d bytes, want 16", s)
	}
	if s := unsafe.Sizeof(params{}); s != 120 {
		t.Fatalf("io_uring_params is %d bytes, want 120", s)
	}
	if o := unsafe.Offsetof(SQE{}.UserData); o != 32 {
		t.Fatalf("user_data at %d, want 32", o)
	}
	if o := unsafe.Offsetof(SQE{}.Addr3); o != 48 {
		t.Fatalf("addr3/cmd at %d, want 48", o)
	}
}

func TestNop(t *testing.T) {
	for _, flags := range []uint32{0, SetupSQE128} {
		r := newRing(t, 8, flags)
		s := r.GetSQE()
		s.PrepNop(42)
		if err := r.SubmitAndWait(1); err != nil {
			t.Fatal(err)
		}
		var c [4]CQE
		if n := r.Reap(c[:]); n != 1 || c[0].UserData != 42 || c[0].Res != 0 {
			t.Fatalf("flags %#x: reaped %d %+v", flags, n, c[0])
		}
		if r.Ready() != 0 {
			t.Fatalf("still %d ready", r.Ready())
		}
	}
}

func TestReadWriteFile(t *testing.T) {
	r := newRing(t, 16, SetupSQE128)
	f, err := os.Create(filepath.Join(t.TempDir(), "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const n, bs = 8, 4096
	w := mmapBuf(t, n*bs)
	for i := range w {
		w[i] = byte(i*7 + i/bs)
	}
	for i := 0; i < n; i++ {
		r.GetSQE().PrepWrite(int(f.Fd()), w[i*bs:(i+1)*bs], uint64(i*bs), uint64(i))
	}
	if err := r.SubmitAndWait(n); err != nil {
		t.Fatal(err)
	}
	var c [n]CQE
	seen := 0
	for k := r.Reap(c[:]); k > 0; k = r.Reap(c[:]) {
		for _, e := range c[:k] {
			if e.Res != bs {
				t.Fatalf("write %d: res %d", e.UserData, e.Res)
			}
			seen |= 1 << e.UserData
		}
	}
	if seen != 1<<n-1 {
		t.Fatalf("completions seen %b", seen)
	}
	rb := mmapBuf(t, n*bs)
	for i := n - 1; i >= 0; i-- {
		r.GetSQE().PrepRead(int(f.Fd()), rb[i*bs:(i+1)*bs], uint64(i*bs), uint64(100+i))
	}
	if err := r.SubmitAndWait(n); err != nil {
		t.Fatal(err)
	}
	if k := r.Reap(c[:]); k != n {
		t.Fatalf("reaped %d", k)
	}
	for _, e := range c {
		if e.Res != bs {
			t.Fatalf("read %d: res %d", e.UserData, e.Res)
		}
	}
	if !bytes.Equal(w, rb) {
		t.Fatal("read back differs from what was written")
	}
	// A read of a bad fd fails in its CQE, not in submit.
	r.GetSQE().PrepRead(-1, rb[:bs], 0, 7)
	if err := r.SubmitAndWait(1); err != nil {
		t.Fatal(err)
	}
	if k := r.Reap(c[:]); k != 1 || c[0].Res != -int32(unix.EBADF) {
		t.Fatalf("bad fd read: %d %+v", k, c[0])
	}
}

// TestURingCmdOnPlainFile checks that a URING_CMD SQE reaches the kernel
// with its opcode and is refused by a file without a uring_cmd handler,
// the closest the host (no ublk) gets to the ublk path.
func TestURingCmdOnPlainFile(t *testing.T) {
	r := newRing(t, 4, SetupSQE128)
	f, err := os.Create(filepath.Join(t.TempDir(), "x"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := r.GetSQE()
	s.PrepURingCmd(int(f.Fd()), 0xc0107520, 9)
	cmd := r.Cmd(s)
	for i := range cmd {
		cmd[i] = 0xff
	}
	if err := r.SubmitAndWait(1); err != nil {
		t.Fatal(err)
	}
	var c [1]CQE
	if r.Reap(c[:]) != 1 || c[0].UserData != 9 || c[0].Res >= 0 {
		t.Fatalf("uring_cmd on a plain file: %+v", c[0])
	}
	// The payload must not have leaked into the next SQE's header.
	next := r.GetSQE()
	if next.Opcode != 0 || next.UserData != 0 {
		t.Fatalf("next SQE not zeroed: %+v", *next)
	}
}

func TestCmdPanicsOn64ByteRing(t *testing.T) {
	r := newRing(t, 4, 0)
	defer func() {
		if recover() == nil {
			t.Fatal("Cmd on a 64-byte ring did not panic")
		}
	}()
	r.Cmd(r.GetSQE())
}

func TestRingFull(t *testing.T) {
	r := newRing(t, 8, SetupSQE128)
	entries := r.SQEntries()
	for i := uint32(0); i < entries; i++ {
		s := r.GetSQE()
		if s == nil {
			t.Fatalf("ring full after %d of %d", i, entries)
		}
		s.PrepNop(uint64(i))
	}
	if r.GetSQE() != nil {
		t.Fatal("GetSQE on a full ring returned an entry")
	}
	n, err := r.Submit()
	if err != nil || n != int(entries) {
		t.Fatalf("submit: %d %v", n, err)
	}
	if r.GetSQE() == nil {
		t.Fatal("no SQE after the kernel consumed the ring")
	}
	// The prepared-but-unfilled SQE is a NOP (zeroed); complete everything.
	if err := r.SubmitAndWait(entries + 1); err != nil {
		t.Fatal(err)
	}
	c := make([]CQE, 2*entries)
	if got := r.Reap(c); got != int(entries)+1 {
		t.Fatalf("reaped %d, want %d", got, entries+1)
	}
}

// TestManyInFlight keeps far more operations in flight over time than the
// ring holds, refilling as completions arrive, and checks each completes
// exactly once.
func TestManyInFlight(t *testing.T) {
	r := newRing(t, 32, SetupSQE128)
	p := make([]int, 2)
	if err := unix.Pipe2(p, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	// Reads on an empty pipe stay in flight until written to.
	buf := mmapBuf(t, 32)
	const inflight = 32
	for i := 0; i < inflight; i++ {
		r.GetSQE().PrepRead(p[0], buf[i:i+1], 0, uint64(i))
	}
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if r.Ready() != 0 {
		t.Fatalf("%d completions before any data", r.Ready())
	}
	done := make(map[uint64]bool)
	c := make([]CQE, 64)
	const total = 2000
	issued := inflight
	for len(done) < total {
		if _, err := unix.Write(p[1], []byte{1}); err != nil {
			t.Fatal(err)
		}
		if err := r.SubmitAndWait(1); err != nil {
			t.Fatal(err)
		}
		for _, e := range c[:r.Reap(c)] {
			if e.Res != 1 || done[e.UserData] {
				t.Fatalf("completion %+v (dup %v)", e, done[e.UserData])
			}
			done[e.UserData] = true
			if issued < total {
				r.GetSQE().PrepRead(p[0], buf[e.UserData%32:e.UserData%32+1], 0, uint64(issued))
				issued++
			}
		}
	}
}

func TestCloseReleasesFds(t *testing.T) {
	before := leakcheck.FDs(t)
	for i := 0; i < 20; i++ {
		r, err := New(64, SetupSQE128)
		if err != nil {
			t.Fatal(err)
		}
		r.GetSQE().PrepNop(1)
		if err := r.SubmitAndWait(1); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if r.GetSQE() != nil {
			t.Fatal("GetSQE on a closed ring")
		}
		if err := r.SubmitAndWait(1); err != ErrClosed {
			t.Fatalf("SubmitAndWait on closed ring: %v", err)
		}
	}
	if after := leakcheck.FDs(t); after != before {
		t.Fatalf("fds before %d after %d", before, after)
	}
}

func TestZeroAllocs(t *testing.T) {
	r := newRing(t, 16, SetupSQE128)
	var c [16]CQE
	allocs := testing.AllocsPerRun(200, func() {
		s := r.GetSQE()
		s.PrepNop(5)
		r.Cmd(s)[0] = 1
		if err := r.SubmitAndWait(1); err != nil {
			t.Fatal(err)
		}
		if r.Reap(c[:]) != 1 {
			t.Fatal("no completion")
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per SQE/CQE", allocs)
	}
}

func BenchmarkNop(b *testing.B) {
	r, err := New(64, SetupSQE128)
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	var c [32]CQE
	b.ReportAllocs()
	for i := 0; i < b.N; i += 32 {
		for j := 0; j < 32; j++ {
			r.GetSQE().PrepNop(uint64(j))
		}
		if err := r.SubmitAndWait(32); err != nil {
			b.Fatal(err)
		}
		r.Reap(c[:])
	}
}

// TestWaitPoll waits for a pipe read through the netpoller, with another
// goroutine providing the data, and checks no allocation per wait.
func TestWaitPoll(t *testing.T) {
	r := newRing(t, 8, SetupSQE128)
	if err := r.EnablePolling(); err != nil {
		t.Fatal(err)
	}
	p := make([]int, 2)
	if err := unix.Pipe2(p, unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	buf := mmapBuf(t, 8)
	var c [4]CQE
	round := func() {
		r.GetSQE().PrepRead(p[0], buf[:1], 0, 3)
		done := make(chan struct{})
		go func() {
			defer close(done)
			unix.Write(p[1], []byte{9})
		}()
		if err := r.WaitPoll(); err != nil {
			t.Fatal(err)
		}
		<-done
		if n := r.Reap(c[:]); n != 1 || c[0].Res != 1 || buf[0] != 9 {
			t.Fatalf("reaped %d %+v buf %d", n, c[0], buf[0])
		}
	}
	for i := 0; i < 50; i++ {
		round()
	}
	// Allocation check without the helper goroutine: a NOP completes at
	// submit, so WaitPoll returns from its first check.
	allocs := testing.AllocsPerRun(100, func() {
		r.GetSQE().PrepNop(1)
		if err := r.WaitPoll(); err != nil {
			t.Fatal(err)
		}
		r.Reap(c[:])
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per WaitPoll", allocs)
	}
	before := leakcheck.FDs(t)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if after := leakcheck.FDs(t); after != before-1 {
		t.Fatalf("Close of a polled ring: fds %d -> %d", before, after)
	}
}

// TestWaitReadyFromAnotherGoroutine: a watcher goroutine waits for
// completions while the owner submits and reaps; Close ends the watcher.
func TestWaitReadyFromAnotherGoroutine(t *testing.T) {
	r, err := New(8, SetupSQE128)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.EnablePolling(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan error)
	next := make(chan struct{})
	go func() {
		for range next {
			ready <- r.WaitReady()
		}
		ready <- r.WaitReady() // after Close: must fail, not hang
	}()
	var c [4]CQE
	for i := 0; i < 20; i++ {
		next <- struct{}{}
		r.GetSQE().PrepNop(uint64(i))
		if err := r.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := <-ready; err != nil {
			t.Fatal(err)
		}
		if n := r.Reap(c[:]); n != 1 || c[0].UserData != uint64(i) {
			t.Fatalf("reaped %d %+v", n, c[0])
		}
	}
	close(next)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-ready; err == nil {
		t.Fatal("WaitReady after Close returned nil")
	}
	if err := r.Flush(); err != ErrClosed {
		t.Fatalf("Flush after Close: %v", err)
	}
}

// WaitTimeout returns at the deadline when nothing completes, at once when
// a completion is ready, and submits what is prepared.
func TestWaitTimeout(t *testing.T) {
	r := newRing(t, 8, SetupSQE128)
	if r.Features()&FeatExtArg == 0 {
		if _, err := r.WaitTimeout(time.Millisecond); !errors.Is(err, ErrNoTimeout) {
			t.Fatalf("WaitTimeout without EXT_ARG: %v", err)
		}
		t.Skip("kernel without IORING_FEAT_EXT_ARG")
	}
	start := time.Now()
	got, err := r.WaitTimeout(20 * time.Millisecond)
	if err != nil || got {
		t.Fatalf("WaitTimeout on an idle ring = %v, %v", got, err)
	}
	if el := time.Since(start); el < 15*time.Millisecond || el > 2*time.Second {
		t.Fatalf("idle wait took %v, want about 20ms", el)
	}
	r.GetSQE().PrepNop(5)
	got, err = r.WaitTimeout(time.Minute)
	if err != nil || !got {
		t.Fatalf("WaitTimeout with a NOP prepared = %v, %v", got, err)
	}
	var c [2]CQE
	if n := r.Reap(c[:]); n != 1 || c[0].UserData != 5 {
		t.Fatalf("reaped %d %+v", n, c[0])
	}
	allocs := testing.AllocsPerRun(100, func() {
		r.GetSQE().PrepNop(6)
		if ok, err := r.WaitTimeout(time.Second); !ok || err != nil {
			t.Fatal(ok, err)
		}
		r.Reap(c[:])
	})
	if allocs != 0 {
		t.Fatalf("WaitTimeout allocates %v per call", allocs)
	}
}

// With EnableEventfd, WaitReady parks on the eventfd and wakes for a
// completion another goroutine's submission posts; with the eventfd's
// signals off it does not wake (WaitReadyTimeout runs out), and it sees
// a completion posted before it started even without a signal.
func TestEventfd(t *testing.T) {
	r, err := New(8, SetupSQE128)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.EnableEventfd(); err != nil {
		t.Fatal(err)
	}
	fds := leakcheck.FDs(t)
	var c [4]CQE
	for i := 0; i < 10; i++ {
		done := make(chan error, 1)
		go func() { done <- r.WaitReady() }()
		time.Sleep(time.Millisecond)
		r.GetSQE().PrepNop(uint64(i))
		if err := r.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if n := r.Reap(c[:]); n != 1 || c[0].UserData != uint64(i) {
			t.Fatalf("reaped %d %+v", n, c[0])
		}
	}
	if r.cqFlags == nil {
		t.Skip("kernel without CQ ring flags")
	}
	r.SetEventfd(false)
	r.GetSQE().PrepNop(99)
	if _, err := r.WaitTimeout(time.Second); err != nil && !errors.Is(err, ErrNoTimeout) {
		t.Fatal(err)
	}
	// Posted while off: no signal, but WaitReady looks before parking.
	if ok, err := r.WaitReadyTimeout(20 * time.Millisecond); !ok || err != nil {
		t.Fatalf("WaitReadyTimeout with a completion ready = %v, %v", ok, err)
	}
	r.Reap(c[:])
	// Nothing ready, signals off: a submission's completion is not
	// signalled.
	got := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		ok, err := r.WaitReadyTimeout(100 * time.Millisecond)
		if err != nil || !ok {
			t.Errorf("WaitReadyTimeout = %v, %v; want the completion seen at the deadline", ok, err)
		}
		got <- time.Since(start)
	}()
	time.Sleep(5 * time.Millisecond)
	r.GetSQE().PrepNop(100)
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if el := <-got; el < 80*time.Millisecond {
		t.Fatalf("woken after %v by a completion posted with the eventfd off", el)
	}
	r.Reap(c[:])
	r.SetEventfd(true)
	allocs := testing.AllocsPerRun(50, func() {
		r.GetSQE().PrepNop(7)
		if err := r.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := r.WaitReady(); err != nil {
			t.Fatal(err)
		}
		r.Reap(c[:])
	})
	if allocs != 0 {
		t.Errorf("WaitReady on the eventfd allocates %v per wait", allocs)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if n := leakcheck.FDs(t); n != fds-2 {
		t.Errorf("%d fds after Close, %d before: the ring or its eventfd leaked", n, fds)
	}
}
