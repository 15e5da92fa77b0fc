package csi

import (
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// Mounter is what the node service does to filesystems; the host's
// implementation runs mount, umount, blkid, mkfs.*, fsck, resize2fs and
// xfs_growfs from PATH (the container image ships them).
type Mounter interface {
	// FormatAndMount mounts source at target, formatting it with fstype
	// first if it holds no filesystem (never one that holds one).
	FormatAndMount(source, target, fstype string, options []string) error
	// Mount mounts (bind mounts with "bind" in options).
	Mount(source, target, fstype string, options []string) error
	Unmount(target string) error
	// IsMountPoint reports whether path is a mount point (a bind-mounted
	// file included).
	IsMountPoint(path string) (bool, error)
	// CleanupMountPoint unmounts path if it is a mount point and removes
	// it (a directory or a file); a missing path is not an error.
	CleanupMountPoint(path string) error
	// ResizeFs grows the filesystem on device, mounted at path, to the
	// device's size.
	ResizeFs(device, path string) error
}

type hostMounter struct {
	m  *mount.SafeFormatAndMount
	rs *mount.ResizeFs
}

// NewMounter returns the host's Mounter (k8s.io/mount-utils).
func NewMounter() Mounter {
	ex := utilexec.New()
	return &hostMounter{m: mount.NewSafeFormatAndMount(mount.New(""), ex), rs: mount.NewResizeFs(ex)}
}

func (h *hostMounter) FormatAndMount(source, target, fstype string, options []string) error {
	return h.m.FormatAndMount(source, target, fstype, options)
}

func (h *hostMounter) Mount(source, target, fstype string, options []string) error {
	return h.m.Mount(source, target, fstype, options)
}

func (h *hostMounter) Unmount(target string) error { return h.m.Unmount(target) }

func (h *hostMounter) IsMountPoint(path string) (bool, error) {
	return h.m.IsMountPoint(path)
}

func (h *hostMounter) CleanupMountPoint(path string) error {
	return mount.CleanupMountPoint(path, h.m, true)
}

func (h *hostMounter) ResizeFs(device, path string) error {
	_, err := h.rs.Resize(device, path)
	return err
}
