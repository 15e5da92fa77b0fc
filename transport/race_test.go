//go:build race

package transport

// The race detector makes sync.Pool drop a share of what is put back, so
// quic-go's pools allocate more than in a normal build.
const raceEnabled = true
