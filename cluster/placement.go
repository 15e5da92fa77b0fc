package cluster

import (
	"fmt"
	"slices"
	"strings"

	"github.com/blockd/blockd/api"
)

// ZoneLabel is the node label placement spreads copies over.
const ZoneLabel = "zone"

// Candidate is a ready node placement may choose.
type Candidate struct {
	Name string
	Zone string
	Free int64
}

// Place chooses n nodes for a volume's copies: never two on one node;
// spread over as many zones as there are (the zone with the fewest copies
// so far first), then the node with the most free space. pin names the
// nodes outright; zones restricts the choice to nodes of those zones.
func Place(n int, cands []Candidate, pin, zones []string) ([]string, error) {
	if n < 1 {
		return nil, api.Errorf(api.CodeInvalid, "repl %d: want at least one copy", n)
	}
	byName := map[string]Candidate{}
	for _, c := range cands {
		byName[c.Name] = c
	}
	if len(pin) > 0 {
		if len(pin) != n {
			return nil, api.Errorf(api.CodeInvalid, "repl %d needs %d nodes; --nodes names %d", n, n, len(pin))
		}
		out := slices.Sorted(slices.Values(pin))
		if len(slices.Compact(slices.Clone(out))) != len(out) {
			return nil, api.Errorf(api.CodeInvalid, "nodes %s: a node holds at most one copy", strings.Join(pin, ","))
		}
		for _, p := range out {
			c, ok := byName[p]
			if !ok {
				return nil, api.Errorf(api.CodeInvalid, "node %q is not a ready node of the cluster (ready: %s)", p, names(cands))
			}
			if len(zones) > 0 && !slices.Contains(zones, c.Zone) {
				return nil, api.Errorf(api.CodeInvalid, "node %s is in zone %q, not in %s", p, c.Zone, strings.Join(zones, ","))
			}
		}
		return out, nil
	}
	pool := slices.Clone(cands)
	if len(zones) > 0 {
		pool = slices.DeleteFunc(pool, func(c Candidate) bool { return !slices.Contains(zones, c.Zone) })
	}
	if len(pool) < n {
		where := "the cluster has"
		if len(zones) > 0 {
			where = "zones " + strings.Join(zones, ",") + " have"
		}
		return nil, api.Errorf(api.CodeUnavailable, "repl %d needs %d ready nodes; %s %d (%s)", n, n, where, len(pool), names(pool))
	}
	perZone := map[string]int{}
	var out []string
	for range n {
		best := -1
		for i, c := range pool {
			if best < 0 || better(c, pool[best], perZone) {
				best = i
			}
		}
		c := pool[best]
		out = append(out, c.Name)
		perZone[c.Zone]++
		pool = slices.Delete(pool, best, best+1)
	}
	slices.Sort(out)
	return out, nil
}

// better: fewer copies in its zone, then more free space, then the name.
func better(a, b Candidate, perZone map[string]int) bool {
	if za, zb := perZone[a.Zone], perZone[b.Zone]; za != zb {
		return za < zb
	}
	if a.Free != b.Free {
		return a.Free > b.Free
	}
	return a.Name < b.Name
}

func names(cs []Candidate) string {
	if len(cs) == 0 {
		return "none"
	}
	var ns []string
	for _, c := range cs {
		ns = append(ns, c.Name)
	}
	slices.Sort(ns)
	return strings.Join(ns, ", ")
}

// Replacement chooses the node for a new copy in place of a lost one: a
// ready node without a copy, in a zone the volume's other copies do not
// use if there is one, then with the most free space.
func Replacement(cands []Candidate, holders []string, zoneOf map[string]string) (string, error) {
	perZone := map[string]int{}
	for _, h := range holders {
		perZone[zoneOf[h]]++
	}
	var pool []Candidate
	for _, c := range cands {
		if !slices.Contains(holders, c.Name) {
			pool = append(pool, c)
		}
	}
	if len(pool) == 0 {
		return "", fmt.Errorf("no ready node without a copy of the volume")
	}
	best := pool[0]
	for _, c := range pool[1:] {
		if better(c, best, perZone) {
			best = c
		}
	}
	return best.Name, nil
}
