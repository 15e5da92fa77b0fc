package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeServer is a Server without a process: its URI names it, and the fake
// fio below decides from the URI how the "server" behaves.
type fakeServer struct {
	name     string
	startErr error
}

func (f fakeServer) Name() string { return f.name }

func (f fakeServer) Start(ctx context.Context, dir string, size int64) (*Instance, error) {
	if f.startErr != nil {
		return nil, f.startErr
	}
	return &Instance{Server: f.name, URI: "nbd://fake/" + f.name}, nil
}

// fakeFio writes a fio script that logs "URI NAME" to log and answers with
// the read or write fixture, and fails for URIs containing "broken".
func fakeFio(t *testing.T, log string) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	td := filepath.Join(wd, "testdata")
	script := `#!/bin/sh
for a in "$@"; do
  case "$a" in
    --uri=*) uri=${a#--uri=} ;;
    --output=*) out=${a#--output=} ;;
    --name=*) name=${a#--name=} ;;
    --rw=*) rw=${a#--rw=} ;;
  esac
done
echo "$uri $name" >> ` + log + `
case "$uri" in *broken*) echo "fio: nbd connect failed" >&2; exit 1 ;; esac
case "$rw" in
  *write) cp ` + td + `/fio-randwrite-2jobs.json "$out" ;;
  *) cp ` + td + `/fio-randread-qd1.json "$out" ;;
esac
`
	path := filepath.Join(t.TempDir(), "fio")
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestRunner(t *testing.T) {
	log := filepath.Join(t.TempDir(), "calls")
	r := &Runner{
		Fio: Fio{Path: fakeFio(t, log)},
		Servers: []Server{
			// Wraps ErrNotBuilt: skipped, not failed.
			fakeServer{name: "blockd", startErr: fmt.Errorf("bin/blockd %w", ErrNotBuilt)},
			fakeServer{name: "a"},
			fakeServer{name: "broken"},
			fakeServer{name: "b"},
			fakeServer{name: "c", startErr: errors.New("port in use")},
		},
		Rows:    []Row{DefaultRows[0], DefaultRows[1]},
		Conns:   2,
		Runtime: time.Second,
		Prefill: true,
		Repeat:  3,
		Dir:     t.TempDir(),
		Primary: "blockd",
	}
	rep, err := r.Run(context.Background())
	if err == nil {
		t.Fatal("no error despite a broken and an unstartable server")
	}
	for _, want := range []string{"broken prefill", "c start: port in use"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if _, ok := rep.Skipped["blockd"]; !ok {
		t.Errorf("blockd not recorded as skipped: %v", rep.Skipped)
	}
	for _, row := range r.Rows {
		for _, s := range []string{"a", "b"} {
			res, ok := rep.Lookup(row.Name, s)
			if !ok || res.Err != "" || len(res.Samples) != 3 || res.IOs == 0 || len(res.Fio) == 0 {
				t.Errorf("%s %s: %+v", row.Name, s, res)
			}
			if res.Job.Jobs*res.Job.IODepth != row.QD {
				t.Errorf("%s %s: job %d×%d", row.Name, s, res.Job.Jobs, res.Job.IODepth)
			}
		}
		// The write row parsed the write direction.
		if res, _ := rep.Lookup(DefaultRows[1].Name, "a"); res.IOs != 69694 {
			t.Errorf("write row IOs = %d", res.IOs)
		}
		for _, s := range []string{"broken", "c"} {
			if res, ok := rep.Lookup(row.Name, s); !ok || res.Err == "" {
				t.Errorf("%s %s: failure not recorded: %+v", row.Name, s, res)
			}
		}
		if _, ok := rep.Lookup(row.Name, "blockd"); ok {
			t.Errorf("skipped blockd has a result")
		}
	}

	// Calls: prefill per started server, then rows with the server order
	// rotated; the broken server is not tried again after its prefill.
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	var calls []string
	for _, l := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		calls = append(calls, strings.TrimPrefix(l, "nbd://fake/"))
	}
	// Started servers are [a broken b c]; round i, row j starts at index
	// (i+j)%4 and skips the failed ones.
	r0, r1 := DefaultRows[0].Name, DefaultRows[1].Name
	want := []string{"a prefill", "broken prefill", "b prefill",
		"a " + r0, "b " + r0, "b " + r1, "a " + r1, // round 1: start a, broken
		"b " + r0, "a " + r0, "b " + r1, "a " + r1, // round 2: start broken, b
		"b " + r0, "a " + r0, "a " + r1, "b " + r1, // round 3: start b, c
	}
	if strings.Join(calls, "\n") != strings.Join(want, "\n") {
		t.Errorf("fio calls:\n%s\nwant:\n%s", strings.Join(calls, "\n"), strings.Join(want, "\n"))
	}
}

func TestMedianSample(t *testing.T) {
	mk := func(v ...float64) []sample {
		var ss []sample
		for _, x := range v {
			ss = append(ss, sample{m: Metrics{IOPS: x, P99us: x * 2}})
		}
		return ss
	}
	for _, tt := range []struct {
		in   []float64
		want float64
	}{{[]float64{5}, 5}, {[]float64{9, 1, 5}, 5}, {[]float64{4, 8}, 4}, {[]float64{3, 1, 4, 2}, 2}} {
		got := medianSample(mk(tt.in...))
		if got.m.IOPS != tt.want || got.m.P99us != tt.want*2 {
			t.Errorf("median of %v = %+v, want %v", tt.in, got.m, tt.want)
		}
	}
}

// A server that never answers must not hang the run: fio is killed after
// runtime + ramp + margin.
func TestFioTimeout(t *testing.T) {
	defer func(m time.Duration) { fioMargin = m }(fioMargin)
	fioMargin = 100 * time.Millisecond
	path := filepath.Join(t.TempDir(), "fio")
	if err := os.WriteFile(path, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	f := Fio{Path: path, Dir: t.TempDir()}
	_, _, err := f.Run(context.Background(), "nbd://x/y", MakeJob(DefaultRows[4], 1, 0, 0, 1<<20), "")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run = %v, want deadline exceeded", err)
	}
}
