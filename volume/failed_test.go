package volume

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/metrics"
	"github.com/blockd/blockd/pipeline"
)

// writeVolume writes data at 0 of the named volume through its pipeline.
func writeVolume(t *testing.T, m *Registry, name string, data []byte) {
	t.Helper()
	v, err := m.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	w := pipeline.Request{Op: pipeline.OpWrite, Length: uint32(len(data)), Buf: data}
	if err := v.Handle(t.Context(), &w); err != nil {
		t.Fatal(err)
	}
}

func readVolume(t *testing.T, m *Registry, name string, n int) []byte {
	t.Helper()
	v, err := m.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, n)
	r := pipeline.Request{Op: pipeline.OpRead, Length: uint32(n), Buf: buf}
	if err := v.Handle(t.Context(), &r); err != nil {
		t.Fatal(err)
	}
	return buf
}

func wantFailed(t *testing.T, m *Registry, name, reason string) {
	t.Helper()
	v, err := m.Volume(name)
	if err != nil {
		t.Fatalf("failed volume %s is not listed: %v", name, err)
	}
	state, why := v.State()
	if state != api.StateFailed || !strings.Contains(why, reason) {
		t.Fatalf("volume %s: state %q, reason %q; want failed saying %q", name, state, why, reason)
	}
	if _, err := m.Get(name); !api.IsCode(err, api.CodeConflict) || !strings.Contains(err.Error(), reason) {
		t.Fatalf("Get of failed volume %s: %v, want a conflict saying why", name, err)
	}
	if _, ok := m.Lookup(name); ok {
		t.Fatalf("failed volume %s is exported", name)
	}
	for _, n := range m.Names() {
		if n == name {
			t.Fatalf("failed volume %s in the export list %v", name, m.Names())
		}
	}
	if _, err := m.Resize(name, 8<<20); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("resize of failed volume: %v", err)
	}
	if _, err := m.Update(name, func(s *api.Spec) error { s.ReadOnly = true; return nil }); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("update of failed volume: %v", err)
	}
	if _, err := m.SetAttachment(name, &api.Attachment{Frontend: api.FrontendNBD}); !api.IsCode(err, api.CodeConflict) {
		t.Fatalf("attach of failed volume: %v", err)
	}
}

// Defect 2: a file volume whose backing file is gone at start is failed,
// with the reason; the file is not recreated empty; the other volumes
// serve; delete still works, and a new create of the name then works.
func TestMissingBackingFileFails(t *testing.T) {
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	m, err := Open(Options{Dir: dir, Log: quietLog(), Metrics: metrics.NewVolumes(reg)})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"gone", "fine"} {
		if _, err := m.Create(api.Spec{Name: n, Size: 4 << 20}); err != nil {
			t.Fatal(err)
		}
		writeVolume(t, m, n, []byte("data of "+n))
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(m.DataPath("gone")); err != nil {
		t.Fatal(err)
	}
	reg = prometheus.NewRegistry()
	m, err = Open(Options{Dir: dir, Log: quietLog(), Metrics: metrics.NewVolumes(reg)})
	if err != nil {
		t.Fatalf("start with a missing backing file: %v", err)
	}
	defer m.Close()
	wantFailed(t, m, "gone", "backing file "+m.DataPath("gone")+" is missing")
	if _, err := os.Stat(m.DataPath("gone")); !os.IsNotExist(err) {
		t.Fatalf("the missing backing file was recreated: %v", err)
	}
	if got := readVolume(t, m, "fine", 12); string(got) != "data of fine" {
		t.Fatalf("the healthy volume reads %q", got)
	}
	if got := testutil.ToFloat64(metricVec(t, reg, "gone")); got != 1 {
		t.Errorf(`blockd_volume_failed{volume="gone"} = %v, want 1`, got)
	}
	if _, err := m.Create(api.Spec{Name: "gone", Size: 4 << 20}); !api.IsCode(err, api.CodeExists) {
		t.Fatalf("create over a failed volume: %v, want already_exists", err)
	}
	if err := m.Delete("gone"); err != nil {
		t.Fatalf("delete of a failed volume: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "volumes", "gone.json")); !os.IsNotExist(err) {
		t.Fatalf("metadata of the deleted failed volume: %v", err)
	}
	if _, err := m.Create(api.Spec{Name: "gone", Size: 4 << 20}); err != nil {
		t.Fatalf("create after deleting the failed volume: %v", err)
	}
}

func metricVec(t *testing.T, reg *prometheus.Registry, vol string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "blockd_volume_failed" {
			continue
		}
		for _, mm := range mf.Metric {
			if mm.Label[0].GetValue() == vol {
				g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
				g.Set(mm.GetGauge().GetValue())
				return g
			}
		}
	}
	t.Fatalf("no blockd_volume_failed series for %s", vol)
	return nil
}

