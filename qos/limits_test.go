package qos

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		l    Limits
		want string // "" for valid
	}{
		{Limits{}, ""},
		{Limits{IOPS: 2000, IOPSReservation: 2000, Burst: 1, Weight: 500}, ""},
		{Limits{IOPS: 2000, IOPSReservation: 3000}, "iops_reservation 3000 exceeds iops_limit 2000"},
		{Limits{ReadIOPS: 1000, WriteIOPS: 500, IOPSReservation: 1500}, ""},
		{Limits{ReadIOPS: 1000, WriteIOPS: 500, IOPSReservation: 1501}, "iops_reservation 1501 exceeds read_iops_limit + write_iops_limit 1500"},
		{Limits{ReadIOPS: 1000, IOPSReservation: 5000}, ""}, // writes are uncapped: 5000 is reachable
		{Limits{BPS: 50 << 20, BPSReservation: 100 << 20}, "bps_reservation 104857600 exceeds bps_limit 52428800"},
		{Limits{ReadBPS: 1, WriteBPS: 1, BPS: 10, BPSReservation: 3}, "bps_reservation 3 exceeds read_bps_limit + write_bps_limit 2"},
		{Limits{WriteBPS: -5}, "write_bps_limit -5 is negative"},
		{Limits{Weight: -1}, "weight -1 is negative"},
		{Limits{Weight: MaxWeight + 1}, "weight 10001 exceeds the maximum of 10000"},
		{Limits{Burst: -0.5}, "burst -0.5 must be a non-negative number of seconds"},
		{Limits{Burst: math.NaN()}, "burst NaN must be"},
		{Limits{Burst: MaxBurst + 1}, "exceeds the maximum of 3600 seconds"},
	} {
		err := tc.l.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v, want valid", tc.l, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: %v, want %q", tc.l, err, tc.want)
		}
	}
}

func TestSetFlag(t *testing.T) {
	base := Limits{IOPS: 7, BPS: 9, Weight: 3, Burst: 2}
	for _, tc := range []struct {
		name, value string
		want        Limits
		err         string
	}{
		{"iops-limit", "1000", Limits{IOPS: 1000, BPS: 9, Weight: 3, Burst: 2}, ""},
		{"--iops-limit", "none", Limits{BPS: 9, Weight: 3, Burst: 2}, ""},
		{"iops_limit", "0", Limits{BPS: 9, Weight: 3, Burst: 2}, ""},
		{"read-iops-limit", "5", Limits{IOPS: 7, ReadIOPS: 5, BPS: 9, Weight: 3, Burst: 2}, ""},
		{"write-iops-limit", "6", Limits{IOPS: 7, WriteIOPS: 6, BPS: 9, Weight: 3, Burst: 2}, ""},
		{"bps-limit", "50MiB", Limits{IOPS: 7, BPS: 50 << 20, Weight: 3, Burst: 2}, ""},
		{"read-bps-limit", "1G", Limits{IOPS: 7, BPS: 9, ReadBPS: 1 << 30, Weight: 3, Burst: 2}, ""},
		{"write-bps-limit", "200MB", Limits{IOPS: 7, BPS: 9, WriteBPS: 200e6, Weight: 3, Burst: 2}, ""},
		{"bps-reservation", "4096", Limits{IOPS: 7, BPS: 9, BPSReservation: 4096, Weight: 3, Burst: 2}, ""},
		{"iops-reservation", "2000", Limits{IOPS: 7, BPS: 9, IOPSReservation: 2000, Weight: 3, Burst: 2}, ""},
		{"burst", "0.5", Limits{IOPS: 7, BPS: 9, Weight: 3, Burst: 0.5}, ""},
		{"burst", "3s", Limits{IOPS: 7, BPS: 9, Weight: 3, Burst: 3}, ""},
		{"weight", "NONE", Limits{IOPS: 7, BPS: 9, Burst: 2}, ""},
		{"iops-limit", "9223372036854775807", Limits{IOPS: math.MaxInt64, BPS: 9, Weight: 3, Burst: 2}, ""}, // exact, no float detour
		{"iops-limit", "-5", base, `iops-limit "-5" is negative`},
		{"iops-limit", "1k", Limits{IOPS: 1000, BPS: 9, Weight: 3, Burst: 2}, ""},
		{"iops-limit", "1.5", base, `iops-limit "1.5" is not a whole number`},
		{"iops-limit", "", base, "empty value"},
		{"bps-limit", "-1MiB", base, `bps-limit "-1MiB" is negative`},
		{"bps-limit", "fast", base, `bps-limit "fast" is not a size`},
		{"bps-limit", "5XB", base, `unknown unit`},
		{"burst", "soon", base, `burst "soon" is not a number of seconds`},
		{"burst", "-1", base, `burst "-1" is negative`},
		{"burst", "NaN", base, `not a number of seconds`},
		{"weight", "99999", base, "exceeds the maximum of 10000"},
		{"iops", "5", base, `unknown QoS setting "iops"`},
	} {
		l := base
		err := l.SetFlag(tc.name, tc.value)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrBadLimit) {
				t.Errorf("SetFlag(%q, %q) = %v, want an ErrBadLimit with %q", tc.name, tc.value, err, tc.err)
			}
		} else if err != nil {
			t.Errorf("SetFlag(%q, %q): %v", tc.name, tc.value, err)
		}
		if l != tc.want {
			t.Errorf("SetFlag(%q, %q) left %+v, want %+v", tc.name, tc.value, l, tc.want)
		}
	}
}

