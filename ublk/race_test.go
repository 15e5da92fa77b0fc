//go:build race

package ublk

// raceEnabled: the race detector allocates on its own account.
const raceEnabled = true
