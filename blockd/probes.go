package blockd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/blockd/blockd/probe"
)

// Probe modes of `blockd serve --probe-devices`.
const (
	ProbeDevicesOurs = "ours" // only the kernel devices of attached volumes
	ProbeDevicesAll  = "all"  // every block device on the node
)

// startProbes loads the per-pod eBPF accounting. Without BPF permission or
// BTF it logs one line and the daemon runs without it.
func (d *Daemon) startProbes() {
	if !d.cfg.Probes {
		return
	}
	p, err := probe.New(probe.Options{AllDevices: d.cfg.ProbeDevices == ProbeDevicesAll})
	if err != nil {
		if errors.Is(err, probe.ErrUnavailable) {
			d.log.Warn("per-pod I/O probes unavailable; running without them", "err", err)
		} else {
			d.log.Error("per-pod I/O probes failed to load; running without them", "err", err)
		}
		return
	}
	d.probe = p
	d.reg.MustRegister(p)
	ctx, cancel := context.WithCancel(context.Background())
	d.probeStop = cancel
	d.probeDone = make(chan struct{})
	go func() { // drops dead cgroups even when nobody scrapes; exits on probeStop
		defer close(d.probeDone)
		p.Run(ctx, time.Minute)
	}()
	d.updateProbeDevices()
	d.log.Info("per-pod I/O probes on", "tracepoints", p.Tracepoints(), "devices", d.cfg.ProbeDevices)
}

// updateProbeDevices points the probes at the devices of attached volumes.
func (d *Daemon) updateProbeDevices() {
	if d.probe == nil || d.cfg.ProbeDevices == ProbeDevicesAll {
		return
	}
	var devs []uint32
	for _, s := range d.volumes.List() {
		if s.Attachment == nil {
			continue
		}
		dev, err := probe.DevOfPath(s.Attachment.Device)
		if err != nil {
			d.log.Warn("probe: cannot account device", "device", s.Attachment.Device, "err", err)
			continue
		}
		devs = append(devs, dev)
	}
	if err := d.probe.SetDevices(devs); err != nil {
		d.log.Warn("probe: setting devices", "err", err)
	}
}

func (d *Daemon) stopProbes() {
	if d.probe == nil {
		return
	}
	d.probeStop()
	<-d.probeDone
	d.reg.Unregister(d.probe)
	d.probe.Close()
	d.probe = nil
}

// podsHandler serves GET /v1/io/pods: the probes' current snapshot.
func (d *Daemon) podsHandler(w http.ResponseWriter, r *http.Request) {
	if d.probe == nil {
		writeError(w, fmt.Errorf("%w: per-pod I/O probes are off or unavailable (see the daemon log)", ErrConflict))
		return
	}
	snap, err := d.probe.Snapshot()
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, snap)
}

// IOPods returns the daemon's per-pod I/O snapshot.
func (c *Client) IOPods() (probe.Snapshot, error) {
	var s probe.Snapshot
	return s, c.do("GET", "/v1/io/pods", nil, &s)
}

func topCmd(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("top", "blockd top [--interval 1s]", stderr)
	sock := apiSocketFlag(fs)
	interval := fs.Duration("interval", time.Second, "refresh interval")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(fs, pos, 0, "top takes no arguments"); err != nil {
		return err
	}
	c := NewClient(*sock)
	if _, err := c.IOPods(); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = probe.Top(ctx, stdout, c.IOPods, *interval)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
