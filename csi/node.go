package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// NodeGetCapabilities: stage/unstage (the device is attached and the
// filesystem mounted once per node), volume stats, expansion.
func (d *Driver) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	var caps []*csipb.NodeServiceCapability
	for _, t := range []csipb.NodeServiceCapability_RPC_Type{
		csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csipb.NodeServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csipb.NodeServiceCapability{Type: &csipb.NodeServiceCapability_Rpc{
			Rpc: &csipb.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeGetInfo names this node and its topology segment.
func (d *Driver) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{
		NodeId:             d.opts.NodeID,
		AccessibleTopology: &csipb.Topology{Segments: map[string]string{TopologyKey: d.opts.NodeID}},
	}, nil
}

// ownedVolume returns the volume id as this node's daemon serves it. A
// replica held here is promoted first: the daemon refuses while the
// owner answers (then the volume must be used there), and allows it when
// the owner is gone, which is how a pod moves to a surviving copy. A
// cluster volume needs none of that: the attach takes its ownership on
// this node, and is refused, naming the owner, while a live node holds
// it.
func (d *Driver) ownedVolume(op, id string) (api.Volume, error) {
	v, err := d.api.GetVolume(id)
	if err != nil {
		return v, apiError(op+" "+id, err)
	}
	if v.State == api.StateFailed {
		return v, status.Errorf(codes.FailedPrecondition, "%s %s: the volume is failed on this node: %s", op, id, v.Reason)
	}
	if v.Cluster != "" {
		return v, nil // in a cluster, the attach takes the ownership
	}
	if r := v.Replication; r != nil && r.Role == api.RoleReplica {
		d.log.Info("csi: volume is a replica here; promoting it", "volume", id, "owner", r.Owner)
		pv, err := d.api.Promote(id, false)
		if err != nil {
			return v, status.Errorf(codes.FailedPrecondition, "%s %s: this node holds a replica of the volume, owned by %s, and it cannot take over: %v",
				op, id, r.Owner, err)
		}
		v = pv
	}
	return v, nil
}

// NodeStageVolume attaches the volume as a kernel block device (nbd, or
// ublk per the StorageClass's frontend) and, for a mount, formats it if
// it holds no filesystem and mounts it at the staging path.
func (d *Driver) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	id, staging, vc := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	if err := required("volume id", id, "staging target path", staging); err != nil {
		return nil, err
	}
	if err := checkCapability(vc); err != nil {
		return nil, err
	}
	defer d.lock(id)()
	v, err := d.ownedVolume("stage volume", id)
	if err != nil {
		return nil, err
	}
	dev, err := d.attach(v, req.GetVolumeContext()[ctxFrontend], req.GetSecrets()[SecretKey])
	if err != nil {
		return nil, err
	}
	if vc.GetBlock() != nil {
		return &csipb.NodeStageVolumeResponse{}, nil // publish binds the device itself
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "stage volume %s: %v", id, err)
	}
	if mnt, err := d.mount.IsMountPoint(staging); err != nil {
		return nil, status.Errorf(codes.Internal, "stage volume %s: %v", id, err)
	} else if mnt {
		return &csipb.NodeStageVolumeResponse{}, nil // staged already
	}
	fstype := vc.GetMount().GetFsType()
	if fstype == "" {
		fstype = fsTypes[0]
	}
	opts := vc.GetMount().GetMountFlags()
	if vc.GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY {
		opts = append(opts, "ro")
	}
	if err := d.mount.FormatAndMount(dev, staging, fstype, opts); err != nil {
		return nil, status.Errorf(codes.Internal, "stage volume %s: mount %s (%s) at %s: %v", id, dev, fstype, staging, err)
	}
	d.log.Info("csi volume staged", "volume", id, "device", dev, "fstype", fstype, "path", staging)
	return &csipb.NodeStageVolumeResponse{}, nil
}

// attach makes sure the volume is a kernel block device and returns it.
func (d *Driver) attach(v api.Volume, frontend, secret string) (string, error) {
	if a := v.Attachment; a != nil {
		return a.Device, nil
	}
	if frontend == "" {
		frontend = api.FrontendNBD
	}
	av, err := d.api.Attach(v.Name, api.AttachRequest{Frontend: frontend, Secret: secret})
	if err != nil {
		return "", apiError("stage volume "+v.Name, err)
	}
	dev := av.Attachment.Device
	// The device node comes from devtmpfs; give it a moment.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(dev); err == nil {
			break
		} else if time.Now().After(deadline) {
			return "", status.Errorf(codes.Internal, "stage volume %s: attached as %s, but the device node does not exist: %v", v.Name, dev, err)
		}
	}
	d.log.Info("csi volume attached", "volume", v.Name, "device", dev, "frontend", frontend)
	return dev, nil
}

