package attach

import (
	"errors"
	"fmt"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ublk"
	"github.com/blockd/blockd/units"
	"github.com/blockd/blockd/volume"
)

// Online resize: a volume grows while it is a kernel block device, so that
// a mounted filesystem can grow into it (resize2fs, xfs_growfs).
//
// The device grows after the volume, never before: it must not offer
// bytes the engine does not hold. nbd devices grow through
// NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES (nbd_genl_reconfigure
// applies it on Debian's 6.1 and 6.12 alike); ublk devices through
// UPDATE_SIZE, which only drivers newer than 6.12 have (UBLK_F_UPDATE_SIZE,
// Linux 6.16): on 6.12 an attached ublk volume is refused before anything
// changes.

// Resize grows a volume, attached or not; see above.
func (d *Devices) Resize(name string, size int64) (api.Spec, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, err := d.vols.Get(name)
	if err != nil {
		return api.Spec{}, err
	}
	att := v.Spec().Attachment
	if att == nil {
		// Attach and detach wait for d.mu: nothing attaches meanwhile.
		return d.vols.ResizeAttached(name, size)
	}
	if d.off {
		return api.Spec{}, api.Errorf(api.CodeUnavailable, "resize %s: it is attached as %s, and this daemon runs without kernel devices "+
			"(--kernel-devices=false), so the device could not follow", name, att.Device)
	}
	f, ok := d.frontend(att.Frontend)
	if !ok {
		return api.Spec{}, api.Errorf(api.CodeInternal, "volume %s is recorded as attached with unknown frontend %q", name, att.Frontend)
	}
	if err := f.canResize(v, att); err != nil {
		return api.Spec{}, err
	}
	s, err := d.vols.ResizeAttached(name, size)
	if err != nil {
		return api.Spec{}, err
	}
	// Also when the size did not change: a retry grows a device that
	// failed to follow the last time.
	if err := f.resize(v, att, int64(s.Size)); err != nil {
		return api.Spec{}, api.Errorf(api.CodeUnavailable, "resize %s: the volume is %s now, but its device %s did not follow (retry the resize): %w",
			name, units.FormatSize(int64(s.Size)), att.Device, err)
	}
	d.log.Info("kernel device resized", "volume", name, "device", att.Device, "size", units.FormatSize(int64(s.Size)))
	return s, nil
}

func (k *nbdFrontend) canResize(v *volume.Volume, att *api.Attachment) error {
	if _, err := k.netlinkLocked(); err != nil {
		return fmt.Errorf("resize %s: %w", v.Name(), err)
	}
	return nil
}

func (k *nbdFrontend) resize(v *volume.Volume, att *api.Attachment, size int64) error {
	backend := recordedBackend(v.Spec())
	if ka := k.attached[v.Name()]; ka != nil {
		backend = ka.backend
	}
	return k.nl.Resize(att.Index, backend, uint64(size))
}

func (k *ublkFrontend) canResize(v *volume.Volume, att *api.Attachment) error {
	if k.devs[v.Name()] == nil {
		return api.Errorf(api.CodeConflict, "resize %s: its ublk device %s is not served by this daemon", v.Name(), att.Device)
	}
	if err := ublk.CanResize(k.load); err != nil {
		if errors.Is(err, ublk.ErrResizeNotSupported) {
			return api.Errorf(api.CodeConflict, "resize %s: it is attached as %s, and %w; detach it, resize, attach again "+
				"(or attach it with the nbd frontend, which resizes online)", v.Name(), att.Device, err)
		}
		return fmt.Errorf("resize %s: %w", v.Name(), err)
	}
	return nil
}

func (k *ublkFrontend) resize(v *volume.Volume, att *api.Attachment, size int64) error {
	return k.devs[v.Name()].Resize(size)
}
