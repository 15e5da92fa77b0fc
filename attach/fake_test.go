package attach

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/volume"
)

// fakeNBD stands in for the kernel nbd driver's netlink interface. Like
// the kernel it keeps its own references to the sockets it is handed,
// until Disconnect; with drop set it keeps none, like a kernel that
// dropped them at once, so the daemon's ends see EOF and it goes to
// replace them.
type fakeNBD struct {
	mu          sync.Mutex
	drop        bool
	next        int
	connected   map[int]bool
	socks       map[int][]*os.File
	reconfigure int   // ReconfigureBackend calls
	reconfErr   error // what ReconfigureBackend returns
	reconfs     []string
	disconnects []int
	backends    map[int]string // backend ids of Connect
	resizes     []string       // Resize calls: "nbdN BACKEND SIZE"
}

func newFakeNBD() *fakeNBD {
	return &fakeNBD{next: 3, connected: map[int]bool{}, socks: map[int][]*os.File{}, backends: map[int]string{}}
}

// keep takes references to socks for device idx; f.mu held.
func (f *fakeNBD) keep(idx int, socks []*os.File) error {
	if f.drop {
		return nil
	}
	for _, s := range socks {
		fd, err := unix.Dup(int(s.Fd()))
		if err != nil {
			return err
		}
		f.socks[idx] = append(f.socks[idx], os.NewFile(uintptr(fd), "fake-kernel"))
	}
	return nil
}

func (f *fakeNBD) Connect(cfg nbdnl.Config) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	idx := cfg.Index
	if idx == nbdnl.AnyIndex {
		idx = f.next
		f.next++
	}
	f.connected[idx] = true
	f.backends[idx] = cfg.BackendID
	return idx, f.keep(idx, cfg.Socks)
}

func (f *fakeNBD) ReconfigureBackend(index int, backendID string, socks []*os.File, timeout, deadConnTimeout time.Duration, clientFlags uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reconfigure++
	f.reconfs = append(f.reconfs, fmt.Sprintf("nbd%d %s", index, backendID))
	if f.reconfErr != nil {
		return f.reconfErr
	}
	return f.keep(index, socks)
}

func (f *fakeNBD) Disconnect(index int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.disconnects = append(f.disconnects, index)
	delete(f.connected, index)
	for _, s := range f.socks[index] {
		s.Close()
	}
	delete(f.socks, index)
	return nil
}

func (f *fakeNBD) Resize(index int, backendID string, size uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resizes = append(f.resizes, fmt.Sprintf("nbd%d %s %d", index, backendID, size))
	return nil
}

func (f *fakeNBD) Status(index int) (nbdnl.DeviceStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return nbdnl.DeviceStatus{Index: index, Connected: f.connected[index]}, nil
}

// Close closes the netlink client; devices and their sockets stay.
func (f *fakeNBD) Close() error { return nil }

// release drops every socket, as a kernel whose devices all went.
func (f *fakeNBD) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for idx, ss := range f.socks {
		for _, s := range ss {
			s.Close()
		}
		delete(f.socks, idx)
	}
}

func (f *fakeNBD) reconfigures() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reconfigure
}

// logRecords keeps what a test's Devices logged.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecords) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.recs = append(l.recs, r.Clone())
	l.mu.Unlock()
	return nil
}
func (l *logRecords) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecords) WithGroup(string) slog.Handler      { return l }

// errors returns the messages of the error records, with their attributes.
func (l *logRecords) errors() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		if r.Level < slog.LevelError {
			continue
		}
		var b strings.Builder
		b.WriteString(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			b.WriteString(" " + a.String())
			return true
		})
		out = append(out, b.String())
	}
	return out
}

// testRig is a registry with kernel attachments over a fake nbd driver and
// a temp sysfs tree.
type testRig struct {
	t    *testing.T
	vols *volume.Registry
	srv  *nbd.Server
	nl   *fakeNBD
	log  *logRecords
	opts Options
}

func newRig(t *testing.T) *testRig {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	vols, err := volume.Open(volume.Options{Dir: t.TempDir(), Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vols.Close() })
	srv := nbd.NewServer(noExports{}, nbd.Options{Logger: quiet})
	t.Cleanup(func() { srv.Close() })
	r := &testRig{t: t, vols: vols, srv: srv, nl: newFakeNBD(), log: &logRecords{}}
	t.Cleanup(r.nl.release)
	r.opts = Options{
		LoadModule:  func(string) error { return nil },
		Log:         slog.New(r.log),
		dialNetlink: func() (nbdNetlink, error) { return r.nl, nil },
		sysBlock:    t.TempDir(),
		ublkLoaded:  func() bool { return false },
	}
	return r
}

// devices starts the kernel attachments; Close runs at cleanup.
func (r *testRig) devices() *Devices {
	d := New(r.srv, r.vols, r.opts)
	r.t.Cleanup(d.Close)
	return d
}

func (r *testRig) volume(name, engine string) {
	r.t.Helper()
	if _, err := r.vols.Create(api.Spec{Name: name, Size: 16 << 20, Engine: engine}); err != nil {
		r.t.Fatal(err)
	}
}

type noExports struct{}

func (noExports) Export(string) (nbd.Export, bool) { return nil, false }
func (noExports) ExportNames() []string            { return nil }

// waitGoroutines waits, bounded, until no more goroutines run than base.
func waitGoroutines(t *testing.T, base int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("%d goroutines %v after Close, %d before the attach:\n%s", runtime.NumGoroutine(), within, base, buf[:n])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
