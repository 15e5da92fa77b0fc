// Package attach exposes volumes as kernel block devices, one frontend
// beside the other: nbd (/dev/nbdN, sockets from socketpair served by the
// nbd package) and ublk (/dev/ublkbN, served by the ublk package). An
// attachment is part of the volume's metadata, so a daemon that was
// killed or restarted finds its devices again (Recover) and hands them new
// sockets or queues while their I/O waits; SIGTERM leaves devices
// attached for the next daemon, and only Detach removes them.
package attach

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/kernel/nbdnl"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/volume"
)

// Volumes is the volume registry as attach uses it (volume.Registry).
type Volumes interface {
	Get(name string) (*volume.Volume, error)
	SetAttachment(name string, att *api.Attachment) (api.Spec, error)
	Detached(name string, att *api.Attachment) (api.Spec, error)
	AttachedWith(frontend string) []api.Spec
	// ResizeAttached grows a volume, attached or not (Devices.Resize
	// grows the device after it).
	ResizeAttached(name string, size int64) (api.Spec, error)
	// SetReason records what the daemon did to a volume at start; the
	// API shows it with the volume.
	SetReason(name, reason string)
}

// Options tune kernel attachments.
type Options struct {
	// Disabled runs the daemon without kernel devices (blockd serve
	// --kernel-devices=false): no module is loaded, Recover does nothing
	// (recorded attachments stay as recorded), and Attach and Detach
	// fail with CodeUnavailable.
	Disabled bool
	// Timeout is the kernel nbd per-request timeout. When it expires the
	// kernel marks that socket dead and requeues the request; the daemon
	// then hands the device a fresh socket. Default 30s.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds nbd I/O while every
	// socket is dead (the daemon is restarting) before failing it.
	// Default 2m.
	DeadConnTimeout time.Duration
	// DaemonID tells this daemon's kernel devices from those of other
	// daemons on the node (daemon.Start keeps it in the state dir): nbd
	// devices are connected with the backend id blockd:ID:VOLUME, ublk
	// devices carry a tag made from it, and Recover's clean-up removes
	// only devices with this daemon's mark. Default: a random id for this
	// process (its devices still recover, by the backend id recorded
	// with each attachment, but no later process cleans up after it).
	DaemonID string
	// LoadModule loads a kernel module; default kernel/module.Load.
	LoadModule func(name string) error
	// Log receives attach, detach and recovery events; default
	// slog.Default().
	Log *slog.Logger

	// dialNetlink opens the kernel nbd netlink client; default
	// nbdnl.Dial. Tests substitute a fake.
	dialNetlink func() (nbdNetlink, error)
	// sysBlock is where the kernel shows block devices; default
	// /sys/block. Tests point it at a temp tree.
	sysBlock string
	// ublkLoaded reports whether ublk_drv is live (then recovery looks
	// for orphaned ublk devices even when none is recorded); default
	// module.Loaded. Tests keep the host's driver out of it.
	ublkLoaded func() bool
	// replaceBackoff is the first wait before replacing a socket the
	// kernel dropped (it doubles after each failed attempt), and
	// replaceAttempts how many attempts a replacement gets before it is
	// given up; defaults 100ms and 6 (about 6s in all).
	replaceBackoff  time.Duration
	replaceAttempts int
}