// TestUnmarshalJSON: the API and the metadata files decode limits by their
// JSON names, from numbers or from the strings the flags take, onto the
// current value (absent fields stay).
func TestUnmarshalJSON(t *testing.T) {
	l := Limits{IOPS: 7, Weight: 3}
	if err := json.Unmarshal([]byte(`{"bps_limit": "200MiB/s", "iops_limit": "5k", "burst": 1.5, "weight": "none"}`), &l); err != nil {
		t.Fatal(err)
	}
	if want := (Limits{IOPS: 5000, BPS: 200 << 20, Burst: 1.5}); l != want {
		t.Fatalf("got %+v, want %+v", l, want)
	}
	for _, bad := range []string{`{"iops-limit": 5}`, `{"iops_limit": -1}`, `{"iops_limit": true}`, `[1]`, `{"iops_limit": "5x"}`} {
		before := l
		if err := json.Unmarshal([]byte(bad), &l); err == nil || !errors.Is(err, ErrBadLimit) {
			t.Errorf("%s: %v, want an ErrBadLimit", bad, err)
		}
		if l != before {
			t.Errorf("%s changed the limits to %+v", bad, l)
		}
	}
	all := Limits{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	b, _ := json.Marshal(all)
	var back Limits
	if err := json.Unmarshal(b, &back); err != nil || back != all {
		t.Fatalf("round trip: %+v, %v", back, err)
	}
}

func TestFlagNamesCoverJSON(t *testing.T) {
	// Every JSON field of Limits is settable by flag, under its own name.
	all := Limits{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	data, err := json.Marshal(all)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.Unmarshal(data, &m)
	if len(m) != len(FlagNames()) {
		t.Fatalf("%d JSON fields, %d flags", len(m), len(FlagNames()))
	}
	var back Limits
	for k, v := range m {
		if err := back.SetFlag(k, strings.TrimSuffix(strings.TrimSuffix(jsonNum(v), ".0"), "e+00")); err != nil {
			t.Fatal(err)
		}
	}
	if back != all {
		t.Fatalf("round trip through SetFlag: %+v, want %+v", back, all)
	}
	// Zero fields are omitted: an empty Limits is {}.
	if data, _ := json.Marshal(Limits{}); string(data) != "{}" {
		t.Fatalf("empty limits marshal to %s", data)
	}
}

func jsonNum(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// FuzzSetFlag: any name and value either fail with ErrBadLimit leaving
// the limits untouched, or set a non-negative field.
func FuzzSetFlag(f *testing.F) {
	for _, s := range [][2]string{{"iops-limit", "100"}, {"bps-limit", "50MiB"}, {"burst", "1.5"}, {"weight", "none"}, {"x", "-1"}, {"bps_limit", "9999999999999T"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, name, value string) {
		base := Limits{IOPS: 1, BPS: 2, Weight: 3}
		l := base
		err := l.SetFlag(name, value)
		if err != nil {
			if !errors.Is(err, ErrBadLimit) || l != base {
				t.Fatalf("SetFlag(%q, %q): %v, limits %+v", name, value, err, l)
			}
			return
		}
		// Only range checks across fields may fail now, never a sign.
		if err := l.Validate(); err != nil && strings.Contains(err.Error(), "negative") {
			t.Fatalf("SetFlag(%q, %q) stored a negative value: %v", name, value, err)
		}
	})
}