// A backing file shorter than its volume (truncated by hand or by a bad
// copy) would read as zeroes past its end: failed too.
func TestTruncatedBackingFileFails(t *testing.T) {
	dir := t.TempDir()
	m := openTestManager(t, dir)
	if _, err := m.Create(api.Spec{Name: "short", Size: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	m.Close()
	if err := os.Truncate(m.DataPath("short"), 1<<20); err != nil {
		t.Fatal(err)
	}
	m = openTestManager(t, dir)
	defer m.Close()
	wantFailed(t, m, "short", "smaller than the volume")
	if st, err := os.Stat(m.DataPath("short")); err != nil || st.Size() != 1<<20 {
		t.Fatalf("the short backing file was changed: %v %v", st, err)
	}
}

// Defect 3: unreadable metadata quarantines that volume only.
func TestCorruptMetadataQuarantined(t *testing.T) {
	dir := t.TempDir()
	m := openTestManager(t, dir)
	for _, n := range []string{"bad", "wrong", "fine"} {
		if _, err := m.Create(api.Spec{Name: n, Size: 4 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	writeVolume(t, m, "fine", []byte("still here"))
	m.Close()
	corrupt := []byte("{not json")
	if err := os.WriteFile(filepath.Join(dir, "volumes", "bad.json"), corrupt, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "volumes", "wrong.json"), []byte(`{"name":"other","size":4096}`), 0o600); err != nil {
		t.Fatal(err)
	}
	// Not volume metadata at all: left alone, never failed or removed.
	for _, n := range []string{"README", "Bad Name.json"} {
		if err := os.WriteFile(filepath.Join(dir, "volumes", n), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m = openTestManager(t, dir)
	defer m.Close()
	wantFailed(t, m, "bad", "bad.json is corrupt")
	wantFailed(t, m, "wrong", `names volume "other"`)
	if got := readVolume(t, m, "fine", 10); string(got) != "still here" {
		t.Fatalf("the healthy volume reads %q", got)
	}
	if got := m.Names(); len(got) != 1 || got[0] != "fine" {
		t.Fatalf("exports %v, want only fine", got)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "volumes", "bad.json")); err != nil || !bytes.Equal(b, corrupt) {
		t.Fatalf("the corrupt metadata was changed: %q %v", b, err)
	}
	// A failed volume's backing file is its data: never swept.
	if _, err := os.Stat(m.DataPath("bad")); err != nil {
		t.Fatalf("backing file of the quarantined volume: %v", err)
	}
	for _, n := range []string{"README", "Bad Name.json"} {
		if _, err := os.Stat(filepath.Join(dir, "volumes", n)); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
	}
	if len(m.List()) != 3 {
		t.Fatalf("list %+v, want the two failed volumes and fine", m.List())
	}
}

// Defect 4: the sweep removes only NAME.img files of valid names that no
// metadata claims, and a subdirectory does not stop the start.
func TestSweepTouchesOnlyOrphanImages(t *testing.T) {
	dir := t.TempDir()
	m := openTestManager(t, dir)
	m.Close()
	data := filepath.Join(dir, "data")
	keep := []string{"notes.txt", "Bad.img", "x.img.bak", "sub"}
	for _, n := range keep[:3] {
		if err := os.WriteFile(filepath.Join(data, n), []byte("mine"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(data, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(data, "dir.img"), 0o700); err != nil {
		t.Fatal(err)
	}
	keep = append(keep, "dir.img")
	if err := os.WriteFile(filepath.Join(data, "ghost.img"), []byte("orphan"), 0o600); err != nil {
		t.Fatal(err)
	}
	m = openTestManager(t, dir)
	defer m.Close()
	for _, n := range keep {
		if _, err := os.Stat(filepath.Join(data, n)); err != nil {
			t.Errorf("%s was removed by the sweep: %v", n, err)
		}
	}
	if _, err := os.Stat(filepath.Join(data, "ghost.img")); !os.IsNotExist(err) {
		t.Errorf("orphan ghost.img survived: %v", err)
	}
}

// slowEngine blocks writes until release is closed.
type slowEngine struct {
	ioengine.Engine
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func (e *slowEngine) WriteAt(p []byte, off int64) (int, error) {
	e.once.Do(func() { close(e.entered) })
	<-e.release
	return e.Engine.WriteAt(p, off)
}

// Defect 10: Delete drains the volume without the registry lock: while a
// deleted volume waits for a request in flight, the other volumes are
// listed, looked up and created.
func TestDeleteDrainsWithoutRegistryLock(t *testing.T) {
	slow := &slowEngine{entered: make(chan struct{}), release: make(chan struct{})}
	opts := Options{Dir: t.TempDir(), Log: quietLog(),
		openEngine: func(kind, path string, size int64) (ioengine.Engine, error) {
			e, err := ioengine.NewMemory(size)
			if err != nil || !strings.HasSuffix(path, "slow.img") {
				return e, err
			}
			slow.Engine = e
			return slow, nil
		}}
	m, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	release := sync.OnceFunc(func() { close(slow.release) })
	defer release() // before m.Close: a failed test must not hang
	for _, n := range []string{"slow", "other"} {
		if _, err := m.Create(api.Spec{Name: n, Size: 1 << 20, Engine: "memory", Profile: "none"}); err != nil {
			t.Fatal(err)
		}
	}
	v, _ := m.Get("slow")
	werr := make(chan error, 1)
	go func() {
		w := pipeline.Request{Op: pipeline.OpWrite, Length: 4096, Buf: make([]byte, 4096)}
		werr <- v.Handle(context.Background(), &w)
	}()
	<-slow.entered
	derr := make(chan error, 1)
	go func() { derr <- m.Delete("slow") }()
	// While the delete waits for the write, the registry answers.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := m.Lookup("slow"); !ok {
			break // Delete has taken it out
		}
		if time.Now().After(deadline) {
			t.Fatal("Delete did not take the volume out within 10s")
		}
		time.Sleep(time.Millisecond)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.List()
		if _, err := m.Get("other"); err != nil {
			t.Error(err)
		}
		if _, err := m.Create(api.Spec{Name: "third", Size: 1 << 20, Engine: "memory"}); err != nil {
			t.Error(err)
		}
		if _, err := m.Create(api.Spec{Name: "slow", Size: 1 << 20, Engine: "memory"}); !api.IsCode(err, api.CodeConflict) {
			t.Errorf("create of a volume being deleted: %v, want a conflict", err)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the registry was blocked while a deleted volume drained")
	}
	select {
	case err := <-derr:
		t.Fatalf("Delete returned %v before the write in flight finished", err)
	default:
	}
	release()
	if err := <-werr; err != nil {
		t.Fatalf("write in flight during delete: %v", err)
	}
	if err := <-derr; err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(api.Spec{Name: "slow", Size: 1 << 20, Engine: "memory"}); err != nil {
		t.Fatalf("create after the delete finished: %v", err)
	}
}
