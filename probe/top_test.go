package probe

import (
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

func hist(slots map[int]uint64) []uint64 {
	h := make([]uint64, Slots)
	for i, n := range slots {
		h[i] = n
	}
	return h
}

// topSnapshots is a pair one second apart: a busy cgroupfs-layout pod, a
// systemd-layout pod without a name, a host cgroup, a new cgroup and an
// idle one.
func topSnapshots() (Snapshot, Snapshot) {
	t0 := time.Date(2026, 11, 21, 13, 0, 0, 0, time.UTC)
	web := Entry{CgroupID: 100, Cgroup: "/kubepods/burstable/pod0b7d8a4c/1111111111111111", PodUID: "0b7d8a4c",
		Namespace: "team-a", Pod: "web-0", Container: "1111111111111111", Dev: Dev(43, 0), Device: "nbd0"}
	db := Entry{CgroupID: 200, Cgroup: "/kubepods.slice/x", PodUID: "5f3c2b1a-7d6e-4c8b-9a0f-bbbbbbbbbbbb",
		Container: "2222222222222222", Dev: Dev(259, 1), Device: "ublkb1"}
	host := Entry{CgroupID: 300, Cgroup: "/system.slice/backup.service", Dev: Dev(43, 0), Device: "nbd0"}
	idle := Entry{CgroupID: 400, Cgroup: "/kubepods/besteffort/podidle/3333", PodUID: "idle", Namespace: "ops",
		Pod: "idle", Container: "3333", Dev: Dev(43, 0), Device: "nbd0", Reads: 5, Latency: hist(map[int]uint64{20: 5})}

	p := Snapshot{Time: t0}
	w0, d0, h0 := web, db, host
	w0.Reads, w0.ReadBytes, w0.Latency = 1000, 1000*4096, hist(map[int]uint64{16: 1000})
	d0.Writes, d0.WriteBytes, d0.Latency = 10, 10*131072, hist(map[int]uint64{18: 10})
	h0.Reads, h0.ReadBytes, h0.Latency = 1, 1<<20, hist(map[int]uint64{22: 1})
	p.Entries = []Entry{w0, d0, h0, idle}

	c := Snapshot{Time: t0.Add(time.Second)}
	w1, d1, h1 := web, db, host
	// 5000 4k reads: 4950 around 65-131µs, 50 at 1-2ms -> p99 131µs.
	w1.Reads, w1.ReadBytes, w1.Latency = 6000, 6000*4096, hist(map[int]uint64{16: 5950, 20: 50})
	// 2000 128k writes plus 5 flushes, 30 of them above 2^22 ns -> p99 8.4ms.
	d1.Writes, d1.WriteBytes, d1.Flushes, d1.Latency = 2010, 2010*131072, 5, hist(map[int]uint64{18: 1985, 22: 30})
	h1.Reads, h1.ReadBytes, h1.Latency = 51, 51<<20, hist(map[int]uint64{22: 51})
	fresh := Entry{CgroupID: 500, Cgroup: "/kubepods/pod9/4444", PodUID: "9", Namespace: "team-c", Pod: "batch-1",
		Container: "4444", Dev: Dev(43, 0), Device: "nbd0", Writes: 300, WriteBytes: 300 * 65536,
		Latency: hist(map[int]uint64{30: 300})}
	c.Entries = []Entry{w1, d1, h1, idle, fresh}
	return p, c
}

func TestRenderTopGolden(t *testing.T) {
	prev, cur := topSnapshots()
	var b bytes.Buffer
	if err := RenderTop(&b, prev, cur, 0); err != nil {
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
	prev, cur := topSnapshots()
	var b bytes.Buffer
	if err := RenderTop(&b, prev, cur, 2); err != nil {
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
	prev, cur := topSnapshots()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	calls := 0
	source := func() (Snapshot, error) {
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
	if err := Top(ctx, &b, source, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(b.String(), clearScreen); n < 2 {
		t.Errorf("%d screens drawn, want at least the waiting screen and a frame", n)
	}
	if !strings.Contains(b.String(), "team-a/web-0") {
		t.Errorf("frame lacks the busy pod:\n%s", b.String())
	}

	boom := errors.New("boom")
	err := Top(context.Background(), &b, func() (Snapshot, error) { return Snapshot{}, boom }, time.Millisecond)
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
		if got := Quantile(hist(tc.h), tc.q); got != tc.want {
			t.Errorf("Quantile(%v, %v) = %v, want %v", tc.h, tc.q, got, tc.want)
		}
	}
}

// TestSnapshotJSON checks that a snapshot survives the daemon API's JSON
// unchanged, so `blockd top` renders what the daemon saw.
func TestSnapshotJSON(t *testing.T) {
	prev, cur := topSnapshots()
	var direct, viaJSON bytes.Buffer
	if err := RenderTop(&direct, prev, cur, 0); err != nil {
		t.Fatal(err)
	}
	rt := func(s Snapshot) Snapshot {
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		var out Snapshot
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	if err := RenderTop(&viaJSON, rt(prev), rt(cur), 0); err != nil {
		t.Fatal(err)
	}
	if direct.String() != viaJSON.String() {
		t.Errorf("JSON round trip changed the frame:\n%s\nvs\n%s", direct.String(), viaJSON.String())
	}
	if !reflect.DeepEqual(rt(cur).Entries, cur.Entries) {
		t.Error("JSON round trip changed the entries")
	}
}