func (o *Options) defaults() {
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	if o.DeadConnTimeout == 0 {
		o.DeadConnTimeout = 2 * time.Minute
	}
	if o.LoadModule == nil {
		o.LoadModule = module.Load
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.DaemonID == "" {
		var r [8]byte
		rand.Read(r[:])
		o.DaemonID = hex.EncodeToString(r[:])
	}
	if o.dialNetlink == nil {
		o.dialNetlink = func() (nbdNetlink, error) { return nbdnl.Dial() }
	}
	if o.sysBlock == "" {
		o.sysBlock = "/sys/block"
	}
	if o.ublkLoaded == nil {
		o.ublkLoaded = func() bool { return module.Loaded("ublk_drv") }
	}
	if o.replaceBackoff == 0 {
		o.replaceBackoff = 100 * time.Millisecond
	}
	if o.replaceAttempts == 0 {
		o.replaceAttempts = 6
	}
}

// frontend is one kind of kernel device. Its methods run with
// Devices.mu held.
type frontend interface {
	attach(v *volume.Volume, req api.AttachRequest) (*api.Attachment, error)
	detach(v *volume.Volume, att *api.Attachment) error
	// recover re-attaches the devices of the volumes recorded as
	// attached with this frontend and removes devices of ours that no
	// volume records.
	recover(want []api.Spec)
	// canResize says why an attached device cannot grow, before the
	// volume does; resize grows it to size once the volume has.
	canResize(v *volume.Volume, att *api.Attachment) error
	resize(v *volume.Volume, att *api.Attachment, size int64) error
	// beginClose stops attaches and background repairs.
	beginClose()
	// close stops serving without removing the devices.
	close()
}

// Devices owns the kernel devices of attached volumes, for both frontends.
type Devices struct {
	vols Volumes
	log  *slog.Logger
	off  bool // Options.Disabled
	nbd  *nbdFrontend
	ublk *ublkFrontend
	ra   *readAhead

	mu      sync.Mutex // serializes attach, detach and recovery
	closing bool
}

// New returns the kernel attachments of vols; nbd devices are served by
// srv.
func New(srv *nbd.Server, vols Volumes, opts Options) *Devices {
	opts.defaults()
	d := &Devices{vols: vols, log: opts.Log, off: opts.Disabled, ra: newReadAhead(opts.sysBlock, opts.Log)}
	d.nbd = newNBD(d, srv, opts)
	d.ublk = newUblk(d, opts)
	return d
}

func (d *Devices) frontend(name string) (frontend, bool) {
	switch name {
	case api.FrontendNBD, "":
		return d.nbd, true
	case api.FrontendUblk:
		return d.ublk, true
	}
	return nil, false
}

// Attach exposes a volume as a kernel block device.
func (d *Devices) Attach(name string, req api.AttachRequest) (api.Spec, error) {
	f, ok := d.frontend(req.Frontend)
	if !ok {
		return api.Spec{}, api.Errorf(api.CodeInvalid, "frontend %q: want %s or %s", req.Frontend, api.FrontendNBD, api.FrontendUblk)
	}
	if req.Frontend == "" {
		req.Frontend = api.FrontendNBD
	}
	if err := d.offErr("attach", name); err != nil {
		return api.Spec{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return api.Spec{}, api.Errorf(api.CodeUnavailable, "attach %s: the daemon is shutting down", name)
	}
	v, err := d.vols.Get(name)
	if err != nil {
		return api.Spec{}, err
	}
	if a := v.Spec().Attachment; a != nil {
		return api.Spec{}, api.Errorf(api.CodeConflict, "volume %s is already attached as %s", name, a.Device)
	}
	att, err := f.attach(v, req)
	if err != nil {
		return api.Spec{}, err
	}
	s, err := d.vols.SetAttachment(name, att)
	if err != nil {
		if derr := f.detach(v, att); derr != nil {
			d.log.Error("removing a device whose attachment could not be recorded", "volume", name, "device", att.Device, "err", derr)
		}
		return api.Spec{}, err
	}
	d.log.Info("volume attached", "volume", name, "device", att.Device, "frontend", att.Frontend,
		"connections", att.Connections, "queues", att.Queues, "depth", att.Depth)
	return s, nil
}

// Detach removes a volume's kernel device and clears its attachment.
func (d *Devices) Detach(name string) (api.Spec, error) {
	if err := d.offErr("detach", name); err != nil {
		return api.Spec{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v, err := d.vols.Get(name)
	if err != nil {
		return api.Spec{}, err
	}
	att := v.Spec().Attachment
	if att == nil {
		return api.Spec{}, api.Errorf(api.CodeConflict, "volume %s is not attached", name)
	}
	f, ok := d.frontend(att.Frontend)
	if !ok {
		return api.Spec{}, api.Errorf(api.CodeInternal, "volume %s is recorded as attached with unknown frontend %q", name, att.Frontend)
	}
	if err := f.detach(v, att); err != nil {
		return api.Spec{}, err
	}
	return d.vols.Detached(name, att)
}

// offErr is the refusal of op on volume name when kernel devices are off.
func (d *Devices) offErr(op, name string) error {
	if !d.off {
		return nil
	}
	return api.Errorf(api.CodeUnavailable, "%s %s: this daemon runs without kernel devices (blockd serve --kernel-devices=false); "+
		"it serves volumes over NBD only", op, name)
}

// Recover re-attaches every device the metadata records (see the
// frontends' recover); without kernel devices it does nothing.
func (d *Devices) Recover() {
	if d.off {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.nbd.recover(d.vols.AttachedWith(api.FrontendNBD))
	d.ublk.recover(d.vols.AttachedWith(api.FrontendUblk))
}

// ProfileChanged makes an attached device's read-ahead follow its
// volume's effective io_profile.
func (d *Devices) ProfileChanged(name string, eff profile.Profile) {
	d.ra.changed(name, eff)
}

// BeginClose stops attaches and socket replacement; call it before the nbd
// server shuts down, so that sockets it closes are not replaced.
func (d *Devices) BeginClose() {
	d.mu.Lock()
	d.closing = true
	d.mu.Unlock()
	d.nbd.beginClose()
	d.ublk.beginClose()
	d.ra.close()
}

// Close stops serving kernel devices without removing them: the kernel
// holds their I/O until a restarted daemon recovers them.
func (d *Devices) Close() {
	d.BeginClose()
	d.ublk.close()
	d.nbd.close()
}

// memoryLost clears the attachment of a memory volume whose kernel device
// the daemon detached at start, and says why in the log (at error level:
// whatever used the device lost its data) and on the volume. The volume's
// data lived in the previous daemon's memory: serving the device on from
// the new, empty volume would hand a mounted filesystem zeroes where its
// data was, so the device's I/O fails instead. failed says whether the
// device was still there with I/O to fail (else it was already gone).
func (d *Devices) memoryLost(name, dev string, failed bool) {
	reason := fmt.Sprintf("kernel device %s was detached at start: a memory volume's data does not survive a restart", dev)
	if failed {
		reason += ", so its I/O was failed (EIO) rather than served as zeroes"
		d.log.Error("detached the kernel device of a memory volume at start: its data did not survive the restart, so its I/O fails (EIO) instead of reading zeroes",
			"volume", name, "device", dev)
	} else {
		d.log.Warn("dropped the attachment of a memory volume at start: its data did not survive the restart, and its kernel device is gone",
			"volume", name, "device", dev)
	}
	d.forget(name)
	d.vols.SetReason(name, reason)
}

// forget clears the attachment of a volume whose device is gone or could
// not be recovered.
func (d *Devices) forget(name string) {
	if _, err := d.vols.SetAttachment(name, nil); err != nil {
		d.log.Error("clearing the attachment of a device that is gone", "volume", name, "err", err)
	}
}
