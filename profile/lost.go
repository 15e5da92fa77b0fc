package profile

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/blockd/blockd/pipeline"
)

// lost records the first time the stage could no longer vouch for data it
// had acknowledged: an engine flush failed, a durable (FUA) write failed,
// or the write-back buffer could not write acknowledged data to the
// engine. From then on every FLUSH and every FUA write fails with it,
// whatever the profile, until the volume is reopened (a new Stage).
//
// A failed fdatasync is reported once: the kernel clears the error it
// returned, so a later flush that succeeds proves nothing about the
// page-cache writes (db) the failed one covered, and an RWF_DSYNC write
// consumes such an error the same way. Nothing after the failure can tell
// the lost writes from the kept ones, and every later FLUSH covers them.
// So the failure is the stage's, not one profile's: switching to none,
// whose FLUSH goes straight to the engine, must not clear it.
type lost struct{ err atomic.Pointer[error] }

// get returns the recorded failure, or nil.
func (l *lost) get() error {
	if p := l.err.Load(); p != nil {
		return *p
	}
	return nil
}

// set records err unless a failure is recorded already, and returns the
// recorded one.
func (l *lost) set(err error) error {
	wrapped := fmt.Errorf("durability lost: %w", err)
	if l.err.CompareAndSwap(nil, &wrapped) {
		return wrapped
	}
	return l.get()
}

// durable returns err, first recording it if it was the failure of a
// durable write: one refused before any I/O (a bad range, a read-only
// volume) cannot have cost anything.
func (l *lost) durable(err error) error {
	if err == nil || refused(err) {
		return err
	}
	l.set(err)
	return err
}

func refused(err error) bool {
	return errors.Is(err, pipeline.ErrOutOfRange) || errors.Is(err, pipeline.ErrMisaligned) ||
		errors.Is(err, pipeline.ErrTooLarge) || errors.Is(err, pipeline.ErrReadOnly) ||
		errors.Is(err, pipeline.ErrNotSupported)
}
