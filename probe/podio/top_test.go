package podio_test

import (
	"github.com/blockd/blockd/probe/podio"

	"github.com/blockd/blockd/probe/podio/podiotest"

	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata golden files")

func TestRenderTopGolden(t *testing.T) {
	prev, cur := podiotest.Snapshots()
	var b bytes.Buffer
	if err := podio.RenderTop(&b, prev, cur, 0); err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "top.golden")
	if *update {
		if err := os.WriteFile(golden, b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.Bytes(), want) {
		t.Errorf("top frame differs from %s (run with -update to accept):\n--- got\n%s--- want\n%s", golden, b.String(), want)
	}
}

func TestRenderTopRowsLimit(t *testing.T) {
	prev, cur := podiotest.Snapshots()
	var b bytes.Buffer
	if err := podio.RenderTop(&b, prev, cur, 2); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(b.String(), "\n"), "\n")
	// Two header lines, a blank line, the column header, two rows.
	if len(lines) != 6 {
		t.Fatalf("got %d lines:\n%s", len(lines), b.String())
	}
	if !strings.HasPrefix(lines[4], "team-a/web-0") || !strings.HasPrefix(lines[5], "pod 5f3c2b1a") {
		t.Errorf("rows not the two busiest by IOPS:\n%s", b.String())
	}
}

func TestTopLoop(t *testing.T) {
	prev, cur := podiotest.Snapshots()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	calls := 0
	source := func() (podio.Snapshot, error) {
		calls++
		switch calls {
		case 1:
			return prev, nil
		case 2:
			return cur, nil
		default:
			cancel()
			return cur, nil
		}
	}
	var b bytes.Buffer
	if err := podio.Top(ctx, &b, source, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(b.String(), "\x1b[H\x1b[2J"); n < 2 {
		t.Errorf("%d screens drawn, want at least the waiting screen and a frame", n)
	}
	if !strings.Contains(b.String(), "team-a/web-0") {
		t.Errorf("frame lacks the busy pod:\n%s", b.String())
	}

	boom := errors.New("boom")
	err := podio.Top(context.Background(), &b, func() (podio.Snapshot, error) { return podio.Snapshot{}, boom }, time.Millisecond)
	if !errors.Is(err, boom) {
		t.Errorf("source error: got %v", err)
	}
}

func TestQuantile(t *testing.T) {
	for _, tc := range []struct {
		h    map[int]uint64
		q    float64
		want time.Duration
	}{
		{nil, 0.99, 0},
		{map[int]uint64{10: 1}, 0.99, 2048},
		{map[int]uint64{10: 99, 20: 1}, 0.99, 2048},
		{map[int]uint64{10: 98, 20: 2}, 0.99, 1 << 21},
		{map[int]uint64{39: 3}, 0.5, 1 << 40},
	} {
		if got := podio.Quantile(podiotest.Hist(tc.h), tc.q); got != tc.want {
			t.Errorf("Quantile(%v, %v) = %v, want %v", tc.h, tc.q, got, tc.want)
		}
	}
}

// TestSnapshotJSON checks that a snapshot survives the daemon API's JSON
// unchanged, so `blockd top` renders what the daemon saw.
func TestSnapshotJSON(t *testing.T) {
	prev, cur := podiotest.Snapshots()
	var direct, viaJSON bytes.Buffer
	if err := podio.RenderTop(&direct, prev, cur, 0); err != nil {
		t.Fatal(err)
	}
	rt := func(s podio.Snapshot) podio.Snapshot {
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var out podio.Snapshot
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if err := podio.RenderTop(&viaJSON, rt(prev), rt(cur), 0); err != nil {
		t.Fatal(err)
	}
	if direct.String() != viaJSON.String() {
		t.Errorf("JSON round trip changed the frame:\n%s\nvs\n%s", direct.String(), viaJSON.String())
	}
	if !reflect.DeepEqual(rt(cur).Entries, cur.Entries) {
		t.Error("JSON round trip changed the entries")
	}
}
