package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
)

// StorageClass parameters (CreateVolume's parameters). QoS settings take
// the API's qos JSON names (qos.Settings: iops_limit, bps_limit,
// iops_reservation, weight, ...) with the values `blockd volume create`
// takes ("5k", "200MiB").
const (
	ParamRepl      = "repl"       // copies of the data, this node's included: 1 (default) to 3
	ParamIOProfile = "io_profile" // auto (default), db, sequential, journal, ... (profile.Names)
	ParamSecure    = "secure"     // "true": encrypted at rest (needs a daemon with encryption)
	ParamFrontend  = "frontend"   // kernel device: nbd (default) or ublk
)

// reservedPrefix marks the parameters Kubernetes itself adds
// (csi.storage.k8s.io/fstype, the PVC's name and namespace with
// --extra-create-metadata): they are not blockd's to check.
const reservedPrefix = "csi.storage.k8s.io/"

// Volume context keys, set by CreateVolume and read by the node service.
const (
	ctxCSIName  = "csi-name" // the CSI name the volume was created for
	ctxFrontend = "frontend"
)

// Fstypes the node service formats; the first is the default.
var fsTypes = []string{"ext4", "xfs"}

// VolumeName maps a CSI volume name to a blockd volume name,
// deterministically: the name lower-cased with every character blockd
// does not allow as '-', cut to 46 characters, then '-' and 16 hex digits
// of the SHA-256 of the whole CSI name. pvc-0a1b... stays readable, and two
// CSI names never share a volume in practice.
func VolumeName(csiName string) string {
	sum := sha256.Sum256([]byte(csiName))
	h := hex.EncodeToString(sum[:8])
	var b strings.Builder
	for _, r := range strings.ToLower(csiName) {
		if b.Len() >= 46 {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '.', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	base := strings.Trim(b.String(), "-._")
	if base == "" {
		base = "csi"
	}
	return base + "-" + h
}

// ParamNames lists the StorageClass parameters blockd knows, for errors
// and docs.
func ParamNames() []string {
	out := []string{ParamRepl, ParamIOProfile, ParamSecure, ParamFrontend}
	for _, s := range qos.Settings() {
		out = append(out, s.JSON)
	}
	return out
}

func badParam(name, format string, a ...any) error {
	return status.Errorf(codes.InvalidArgument, "StorageClass parameter %s: %s", name, fmt.Sprintf(format, a...))
}

// volumeParams is what a StorageClass asks of a volume.
type volumeParams struct {
	spec     api.Spec // Repl, Profile, QoS
	frontend string
}

// parseParams checks every parameter; an unknown or invalid one is
// InvalidArgument naming it. h is the daemon's Health: what it can do.
func parseParams(p map[string]string, h api.Health) (volumeParams, error) {
	vp := volumeParams{frontend: api.FrontendNBD}
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	slices.Sort(keys) // the first bad one, always the same
	qosJSON := map[string]bool{}
	for _, s := range qos.Settings() {
		qosJSON[s.JSON] = true
	}
	for _, k := range keys {
		v := p[k]
		switch {
		case strings.HasPrefix(k, reservedPrefix):
		case k == ParamRepl:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 3 {
				return vp, badParam(k, "%q: want 1, 2 or 3 copies", v)
			}
			vp.spec.Repl = n
		case k == ParamIOProfile:
			pr, err := profile.Parse(v)
			if err != nil {
				return vp, badParam(k, "%q: want one of %s", v, strings.Join(profile.Names(), ", "))
			}
			vp.spec.Profile = pr.String()
		case k == ParamSecure:
			on, err := strconv.ParseBool(v)
			if err != nil {
				return vp, badParam(k, "%q: want true or false", v)
			}
			if on {
				if err := secure(&vp.spec, h); err != nil {
					return vp, err
				}
			}
		case k == ParamFrontend:
			if v != api.FrontendNBD && v != api.FrontendUblk {
				return vp, badParam(k, "%q: want %s or %s", v, api.FrontendNBD, api.FrontendUblk)
			}
			vp.frontend = v
		case qosJSON[k]:
			if err := vp.spec.QoS.SetFlag(k, v); err != nil {
				return vp, badParam(k, "%v", err)
			}
		default:
			return vp, badParam(k, "unknown (blockd knows %s, and the %s* keys Kubernetes sets)", strings.Join(ParamNames(), ", "), reservedPrefix)
		}
	}
	if err := vp.spec.QoS.Validate(); err != nil {
		return vp, status.Errorf(codes.InvalidArgument, "StorageClass QoS parameters: %v", err)
	}
	return vp, nil
}

// secure asks for an encrypted volume (AES-256-XTS): its data key is
// wrapped by the node's KEK (serve --kek-file or --kek-dir), or by one
// derived from the provisioner secret's SecretKey (see withSecret). A
// daemon that predates encryption refuses.
func secure(s *api.Spec, h api.Health) error {
	if !h.Has(api.FeatureEncryption) {
		return badParam(ParamSecure, "encryption is not available in this blockd")
	}
	s.Encryption = &api.Encryption{}
	return nil
}

// SecretKey is the key of the Kubernetes Secrets (the StorageClass's
// csi.storage.k8s.io/provisioner-secret-* and node-stage-secret-*) whose
// value a secure volume's KEK is derived from, instead of the node's KEK
// file. The node-stage secret must hold the same value: NodeStageVolume
// hands it to the daemon, which unlocks the volume with it.
const SecretKey = "encryption-secret"

// withSecret makes an encrypted volume's KEK come from the create's
// secret, if it has one.
func withSecret(s *api.Spec, secrets map[string]string) error {
	v, ok := secrets[SecretKey]
	switch {
	case !ok:
		return nil
	case s.Encryption == nil:
		return status.Errorf(codes.InvalidArgument, "the provisioner secret has %q, but the StorageClass does not say %s: \"true\"", SecretKey, ParamSecure)
	case len(v) < 32:
		return status.Errorf(codes.InvalidArgument, "the provisioner secret's %q is %d bytes; want at least 32 (random)", SecretKey, len(v))
	}
	s.Encryption = &api.Encryption{KEK: api.KEKSecret, Secret: v}
	return nil
}

// capacity picks a size in a CapacityRange: the required bytes (default
// DefaultVolumeSize, or the limit if smaller) rounded up to the block size,
// within the limit.
func capacity(cr *csipb.CapacityRange) (int64, error) {
	req, lim := cr.GetRequiredBytes(), cr.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, status.Errorf(codes.InvalidArgument, "capacity range: negative bytes (required %d, limit %d)", req, lim)
	}
	if lim > 0 && req > lim {
		return 0, status.Errorf(codes.InvalidArgument, "capacity range: required %d bytes exceed the limit %d", req, lim)
	}
	size := req
	if size == 0 {
		size = DefaultVolumeSize
		if lim > 0 && lim < size {
			size = lim
		}
	}
	const bs = api.DefaultBlockSize
	size = (size + bs - 1) / bs * bs
	if lim > 0 && size > lim {
		size = lim / bs * bs
		if size < req || size == 0 {
			return 0, status.Errorf(codes.OutOfRange, "capacity range: no multiple of the %d-byte block size lies between %d and %d bytes", bs, req, lim)
		}
	}
	return size, nil
}

// fits reports whether a volume of size bytes satisfies cr.
func fits(size int64, cr *csipb.CapacityRange) bool {
	return size >= cr.GetRequiredBytes() && (cr.GetLimitBytes() == 0 || size <= cr.GetLimitBytes())
}

// checkCapabilities refuses what blockd cannot do: a volume is one node's
// block device, so access modes that span nodes are refused; a mount
// needs a filesystem blockd formats.
func checkCapabilities(caps []*csipb.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	for _, c := range caps {
		if err := checkCapability(c); err != nil {
			return err
		}
	}
	return nil
}

func checkCapability(c *csipb.VolumeCapability) error {
	if c == nil {
		return status.Error(codes.InvalidArgument, "volume capability missing")
	}
	switch m := c.GetAccessMode().GetMode(); m {
	case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csipb.VolumeCapability_AccessMode_UNKNOWN:
		return status.Error(codes.InvalidArgument, "volume capability: access mode missing")
	default:
		return status.Errorf(codes.InvalidArgument, "access mode %s: a blockd volume is a block device on one node at a time", m)
	}
	switch {
	case c.GetBlock() != nil:
	case c.GetMount() != nil:
		if fs := c.GetMount().GetFsType(); fs != "" && !slices.Contains(fsTypes, fs) {
			return status.Errorf(codes.InvalidArgument, "fstype %q: blockd formats %s", fs, strings.Join(fsTypes, " or "))
		}
	default:
		return status.Error(codes.InvalidArgument, "volume capability: access type (block or mount) missing")
	}
	return nil
}
