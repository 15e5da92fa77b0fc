package attach

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ublk"
	"github.com/blockd/blockd/volume"
)

// ublkFrontend owns the ublk devices of attached volumes.
type ublkFrontend struct {
	d      *Devices
	log    *slog.Logger
	load   func(string) error
	owner  uint32 // this daemon's tag on its devices (ublkOwner)
	loaded func() bool

	devs map[string]*ublk.Device // guarded by Devices.mu
}

func newUblk(d *Devices, opts Options) *ublkFrontend {
	return &ublkFrontend{d: d, log: opts.Log, load: opts.LoadModule, owner: ublkOwner(opts.DaemonID), loaded: opts.ublkLoaded, devs: map[string]*ublk.Device{}}
}

// ublkOwner is the tag a daemon's ublk devices carry (ublk.Config.Owner):
// 32 bits of its id's hash, which tell it from the few other daemons on a
// node.
func ublkOwner(daemonID string) uint32 {
	h := fnv.New32a()
	h.Write([]byte(daemonID))
	return h.Sum32()
}

func (k *ublkFrontend) config(v *volume.Volume, att *api.Attachment) ublk.Config {
	return ublk.Config{
		ID: -1, Queues: att.Queues, Depth: att.Depth, Size: v.Size(),
		Handler: v, Logger: k.log, LoadModule: k.load, ReadOnly: v.ReadOnly(), Owner: k.owner,
	}
}

// attach exposes a volume as /dev/ublkbN with queues × depth.
func (k *ublkFrontend) attach(v *volume.Volume, req api.AttachRequest) (*api.Attachment, error) {
	name := v.Name()
	if req.Queues < 0 || req.Queues > 32 || req.Depth < 0 || req.Depth > 4096 {
		return nil, api.Errorf(api.CodeInvalid, "attach %s: --queues %d --depth %d: want 1-32 queues of depth 1-4096", name, req.Queues, req.Depth)
	}
	att := &api.Attachment{Frontend: api.FrontendUblk, Queues: req.Queues, Depth: req.Depth}
	dev, err := ublk.Attach(context.Background(), k.config(v, att))
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	info := dev.Info()
	att.Device, att.Index = dev.Path(), dev.ID()
	att.Queues, att.Depth = int(info.NrHwQueues), int(info.QueueDepth)
	k.devs[name] = dev
	k.d.ra.serve(name, ublkDev(dev.ID()))
	if err := k.d.ra.set(ublkDev(dev.ID()), v.EffectiveProfile()); err != nil {
		k.log.Warn("attach: read-ahead not set for io_profile", "volume", name, "err", err)
	}
	return att, nil
}

// ublkDev is the kernel's name of /dev/ublkbID.
func ublkDev(id int) string { return fmt.Sprintf("ublkb%d", id) }

// detach stops and deletes a volume's ublk device.
func (k *ublkFrontend) detach(v *volume.Volume, att *api.Attachment) error {
	name := v.Name()
	k.d.ra.stop(name)
	if dev := k.devs[name]; dev != nil {
		if err := dev.Detach(); err != nil {
			return fmt.Errorf("detach %s: %w", name, err)
		}
		delete(k.devs, name)
	} else if err := ublk.Remove(att.Index, k.load); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("detach %s: %w", name, err)
	}
	return nil
}

// recover re-attaches the ublk devices the metadata records: a device the
// kernel kept (the daemon was killed or restarted) is recovered in place,
// so applications see no error. A recorded device that cannot be
// recovered is forgotten, and every ublk device of ours that is not
// recovered is deleted: no orphans.
func (k *ublkFrontend) recover(want []api.Spec) {
	if len(want) == 0 && !k.loaded() {
		return // nothing recorded, and no driver that could hold orphans
	}
	keep := map[int]bool{}
	for _, s := range want {
		v, err := k.d.vols.Get(s.Name)
		if err != nil {
			continue
		}
		if v.InMemory() {
			k.abandon(s)
			continue
		}
		dev, err := ublk.Recover(context.Background(), s.Attachment.Index, k.config(v, s.Attachment))
		if err != nil {
			k.log.Warn("ublk device not recoverable; volume left detached", "volume", s.Name, "device", s.Attachment.Device, "err", err)
			k.d.forget(s.Name)
			continue
		}
		keep[dev.ID()] = true
		k.devs[s.Name] = dev
		// The kernel kept the device's read-ahead; a profile change
		// from now on reaches it.
		k.d.ra.serve(s.Name, ublkDev(dev.ID()))
		k.log.Info("recovered ublk device", "volume", s.Name, "device", dev.Path())
	}
	removed, err := ublk.Cleanup(k.owner, func(i ublk.DevInfo) bool { return keep[int(i.DevID)] }, k.load)
	if err != nil {
		k.log.Warn("ublk cleanup", "err", err)
	}
	for _, id := range removed {
		k.log.Warn("removed orphaned ublk device", "device", ublk.BlockPath(id))
	}
}

// abandon removes the recorded device of a memory volume instead of
// recovering it: the volume starts empty, so its data is gone. ublk.Abandon
// stops the device, which fails the I/O that waited for a new server
// (EIO), and deletes it; see Devices.memoryLost.
func (k *ublkFrontend) abandon(s api.Spec) {
	att := s.Attachment
	err := ublk.Abandon(att.Index, k.owner, k.load)
	switch {
	case err == nil:
		k.d.memoryLost(s.Name, att.Device, true)
	case errors.Is(err, os.ErrNotExist):
		k.d.memoryLost(s.Name, att.Device, false)
	case errors.Is(err, ublk.ErrNotRecoverable):
		// The id is another server's now: not ours to stop.
		k.log.Warn("dropped the attachment of a memory volume at start: its device is no longer this daemon's", "volume", s.Name, "device", att.Device, "err", err)
		k.d.forget(s.Name)
	default:
		// Cleanup tries again: the device is ours and no longer kept.
		k.log.Error("removing the kernel device of a memory volume at start", "volume", s.Name, "device", att.Device, "err", err)
		k.d.forget(s.Name)
		k.d.vols.SetReason(s.Name, fmt.Sprintf("kernel device %s could not be removed at start (%v); a memory volume's data does not survive a restart", att.Device, err))
	}
}

func (k *ublkFrontend) beginClose() {}

// close stops serving without deleting the devices: the kernel holds their
// I/O until a restarted daemon recovers them.
func (k *ublkFrontend) close() {
	k.d.mu.Lock()
	defer k.d.mu.Unlock()
	for name, dev := range k.devs {
		if err := dev.Release(); err != nil {
			k.log.Warn("releasing ublk device", "volume", name, "err", err)
		}
		delete(k.devs, name)
	}
}
