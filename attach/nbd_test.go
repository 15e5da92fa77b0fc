package attach

import "testing"

func TestDefaultKernelConns(t *testing.T) {
	for _, tc := range []struct {
		release string
		cpus    int
		want    int
	}{
		{"6.1.0-56-amd64", 4, 1},
		{"5.10.0-30-amd64", 4, 1},
		{"6.11.2", 4, 1},
		{"6.12.117+deb12-amd64", 4, 4},
		{"6.12.0", 32, maxKernelConns},
		{"7.0.1", 2, 2},
		{"6.13", 1, 1},
		{"", 4, 1},
		{"garbage", 4, 1},
	} {
		if got := defaultKernelConns(tc.release, tc.cpus); got != tc.want {
			t.Errorf("defaultKernelConns(%q, %d) = %d, want %d", tc.release, tc.cpus, got, tc.want)
		}
	}
}
