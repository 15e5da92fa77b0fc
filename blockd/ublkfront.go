package blockd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/ublk"
)

// FrontendUblk exposes a volume as /dev/ublkbN (kernel 6.0+).
const FrontendUblk = "ublk"

// kernelUblk owns the ublk devices of attached volumes.
type kernelUblk struct {
	m    *Manager
	log  *slog.Logger
	load func(string) error

	mu      sync.Mutex // serializes attach, detach, recovery; guards below
	devs    map[string]*ublk.Device
	closing bool
}

func newKernelUblk(m *Manager, log *slog.Logger, load func(string) error) *kernelUblk {
	if load == nil {
		load = module.Load
	}
	return &kernelUblk{m: m, log: log, load: load, devs: map[string]*ublk.Device{}}
}

func (k *kernelUblk) config(v *Volume, att *Attachment) ublk.Config {
	return ublk.Config{
		ID: -1, Queues: att.Queues, Depth: att.Depth, Size: v.Size(),
		Handler: v, Logger: k.log, LoadModule: k.load, ReadOnly: v.ReadOnly(),
	}
}

// Attach exposes a volume as /dev/ublkbN with queues × depth.
func (k *kernelUblk) Attach(name string, queues, depth int) (Spec, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closing {
		return Spec{}, fmt.Errorf("attach %s: daemon is shutting down", name)
	}
	v, err := k.m.Get(name)
	if err != nil {
		return Spec{}, err
	}
	if a := v.Spec().Attachment; a != nil {
		return Spec{}, fmt.Errorf("attach %s: %w: already attached as %s", name, ErrConflict, a.Device)
	}
	if queues < 0 || queues > 32 || depth < 0 || depth > 4096 {
		return Spec{}, fmt.Errorf("attach %s: %w: --queues %d --depth %d: want 1-32 queues of depth 1-4096", name, ErrInvalid, queues, depth)
	}
	att := &Attachment{Frontend: FrontendUblk, Queues: queues, Depth: depth}
	dev, err := ublk.Attach(context.Background(), k.config(v, att))
	if err != nil {
		return Spec{}, fmt.Errorf("attach %s: %w", name, err)
	}
	info := dev.Info()
	att.Device, att.Index = dev.Path(), dev.ID()
	att.Queues, att.Depth = int(info.NrHwQueues), int(info.QueueDepth)
	s, err := k.m.setAttachment(name, att)
	if err != nil {
		dev.Detach()
		return Spec{}, fmt.Errorf("attach %s: %w", name, err)
	}
	k.devs[name] = dev
	k.log.Info("volume attached", "volume", name, "device", att.Device, "queues", att.Queues, "depth", att.Depth)
	return s, nil
}

// Detach stops and deletes a volume's ublk device.
func (k *kernelUblk) Detach(name string) (Spec, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	v, err := k.m.Get(name)
	if err != nil {
		return Spec{}, err
	}
	att := v.Spec().Attachment
	if att == nil || att.Frontend != FrontendUblk {
		return Spec{}, fmt.Errorf("detach %s: %w: volume is not attached with ublk", name, ErrConflict)
	}
	if dev := k.devs[name]; dev != nil {
		if err := dev.Detach(); err != nil {
			return Spec{}, fmt.Errorf("detach %s: %w", name, err)
		}
		delete(k.devs, name)
	} else if err := ublk.Remove(att.Index, k.load); err != nil && !errors.Is(err, os.ErrNotExist) {
		return Spec{}, fmt.Errorf("detach %s: %w", name, err)
	}
	return k.m.detached(name, att)
}

// Recover re-attaches the ublk devices the metadata records: a device the
// kernel kept (the daemon was killed or restarted) is recovered in place,
// so applications see no error. A recorded device that cannot be
// recovered is forgotten, and every ublk device of ours that is not
// recovered is deleted: no orphans.
func (k *kernelUblk) Recover() {
	k.mu.Lock()
	defer k.mu.Unlock()
	want := k.m.attachedWith(FrontendUblk)
	if len(want) == 0 && !module.Loaded("ublk_drv") {
		return // nothing recorded, and no driver that could hold orphans
	}
	keep := map[int]bool{}
	for _, s := range want {
		v, err := k.m.Get(s.Name)
		if err != nil {
			continue
		}
		dev, err := ublk.Recover(context.Background(), s.Attachment.Index, k.config(v, s.Attachment))
		if err != nil {
			k.log.Warn("ublk device not recoverable; volume left detached", "volume", s.Name, "device", s.Attachment.Device, "err", err)
			k.m.setAttachment(s.Name, nil)
			continue
		}
		keep[dev.ID()] = true
		k.devs[s.Name] = dev
		k.log.Info("recovered ublk device", "volume", s.Name, "device", dev.Path())
	}
	removed, err := ublk.Cleanup(func(i ublk.DevInfo) bool { return keep[int(i.DevID)] }, k.load)
	if err != nil {
		k.log.Warn("ublk cleanup", "err", err)
	}
	for _, id := range removed {
		k.log.Warn("removed orphaned ublk device", "device", ublk.BlockPath(id))
	}
}

// Close stops serving without deleting the devices: the kernel holds their
// I/O until a restarted daemon recovers them.
func (k *kernelUblk) Close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closing = true
	for name, dev := range k.devs {
		if err := dev.Release(); err != nil {
			k.log.Warn("releasing ublk device", "volume", name, "err", err)
		}
		delete(k.devs, name)
	}
}
