package units

import (
	"math"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"1GiB", 1 << 30, true},
		{"512MiB", 512 << 20, true},
		{"4096", 4096, true},
		{"10G", 10 << 30, true},
		{"1 TiB", 1 << 40, true},
		{"4k", 4096, true},
		{"2Gi", 2 << 30, true},
		{"2KB", 2000, true},
		{"1kB", 1000, true},
		{"3MB", 3e6, true},
		{"0", 0, true},
		{"", 0, false},
		{"MiB", 0, false},
		{"-1GiB", 0, false},
		{"1.5GiB", 0, false},
		{"abc", 0, false},
		{"9999999PiB", 0, false},
		{"99999999999999999999", 0, false},
		{"1XB", 0, false},
		{"50MiB/s", 0, false}, // a rate is not a size
	} {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]int64{"50MiB/s": 50 << 20, "50MiB": 50 << 20, "200M/s": 200 << 20, "0": 0} {
		if got, err := ParseRate(in); err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := ParseRate("fast/s"); err == nil {
		t.Error(`ParseRate("fast/s") succeeded`)
	}
}

func TestParseCount(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"5000", 5000, true},
		{"5k", 5000, true},
		{"5K", 5000, true},
		{"1.5k", 1500, true},
		{"2M", 2e6, true},
		{"0", 0, true},
		{"1.0005k", 0, false},
		{"-5", 0, false},
		{"5x", 0, false},
		{"", 0, false},
		{"k", 0, false},
		{"99999999999999999999", 0, false},
		{"9999999999999999G", 0, false},
	} {
		got, err := ParseCount(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseCount(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestFormatSizeRoundTrip(t *testing.T) {
	for _, n := range []int64{0, 1, 4096, 1 << 30, 3 << 20, 1<<30 + 512, 5 << 50, math.MaxInt64} {
		s := FormatSize(n)
		back, err := ParseSize(s)
		if err != nil || back != n {
			t.Errorf("FormatSize(%d) = %q, parses back to %d, %v", n, s, back, err)
		}
	}
}

func TestHumanSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0B", 1023: "1023B", 1536 << 20: "1.5GiB", 300 << 20: "300MiB"} {
		if got := HumanSize(n); got != want {
			t.Errorf("HumanSize(%d) = %q, want %q", n, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"1GiB", "5k", "1.5k", "-1", "9999999999999T", "50MiB/s"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if n, err := ParseSize(s); err == nil && n < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
		if n, err := ParseRate(s); err == nil && n < 0 {
			t.Fatalf("ParseRate(%q) = %d", s, n)
		}
		if n, err := ParseCount(s); err == nil && n < 0 {
			t.Fatalf("ParseCount(%q) = %d", s, n)
		}
	})
}