// NodeUnstageVolume unmounts the staging path and detaches the device.
func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := required("volume id", id, "staging target path", staging); err != nil {
		return nil, err
	}
	defer d.lock(id)()
	if mnt, err := d.mount.IsMountPoint(staging); err == nil && mnt {
		if err := d.mount.Unmount(staging); err != nil {
			return nil, status.Errorf(codes.Internal, "unstage volume %s: unmount %s: %v", id, staging, err)
		}
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "unstage volume %s: %v", id, err)
	}
	v, err := d.api.GetVolume(id)
	if api.IsCode(err, api.CodeNotFound) {
		return &csipb.NodeUnstageVolumeResponse{}, nil
	}
	if err != nil {
		return nil, apiError("unstage volume "+id, err)
	}
	if v.Attachment != nil {
		if _, err := d.api.Detach(id); err != nil && !api.IsCode(err, api.CodeConflict) {
			return nil, apiError("unstage volume "+id, err)
		}
		d.log.Info("csi volume unstaged", "volume", id, "device", v.Attachment.Device)
	}
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged filesystem onto the target
// directory, or the device onto the target file for a block volume; the
// driver creates the target itself.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	id, target, staging, vc := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	if err := required("volume id", id, "target path", target); err != nil {
		return nil, err
	}
	if err := checkCapability(vc); err != nil {
		return nil, err
	}
	if err := required("staging target path (the volume must be staged first)", staging); err != nil {
		return nil, err
	}
	defer d.lock(id)()
	v, err := d.api.GetVolume(id)
	if err != nil {
		return nil, apiError("publish volume "+id, err)
	}
	opts := []string{"bind"}
	if req.GetReadonly() || vc.GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY {
		opts = append(opts, "ro")
	}
	source := staging
	if vc.GetBlock() != nil {
		if v.Attachment == nil {
			return nil, status.Errorf(codes.FailedPrecondition, "publish volume %s: it is not staged on this node (no kernel device)", id)
		}
		source = v.Attachment.Device
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "publish volume %s: %v", id, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "publish volume %s: create target file: %v", id, err)
		}
		f.Close()
	} else {
		if mnt, err := d.mount.IsMountPoint(staging); err != nil || !mnt {
			return nil, status.Errorf(codes.FailedPrecondition, "publish volume %s: it is not staged at %s", id, staging)
		}
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "publish volume %s: %v", id, err)
		}
		opts = append(opts, vc.GetMount().GetMountFlags()...)
	}
	if mnt, err := d.mount.IsMountPoint(target); err != nil {
		return nil, status.Errorf(codes.Internal, "publish volume %s: %v", id, err)
	} else if mnt {
		return &csipb.NodePublishVolumeResponse{}, nil // published already
	}
	if err := d.mount.Mount(source, target, "", opts); err != nil {
		return nil, status.Errorf(codes.Internal, "publish volume %s: bind %s at %s: %v", id, source, target, err)
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target and removes it.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := required("volume id", id, "target path", target); err != nil {
		return nil, err
	}
	defer d.lock(id)()
	if err := d.mount.CleanupMountPoint(target); err != nil {
		return nil, status.Errorf(codes.Internal, "unpublish volume %s: %v", id, err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats: the filesystem's bytes and inodes, or a block
// volume's size.
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := required("volume id", id, "volume path", path); err != nil {
		return nil, err
	}
	v, err := d.api.GetVolume(id)
	if err != nil {
		return nil, apiError("volume stats "+id, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume stats %s: %v", id, err)
	}
	if fi.Mode()&os.ModeDevice != 0 {
		return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{
			{Unit: csipb.VolumeUsage_BYTES, Total: int64(v.Size)}}}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, status.Errorf(codes.Internal, "volume stats %s: %v", id, err)
	}
	bs := st.Bsize
	return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs, Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csipb.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}}, nil
}

// NodeExpandVolume grows the filesystem of a staged volume online
// (resize2fs, xfs_growfs) to its device's size. The controller normally
// grew the volume (and the daemon its device); if it is still smaller
// than asked, it is grown here first.
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csipb.NodeExpandVolumeRequest) (*csipb.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := required("volume id", id, "volume path", path); err != nil {
		return nil, err
	}
	defer d.lock(id)()
	v, err := d.api.GetVolume(id)
	if err != nil {
		return nil, apiError("expand volume "+id, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "expand volume %s: %v", id, err)
	}
	if cr := req.GetCapacityRange(); cr != nil && cr.GetRequiredBytes() > int64(v.Size) {
		size, err := capacity(cr)
		if err != nil {
			return nil, err
		}
		if v, err = d.api.ResizeVolume(id, size); err != nil {
			return nil, apiError("expand volume "+id, err)
		}
	}
	if req.GetVolumeCapability().GetBlock() != nil || fi.Mode()&os.ModeDevice != 0 {
		return &csipb.NodeExpandVolumeResponse{CapacityBytes: int64(v.Size)}, nil
	}
	if v.Attachment == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "expand volume %s: it is not staged on this node (no kernel device)", id)
	}
	if err := d.mount.ResizeFs(v.Attachment.Device, path); err != nil {
		return nil, status.Errorf(codes.Internal, "expand volume %s: grow the filesystem on %s: %v", id, v.Attachment.Device, err)
	}
	d.log.Info("csi filesystem expanded", "volume", id, "device", v.Attachment.Device, "path", path, "size", int64(v.Size))
	return &csipb.NodeExpandVolumeResponse{CapacityBytes: int64(v.Size)}, nil
}
