// Package leakcheck is for tests that prove a component leaves nothing
// behind: goroutines and file descriptors.
package leakcheck

import (
	"os"
	"runtime"
	"testing"
	"time"
)

// Goroutines waits (at most 10s) for the goroutine count to fall to at
// most want, and fails with every stack if it does not.
func Goroutines(t testing.TB, want int) {
	t.Helper()
	var n int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if n = runtime.NumGoroutine(); n <= want {
			return
		}
	}
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	t.Fatalf("%d goroutines, want at most %d:\n%s", n, want, buf)
}

// FDs is the number of open file descriptors of the process.
func FDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
