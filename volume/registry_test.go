package volume

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/metrics"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/pipeline"
)

func quietLog() *slog.Logger {
	if os.Getenv("VOLUME_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func openTestManager(t *testing.T, dir string) *Registry {
	t.Helper()
	m, err := Open(Options{Dir: dir, Log: quietLog(), Metrics: metrics.NewVolumes(prometheus.NewRegistry())})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestCreateValidation(t *testing.T) {
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	for _, tc := range []struct {
		spec api.Spec
		want string
	}{
		{api.Spec{Name: "Bad", Size: 1 << 20}, "volume name"},
		{api.Spec{Name: "-x", Size: 1 << 20}, "volume name"},
		{api.Spec{Name: strings.Repeat("a", 64), Size: 1 << 20}, "volume name"},
		{api.Spec{Name: "a/b", Size: 1 << 20}, "volume name"},
		{api.Spec{Name: "ok", Size: 0}, "must be positive"},
		{api.Spec{Name: "ok", Size: 1000}, "not a multiple"},
		{api.Spec{Name: "ok", Size: 1 << 20, Engine: "tape"}, "unknown engine"},
		{api.Spec{Name: "ok", Size: 1 << 20, Profile: "fast"}, "unknown io_profile"},
		{api.Spec{Name: "ok", Size: 1 << 20, BlockSize: 512}, "block size"},
	} {
		_, err := m.Create(tc.spec)
		if !api.IsCode(err, api.CodeInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Create(%+v) = %v, want invalid_argument mentioning %q", tc.spec, err, tc.want)
		}
	}
	if len(m.List()) != 0 {
		t.Fatalf("refused creates left volumes: %v", m.List())
	}
	if s, err := m.Create(api.Spec{Name: strings.Repeat("a", 63), Size: 1 << 20}); err != nil || s.Engine != "file" || s.Profile != "auto" || s.BlockSize != 4096 {
		t.Fatalf("63-character name with defaults: %+v, %v", s, err)
	}
	if _, err := m.Create(api.Spec{Name: strings.Repeat("a", 63), Size: 1 << 20}); !api.IsCode(err, api.CodeExists) {
		t.Fatalf("duplicate create: %v, want already_exists", err)
	}
}

func TestLifecycleAndReload(t *testing.T) {
	dir := t.TempDir()
	m := openTestManager(t, dir)
	if _, err := m.Create(api.Spec{Name: "db-1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(api.Spec{Name: "scratch", Size: 2 << 20, Engine: "memory", Profile: "random"}); err != nil {
		t.Fatal(err)
	}
	v, err := m.Get("db-1")
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("flushed before close")
	req := pipeline.Request{Op: pipeline.OpWrite, Offset: 8192, Length: uint32(len(data)), Buf: data}
	if err := v.Handle(t.Context(), &req); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Resize("db-1", 1<<20-4096); !api.IsCode(err, api.CodeInvalid) || !strings.Contains(err.Error(), "shrinking") {
		t.Fatalf("shrink: %v, want a clear refusal", err)
	}
	if _, err := m.Resize("db-1", 4<<20); err != nil {
		t.Fatal(err)
	}
	if v.Size() != 4<<20 {
		t.Fatalf("size after resize = %d", v.Size())
	}
	if _, err := m.Resize("nope", 4<<20); !api.IsCode(err, api.CodeNotFound) {
		t.Fatalf("resize of unknown volume: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Handle(t.Context(), &req); !errors.Is(err, pipeline.ErrShutdown) {
		t.Fatalf("request after close: %v, want ErrShutdown", err)
	}

	m = openTestManager(t, dir)
	defer m.Close()
	got := m.List()
	if len(got) != 2 || got[0].Name != "db-1" || got[0].Size != 4<<20 || got[1].Name != "scratch" || got[1].Profile != "random" {
		t.Fatalf("after reload: %+v", got)
	}
	v, _ = m.Get("db-1")
	back := make([]byte, len(data))
	rreq := pipeline.Request{Op: pipeline.OpRead, Offset: 8192, Length: uint32(len(back)), Buf: back}
	if err := v.Handle(t.Context(), &rreq); err != nil || string(back) != string(data) {
		t.Fatalf("data after reload: %q, %v", back, err)
	}
	if err := m.Delete("db-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.DataPath("db-1")); !os.IsNotExist(err) {
		t.Fatalf("backing file still there after delete: %v", err)
	}
	if err := m.Delete("db-1"); !api.IsCode(err, api.CodeNotFound) {
		t.Fatalf("second delete: %v", err)
	}
}

func TestOrphansRemovedAtStart(t *testing.T) {
	dir := t.TempDir()
	m := openTestManager(t, dir)
	m.Close()
	// What a crash between writing a backing file and its metadata (or
	// between removing metadata and the backing file) leaves behind.
	orphan := filepath.Join(dir, "data", "ghost.img")
	if err := os.WriteFile(orphan, []byte("stale secrets"), 0o600); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, "volumes", ".ghost.json.tmp-123")
	if err := os.WriteFile(tmp, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	m = openTestManager(t, dir)
	defer m.Close()
	for _, p := range []string{orphan, tmp} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived start: %v", p, err)
		}
	}
	if _, err := m.Create(api.Spec{Name: "ghost", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, _ := m.Get("ghost")
	p := make([]byte, 13)
	r := pipeline.Request{Op: pipeline.OpRead, Length: 13, Buf: p}
	if err := v.Handle(t.Context(), &r); err != nil || string(p) != string(make([]byte, 13)) {
		t.Fatalf("new volume reads %q, %v; want zeroes", p, err)
	}
}

func TestReadOnlyRefusesWrites(t *testing.T) {
	m := openTestManager(t, t.TempDir())
	defer m.Close()
	if _, err := m.Create(api.Spec{Name: "ro", Size: 1 << 20, ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	v, _ := m.Get("ro")
	for _, op := range []pipeline.Op{pipeline.OpWrite, pipeline.OpTrim, pipeline.OpWriteZeroes} {
		r := pipeline.Request{Op: op, Length: 4096, Buf: make([]byte, 4096)}
		if err := v.Handle(t.Context(), &r); !errors.Is(err, pipeline.ErrReadOnly) {
			t.Errorf("%v on read-only volume: %v", op, err)
		}
	}
	if _, err := m.Update("ro", func(s *api.Spec) error { s.ReadOnly = false; return nil }); err != nil {
		t.Fatal(err)
	}
	r := pipeline.Request{Op: pipeline.OpWrite, Length: 4096, Buf: make([]byte, 4096)}
	if err := v.Handle(t.Context(), &r); err != nil {
		t.Fatalf("write after making writable: %v", err)
	}
}
