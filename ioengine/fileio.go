package ioengine

import (
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/uring"
)

// fileRingEntries is how many operations a file engine's ring has in
// flight at most (further ones wait for a slot): two NBD connections of
// queue depth 32, or a ublk device's queues, with room to spare.
const fileRingEntries = 128

// useURing is false when BLOCKD_IO_URING=0: every file engine then uses
// system calls (a kill switch, and the baseline for benchmarks).
var useURing = os.Getenv("BLOCKD_IO_URING") != "0"

// newShared makes a file engine's ring; tests replace it.
var newShared = uring.NewShared

// FileIOStats says how the file engines of this process do their I/O.
type FileIOStats struct {
	// URing and Syscalls count the open file engines whose I/O goes
	// through io_uring and through system calls.
	URing, Syscalls int64
	// Fallbacks counts file engines that wanted io_uring and got system
	// calls (io_uring unavailable or refused, or a ring that failed);
	// LastFallback is the latest reason.
	Fallbacks    int64
	LastFallback string
}

// fileIO counts the process's file engines by how they do I/O.
var fileIO fileIOCounts

type fileIOCounts struct {
	uring, syscalls, fallbacks atomic.Int64
	mu                         sync.Mutex
	last                       string // the latest fallback's reason
	logged                     bool   // the first fallback was logged
}

// count adds d to the engines using the ring (ring) or system calls.
func (c *fileIOCounts) count(ring bool, d int64) {
	if ring {
		c.uring.Add(d)
	} else {
		c.syscalls.Add(d)
	}
}

// FileIO returns how the file engines of this process do their I/O.
func FileIO() FileIOStats {
	fileIO.mu.Lock()
	defer fileIO.mu.Unlock()
	return FileIOStats{URing: fileIO.uring.Load(), Syscalls: fileIO.syscalls.Load(),
		Fallbacks: fileIO.fallbacks.Load(), LastFallback: fileIO.last}
}

// uringFallback records that a file engine uses system calls because of
// err, and logs it (through slog's default logger, which the daemon sets
// to its own) the first time in the process.
func uringFallback(err error) {
	fileIO.fallbacks.Add(1)
	fileIO.mu.Lock()
	fileIO.last = err.Error()
	first := !fileIO.logged
	fileIO.logged = true
	fileIO.mu.Unlock()
	if first {
		slog.Warn("file engine: io_uring unavailable, doing I/O with system calls (pread/pwrite/fdatasync); requests hold a thread each while they wait for the disk",
			"err", err)
	}
}
