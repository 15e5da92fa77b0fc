package cluster_test

import (
	"slices"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cluster"
)

func TestPlace(t *testing.T) {
	three := []cluster.Candidate{{Name: "a", Free: 10}, {Name: "b", Free: 30}, {Name: "c", Free: 20}}
	zoned := []cluster.Candidate{
		{Name: "a1", Zone: "a", Free: 50}, {Name: "a2", Zone: "a", Free: 40},
		{Name: "b1", Zone: "b", Free: 10}, {Name: "c1", Zone: "c", Free: 5},
	}
	for _, tc := range []struct {
		name  string
		n     int
		cands []cluster.Candidate
		pin   []string
		zones []string
		want  []string
		code  api.Code
	}{
		{name: "most free first", n: 2, cands: three, want: []string{"b", "c"}},
		{name: "all", n: 3, cands: three, want: []string{"a", "b", "c"}},
		{name: "one", n: 1, cands: three, want: []string{"b"}},
		{name: "too few", n: 4, cands: three, code: api.CodeUnavailable},
		{name: "zones before free space", n: 3, cands: zoned, want: []string{"a1", "b1", "c1"}},
		{name: "two zones", n: 2, cands: zoned, want: []string{"a1", "b1"}},
		{name: "zone filter", n: 2, cands: zoned, zones: []string{"a"}, want: []string{"a1", "a2"}},
		{name: "zone filter spreads", n: 2, cands: zoned, zones: []string{"a", "c"}, want: []string{"a1", "c1"}},
		{name: "zone filter too few", n: 2, cands: zoned, zones: []string{"c"}, code: api.CodeUnavailable},
		{name: "pinned", n: 2, cands: three, pin: []string{"c", "a"}, want: []string{"a", "c"}},
		{name: "pinned twice", n: 2, cands: three, pin: []string{"a", "a"}, code: api.CodeInvalid},
		{name: "pinned count", n: 3, cands: three, pin: []string{"a"}, code: api.CodeInvalid},
		{name: "pinned unknown", n: 1, cands: three, pin: []string{"x"}, code: api.CodeInvalid},
		{name: "pinned outside zones", n: 1, cands: zoned, pin: []string{"b1"}, zones: []string{"a"}, code: api.CodeInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := cluster.Place(tc.n, tc.cands, tc.pin, tc.zones)
			if tc.code != "" {
				if api.CodeOf(err) != tc.code {
					t.Fatalf("got %v, %v; want a %s error", got, err, tc.code)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestReplacement(t *testing.T) {
	cands := []cluster.Candidate{{Name: "a1", Zone: "a", Free: 90}, {Name: "b1", Zone: "b", Free: 10}, {Name: "b2", Zone: "b", Free: 20}, {Name: "c1", Zone: "c", Free: 1}}
	zoneOf := map[string]string{"a1": "a", "b1": "b", "b2": "b", "c1": "c", "gone": "c"}
	// The lost copy was in zone c: a node of zone c comes first, even
	// with less free space.
	if got, err := cluster.Replacement(cands, []string{"a1", "b1"}, zoneOf); err != nil || got != "c1" {
		t.Fatalf("got %q, %v; want c1", got, err)
	}
	// No zone left unused: the most free space.
	if got, err := cluster.Replacement(cands[:3], []string{"b1"}, zoneOf); err != nil || got != "a1" {
		t.Fatalf("got %q, %v; want a1", got, err)
	}
	if _, err := cluster.Replacement(cands[:2], []string{"a1", "b1"}, zoneOf); err == nil {
		t.Fatal("a replacement among the holders")
	}
}
