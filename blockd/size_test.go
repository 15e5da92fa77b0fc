package blockd

import "testing"

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
		{"2KB", 2000, true},
		{"0", 0, true},
		{"", 0, false},
		{"-1GiB", 0, false},
		{"1.5GiB", 0, false},
		{"abc", 0, false},
		{"9999999PiB", 0, false},
		{"1XB", 0, false},
	} {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestFormatSizeRoundTrip(t *testing.T) {
	for _, n := range []int64{0, 1, 4096, 1 << 30, 3 << 20, 1<<30 + 512, 5 << 50} {
		s := FormatSize(n)
		back, err := ParseSize(s)
		if err != nil || back != n {
			t.Errorf("FormatSize(%d) = %q, parses back to %d, %v", n, s, back, err)
		}
	}
}
