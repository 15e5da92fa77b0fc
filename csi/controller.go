package csi

import (
	"context"
	"slices"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// ControllerGetCapabilities: create/delete, expand, list, capacity. No
// publish (CSIDriver attachRequired: false: the node attaches), no
// snapshots or clones (blockd has none yet).
func (d *Driver) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	var caps []*csipb.ControllerServiceCapability
	for _, t := range []csipb.ControllerServiceCapability_RPC_Type{
		csipb.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csipb.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csipb.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csipb.ControllerServiceCapability_RPC_GET_CAPACITY,
	} {
		caps = append(caps, &csipb.ControllerServiceCapability{Type: &csipb.ControllerServiceCapability_Rpc{
			Rpc: &csipb.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csipb.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// self is this node's name: the daemon's replication name when it has
// one (replicas are recorded under it), else --node-id.
func (d *Driver) self(h api.Health) string {
	if h.Node != "" {
		return h.Node
	}
	return d.opts.NodeID
}

// CreateVolume creates a volume on this node's daemon (its owner), named
// VolumeName(req.Name); a second call with the same name and a fitting
// size returns the same volume.
func (d *Driver) CreateVolume(ctx context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name missing")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if src := req.GetVolumeContentSource(); src != nil {
		what := "another volume"
		if src.GetSnapshot() != nil {
			what = "a snapshot"
		}
		return nil, status.Errorf(codes.InvalidArgument, "a volume cannot be created from %s: blockd has no snapshots or clones yet", what)
	}
	size, err := capacity(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	h, err := d.api.Info()
	if err != nil {
		return nil, apiError("create volume", err)
	}
	vp, err := parseParams(req.GetParameters(), h)
	if err != nil {
		return nil, err
	}
	if err := withSecret(&vp.spec, req.GetSecrets()); err != nil {
		return nil, err
	}
	name := VolumeName(req.GetName())
	defer d.lock(name)()
	spec := vp.spec
	spec.Name, spec.Size = name, api.Size(size)
	if spec.Nodes, err = placement(req.GetAccessibilityRequirements(), d.self(h), spec.Repl, h); err != nil {
		return nil, err
	}
	v, err := d.api.GetVolume(name)
	switch {
	case err == nil:
		if !fits(int64(v.Size), req.GetCapacityRange()) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s (for %q) exists with %d bytes, outside the requested range", name, req.GetName(), v.Size)
		}
	case api.IsCode(err, api.CodeNotFound):
		v, err = d.api.CreateVolume(spec)
		if api.IsCode(err, api.CodeExists) {
			v, err = d.api.GetVolume(name) // created meanwhile by a retry
		}
		if err != nil {
			return nil, apiError("create volume "+name, err)
		}
		d.log.Info("csi volume created", "volume", name, "csi_name", req.GetName(), "size", size, "repl", max(v.Repl, 1),
			"profile", v.Profile, "frontend", vp.frontend)
	default:
		return nil, apiError("create volume "+name, err)
	}
	return &csipb.CreateVolumeResponse{Volume: &csipb.Volume{
		VolumeId:           name,
		CapacityBytes:      int64(v.Size),
		VolumeContext:      map[string]string{ctxCSIName: req.GetName(), ctxFrontend: vp.frontend},
		AccessibleTopology: d.topology(v, h),
	}}, nil
}

// placement turns accessibility requirements into api.Spec.Nodes, the
// preferred nodes first (with WaitForFirstConsumer, the node the
// scheduler picked), then the requisite ones. On its own (no cluster) a
// daemon owns what it creates: Nodes names the other copies, peers of
// this daemon only, and a volume of one copy lives here, which the
// requirements must allow. In a cluster Nodes names every copy, this
// node's or not, and the volume's owner is whichever of them attaches it.
// Too few named nodes leave the choice to the daemon.
func placement(tr *csipb.TopologyRequirement, self string, repl int, h api.Health) ([]string, error) {
	if tr == nil {
		return nil, nil
	}
	nodesOf := func(ts []*csipb.Topology) []string {
		var out []string
		for _, t := range ts {
			if n := t.GetSegments()[TopologyKey]; n != "" {
				out = append(out, n)
			}
		}
		return out
	}
	allowed := append(nodesOf(tr.GetPreferred()), nodesOf(tr.GetRequisite())...)
	copies := max(repl, 1)
	if h.Has(api.FeatureCluster) {
		var nodes []string
		for _, n := range allowed {
			if !slices.Contains(nodes, n) && len(nodes) < copies {
				nodes = append(nodes, n)
			}
		}
		if len(nodes) < copies {
			return nil, nil
		}
		return nodes, nil
	}
	if copies == 1 {
		if len(allowed) > 0 && !slices.Contains(allowed, self) {
			return nil, status.Errorf(codes.ResourceExhausted, "a volume of one copy lives on the node whose blockd creates it, %s, "+
				"which the accessibility requirements exclude (%s)", self, strings.Join(allowed, ", "))
		}
		return nil, nil
	}
	var nodes []string
	for _, n := range allowed {
		if n != self && slices.Contains(h.Peers, n) && !slices.Contains(nodes, n) && len(nodes) < copies-1 {
			nodes = append(nodes, n)
		}
	}
	if len(nodes) < copies-1 {
		return nil, nil
	}
	return nodes, nil
}

// topology is where a volume can be used: the nodes that hold a copy.
func (d *Driver) topology(v api.Volume, h api.Health) []*csipb.Topology {
	nodes := []string{d.self(h)}
	if p := v.Placement; p != nil && len(p.Nodes) > 0 {
		nodes = p.Nodes // a cluster volume: every node with a copy
	} else if r := v.Replication; r != nil {
		nodes = []string{r.Owner}
		for _, rep := range r.Replicas {
			nodes = append(nodes, rep.Node)
		}
	}
	var out []*csipb.Topology
	for _, n := range nodes {
		out = append(out, &csipb.Topology{Segments: map[string]string{TopologyKey: n}})
	}
	return out
}

// DeleteVolume deletes a volume and its data (every copy); an unknown one
// is already deleted.
func (d *Driver) DeleteVolume(ctx context.Context, req *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := required("volume id", id); err != nil {
		return nil, err
	}
	defer d.lock(id)()
	err := d.api.DeleteVolume(id)
	if err != nil && !api.IsCode(err, api.CodeNotFound) && !api.IsCode(err, api.CodeInvalid) {
		return nil, apiError("delete volume "+id, err)
	}
	if err == nil {
		d.log.Info("csi volume deleted", "volume", id)
	}
	return &csipb.DeleteVolumeResponse{}, nil
}

// ControllerExpandVolume grows a volume, attached or not (the daemon grows
// an attached volume's device too); the filesystem of a mounted volume is
// grown by NodeExpandVolume.
func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csipb.ControllerExpandVolumeRequest) (*csipb.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := required("volume id", id); err != nil {
		return nil, err
	}
	if req.GetCapacityRange() == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity range missing")
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := checkCapability(c); err != nil {
			return nil, err
		}
	}
	size, err := capacity(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	if d.opts.ExpandOnNode {
		// The volume's daemon is on the node that owns it: NodeExpandVolume
		// grows the volume there, then its filesystem.
		return &csipb.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: true}, nil
	}
	defer d.lock(id)()
	v, err := d.api.GetVolume(id)
	if err != nil {
		return nil, apiError("expand volume "+id, err)
	}
	if size > int64(v.Size) {
		if v, err = d.api.ResizeVolume(id, size); err != nil {
			return nil, apiError("expand volume "+id, err)
		}
		d.log.Info("csi volume expanded", "volume", id, "size", size, "attached", v.Attachment != nil)
	}
	return &csipb.ControllerExpandVolumeResponse{
		CapacityBytes:         int64(v.Size),
		NodeExpansionRequired: req.GetVolumeCapability().GetBlock() == nil,
	}, nil
}

// ValidateVolumeCapabilities confirms the capabilities blockd supports.
func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if err := required("volume id", id); err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	if _, err := d.api.GetVolume(id); err != nil {
		return nil, apiError("validate volume "+id, err)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	h, err := d.api.Info()
	if err != nil {
		return nil, apiError("validate volume "+id, err)
	}
	if _, err := parseParams(req.GetParameters(), h); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{Confirmed: &csipb.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// tokenPrefix starts every ListVolumes token: the name of the first
// volume of the next page follows it (volumes come sorted by name, so a
// page starts right even when volumes came or went in between).
const tokenPrefix = "after:"

// ListVolumes lists the volumes this node's daemon owns (not the replicas
// it holds for others), by name, in pages of max_entries.
func (d *Driver) ListVolumes(ctx context.Context, req *csipb.ListVolumesRequest) (*csipb.ListVolumesResponse, error) {
	start := ""
	if t := req.GetStartingToken(); t != "" {
		var ok bool
		if start, ok = strings.CutPrefix(t, tokenPrefix); !ok || start == "" {
			return nil, status.Errorf(codes.Aborted, "starting token %q is not one ListVolumes returned", t)
		}
	}
	if req.GetMaxEntries() < 0 {
		return nil, status.Error(codes.InvalidArgument, "max_entries is negative")
	}
	vols, err := d.api.ListVolumes()
	if err != nil {
		return nil, apiError("list volumes", err)
	}
	h, err := d.api.Info()
	if err != nil {
		return nil, apiError("list volumes", err)
	}
	resp := &csipb.ListVolumesResponse{}
	for _, v := range vols {
		if v.Name < start || (v.Replication != nil && v.Replication.Role == api.RoleReplica) {
			continue
		}
		if m := int(req.GetMaxEntries()); m > 0 && len(resp.Entries) == m {
			resp.NextToken = tokenPrefix + v.Name
			break
		}
		resp.Entries = append(resp.Entries, &csipb.ListVolumesResponse_Entry{Volume: &csipb.Volume{
			VolumeId: v.Name, CapacityBytes: int64(v.Size), AccessibleTopology: d.topology(v, h)}})
	}
	return resp, nil
}

// GetCapacity is the free space of the daemon's state dir (file volumes
// are sparse: it is what they can still fill), on this node only.
func (d *Driver) GetCapacity(ctx context.Context, req *csipb.GetCapacityRequest) (*csipb.GetCapacityResponse, error) {
	for _, c := range req.GetVolumeCapabilities() {
		if err := checkCapability(c); err != nil {
			return &csipb.GetCapacityResponse{}, nil
		}
	}
	h, err := d.api.Info()
	if err != nil {
		return nil, apiError("get capacity", err)
	}
	if t := req.GetAccessibleTopology(); t != nil {
		if n, ok := t.GetSegments()[TopologyKey]; ok && n != d.self(h) {
			return &csipb.GetCapacityResponse{}, nil
		}
	}
	return &csipb.GetCapacityResponse{AvailableCapacity: h.AvailableBytes}, nil
}
