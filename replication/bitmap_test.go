package replication

import (
	"os"
	"path/filepath"
	"testing"
)

func TestBitmapSetClearPersist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.bitmap")
	b, err := OpenBitmap(path, 1<<30+1, 64<<10) // the last region is partial
	if err != nil {
		t.Fatal(err)
	}
	if b.Regions() != 16385 {
		t.Fatalf("regions %d", b.Regions())
	}
	if err := b.SetRange(64<<10-1, 2); err != nil { // touches regions 0 and 1
		t.Fatal(err)
	}
	if err := b.SetRange(1<<30, 1); err != nil { // the last, partial region
		t.Fatal(err)
	}
	if err := b.SetRange(100<<10*64, 64<<10*130); err != nil { // regions 100..229, across words
		t.Fatal(err)
	}
	if b.Count() != 2+1+130 {
		t.Fatalf("count %d", b.Count())
	}
	// A crash right now (no Sync, no Close): the set bits are in the
	// file, because SetRange wrote them.
	again, err := OpenBitmap(path, 1<<30+1, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if again.Count() != b.Count() || !again.Test(0) || !again.Test(1) || !again.Test(16384) || !again.Test(229) || again.Test(230) {
		t.Fatalf("after reopen without sync: count %d", again.Count())
	}
	again.Close()
	var got []int64
	for r, ok := b.Next(0); ok; r, ok = b.Next(r + 1) {
		got = append(got, r)
	}
	if len(got) != 133 || got[0] != 0 || got[2] != 100 || got[len(got)-1] != 16384 {
		t.Fatalf("Next walk: %d regions, %v...", len(got), got[:3])
	}
	for _, r := range got[:100] {
		b.Clear(r)
	}
	// Clears are lazy: before Sync a reopen still sees them set (a
	// region copied again, never one skipped).
	again, _ = OpenBitmap(path, 1<<30+1, 64<<10)
	if again.Count() != 133 {
		t.Fatalf("clears reached the file before Sync: %d", again.Count())
	}
	again.Close()
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	again, _ = OpenBitmap(path, 1<<30+1, 64<<10)
	if again.Count() != 33 || again.Test(0) || !again.Test(16384) {
		t.Fatalf("after Sync: count %d", again.Count())
	}
	again.Close()
	b.Close()
}

func TestBitmapGrowAndErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "v.bitmap")
	b, err := OpenBitmap(path, 1<<20, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.SetAll(); err != nil || b.Count() != 256 {
		t.Fatalf("SetAll: %d, %v", b.Count(), err)
	}
	if err := b.Resize(2 << 20); err != nil || b.Regions() != 512 || b.Count() != 256 {
		t.Fatalf("grow: %d regions, %d set, %v", b.Regions(), b.Count(), err)
	}
	b.Close()
	if _, err := OpenBitmap(path, 2<<20, 8192); err == nil {
		t.Fatal("opened with another region size")
	}
	if _, err := OpenBitmap(filepath.Join(dir, "x"), 1<<20, 1000); err == nil {
		t.Fatal("region size 1000 accepted")
	}
	os.WriteFile(filepath.Join(dir, "bad"), []byte("garbage that is not a bitmap header!!"), 0o600)
	if _, err := OpenBitmap(filepath.Join(dir, "bad"), 1<<20, 4096); err == nil {
		t.Fatal("garbage accepted")
	}
	b, _ = OpenBitmap(path, 2<<20, 4096)
	if b.Regions() != 512 || b.Count() != 256 {
		t.Fatalf("reopen after grow: %d regions, %d set", b.Regions(), b.Count())
	}
	if err := b.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("file after Remove: %v", err)
	}
}
