package daemon

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/probe"
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

// pods serves GET /v1/io/pods: the probes' current snapshot.
func (d *Daemon) pods(w http.ResponseWriter, r *http.Request) {
	if d.probe == nil {
		writeError(w, api.Errorf(api.CodeUnavailable, "per-pod I/O probes are off or unavailable (see the daemon log)"))
		return
	}
	snap, err := d.probe.Snapshot()
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, snap)
}
