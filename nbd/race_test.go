//go:build race

package nbd

// raceEnabled: the race detector makes sync.Pool drop a share of Puts on
// purpose, so pooled paths allocate under it; allocation tests of those
// paths run without it (make test runs them both ways).
const raceEnabled = true
