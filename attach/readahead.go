package attach

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/blockd/blockd/profile"
)

// readAhead keeps the kernel read-ahead of the devices this daemon serves
// (nbd and ublk alike) in step with their volumes' effective io_profile.
// Writing the sysfs attribute freezes the queue (6.12), which waits for
// the requests in flight: on a device whose server died with the previous
// daemon that wait ends only after the device is reconnected, so the write
// never sits on the path that reconnects it. Changes run on goroutines
// owned here (close waits for them, for a while).
type readAhead struct {
	sysBlock string
	log      *slog.Logger

	mu     sync.Mutex // guards live and closed; never held across I/O
	live   map[string]string
	closed bool
	bg     sync.WaitGroup
}

func newReadAhead(sysBlock string, log *slog.Logger) *readAhead {
	return &readAhead{sysBlock: sysBlock, log: log, live: map[string]string{}}
}

// serve records that this daemon serves volume's device dev ("nbd3",
// "ublkb2").
func (r *readAhead) serve(volume, dev string) {
	r.mu.Lock()
	r.live[volume] = dev
	r.mu.Unlock()
}

// stop forgets volume's device.
func (r *readAhead) stop(volume string) {
	r.mu.Lock()
	delete(r.live, volume)
	r.mu.Unlock()
}

// changed sets the read-ahead of volume's device, if this daemon serves
// one, in the background.
func (r *readAhead) changed(volume string, eff profile.Profile) {
	r.mu.Lock()
	defer r.mu.Unlock()
	dev, ok := r.live[volume]
	if !ok || r.closed {
		return
	}
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		if err := r.set(dev, eff); err != nil && !errors.Is(err, fs.ErrNotExist) {
			r.log.Warn("io_profile changed but read-ahead was not", "volume", volume, "err", err)
		}
	}()
}

// set writes dev's read-ahead for profile p (sequential 4 MiB, random
// 16 KiB, others 128 KiB).
func (r *readAhead) set(dev string, p profile.Profile) error {
	path := filepath.Join(r.sysBlock, dev, "queue", "read_ahead_kb")
	if err := os.WriteFile(path, fmt.Appendf(nil, "%d\n", profile.ReadAheadKB(p)), 0o644); err != nil {
		return fmt.Errorf("set read-ahead: %w", err)
	}
	return nil
}

// close starts no more changes and waits for those under way; one stuck
// behind a dead device does not hold up shutdown for long.
func (r *readAhead) close() {
	r.mu.Lock()
	r.closed = true
	clear(r.live)
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.bg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		r.log.Warn("a kernel read-ahead update is still blocked; closing anyway")
	}
}
