// Package csi is blockd's Container Storage Interface driver: `blockd csi`
// serves the Identity, Controller and Node services on a unix socket for
// Kubernetes (kubelet and the external-provisioner and -resizer sidecars).
// It is a client of the node's daemon through its control API socket
// (package api), like every other blockd command, so the plugin container
// and the daemon restart independently: the driver keeps no state of its
// own, the daemon's volume metadata (attachments included) is the truth.
//
// Volume ids are blockd volume names. CSI names (external-provisioner's
// pvc-UUID, or anything up to 128 characters) map to blockd names
// deterministically (VolumeName): their lower-cased, sanitized start and a
// hash of the whole, so a repeated CreateVolume finds the volume it made.
// The CSI name is kept in the volume context ("csi-name").
//
// A volume is served by the node that owns it; its accessible topology is
// the nodes that hold a copy (the owner and, for repl > 1, its replicas),
// keyed by TopologyKey. A replica is staged by promoting it, which the
// daemon refuses while the owner answers.
package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// DefaultName is the driver's name (CSIDriver object, StorageClass
// provisioner).
const DefaultName = "csi.blockd.io"

// TopologyKey is the topology segment that names a node.
const TopologyKey = "topology.blockd.io/node"

// DefaultVolumeSize is the size of a volume whose request names none.
const DefaultVolumeSize = 1 << 30

// Options configure a Driver.
type Options struct {
	// Name is the driver name; default DefaultName.
	Name string
	// Version is reported by GetPluginInfo.
	Version string
	// NodeID is this node's name (Kubernetes: spec.nodeName). A daemon
	// that runs with --node uses that name, and the two must agree.
	NodeID string
	// Client talks to the node's daemon.
	Client *api.Client
	// Log receives every call that fails and every change made.
	Log *slog.Logger
	// ExpandOnNode is for a controller that runs apart from the volumes'
	// daemons (the Kubernetes controller Deployment): ControllerExpandVolume
	// only accepts the new size and asks for node expansion, and the node
	// that stages the volume grows it through its own daemon
	// (NodeExpandVolume). Probe then does not ask a daemon.
	ExpandOnNode bool
	// Mounter mounts, formats and resizes; default the host's
	// (k8s.io/mount-utils with mount, mkfs.*, blkid, fsck, resize2fs,
	// xfs_growfs from PATH).
	Mounter Mounter
}

// Driver serves the CSI services.
type Driver struct {
	csipb.UnimplementedIdentityServer
	csipb.UnimplementedControllerServer
	csipb.UnimplementedNodeServer

	opts  Options
	log   *slog.Logger
	api   *api.Client
	mount Mounter

	locks sync.Map // volume id -> *sync.Mutex: one call per volume at a time

	mu  sync.Mutex
	srv *grpc.Server
}

// New returns a driver; Serve runs it.
func New(o Options) (*Driver, error) {
	if o.Client == nil {
		return nil, errors.New("csi: no daemon client")
	}
	if o.NodeID == "" {
		return nil, errors.New("csi: --node-id is required (Kubernetes: the pod's spec.nodeName)")
	}
	if o.Name == "" {
		o.Name = DefaultName
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Mounter == nil {
		o.Mounter = NewMounter()
	}
	return &Driver{opts: o, log: o.Log, api: o.Client, mount: o.Mounter}, nil
}

// ParseEndpoint returns the socket path of a unix endpoint: unix:///path,
// unix:/path or a plain path.
func ParseEndpoint(ep string) (string, error) {
	if !strings.Contains(ep, "://") && !strings.HasPrefix(ep, "unix:") {
		if ep == "" {
			return "", errors.New("empty endpoint")
		}
		return ep, nil
	}
	u, err := url.Parse(ep)
	if err != nil {
		return "", fmt.Errorf("endpoint %q: %w", ep, err)
	}
	if u.Scheme != "unix" {
		return "", fmt.Errorf("endpoint %q: only unix sockets are served (unix:///path)", ep)
	}
	p := u.Path
	if p == "" {
		p = u.Opaque
	}
	if u.Host != "" {
		p = filepath.Join(u.Host, p) // unix://relative/path
	}
	if p == "" {
		return "", fmt.Errorf("endpoint %q has no path", ep)
	}
	return p, nil
}

// Serve listens on endpoint and serves until Stop or a failure.
func (d *Driver) Serve(endpoint string) error {
	path, err := ParseEndpoint(endpoint)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("csi endpoint: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("csi endpoint: %w", err)
	}
	return d.ServeListener(ln)
}

// ServeListener serves on ln until Stop.
func (d *Driver) ServeListener(ln net.Listener) error {
	d.mu.Lock()
	if d.srv != nil {
		d.mu.Unlock()
		ln.Close()
		return errors.New("csi: already serving")
	}
	d.srv = grpc.NewServer(grpc.UnaryInterceptor(d.intercept))
	csipb.RegisterIdentityServer(d.srv, d)
	csipb.RegisterControllerServer(d.srv, d)
	csipb.RegisterNodeServer(d.srv, d)
	srv := d.srv
	d.mu.Unlock()
	d.log.Info("csi driver serving", "name", d.opts.Name, "node", d.opts.NodeID, "endpoint", ln.Addr().String(), "api_socket", d.api.Socket())
	return srv.Serve(ln)
}

// Stop stops serving: calls in flight finish first.
func (d *Driver) Stop() {
	d.mu.Lock()
	srv := d.srv
	d.mu.Unlock()
	if srv != nil {
		srv.GracefulStop()
	}
}

// intercept logs every call that fails and how long it took.
func (d *Driver) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	if err != nil {
		d.log.Warn("csi call failed", "method", method, "code", status.Code(err).String(), "err", status.Convert(err).Message(), "took", time.Since(start).Round(time.Millisecond))
	} else if !strings.HasPrefix(method, "Probe") && !strings.HasPrefix(method, "Get") && !strings.HasPrefix(method, "NodeGet") {
		d.log.Debug("csi call", "method", method, "took", time.Since(start).Round(time.Millisecond))
	}
	return resp, err
}

// lock serializes the calls on one volume (kubelet and the sidecars retry
// calls that take long; the second one waits for the first).
func (d *Driver) lock(id string) func() {
	m, _ := d.locks.LoadOrStore(id, &sync.Mutex{})
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

// apiError maps a daemon error onto a gRPC status: its code says what
// kind of failure, its text why.
func apiError(op string, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err // already a status
	}
	var c codes.Code
	switch api.CodeOf(err) {
	case api.CodeInvalid:
		c = codes.InvalidArgument
	case api.CodeNotFound:
		c = codes.NotFound
	case api.CodeExists:
		c = codes.AlreadyExists
	case api.CodeConflict:
		c = codes.FailedPrecondition
	case api.CodeUnavailable:
		c = codes.Unavailable
	default:
		c = codes.Internal
	}
	return status.Errorf(c, "%s: %v", op, err)
}

// required is InvalidArgument naming the first of the (name, value) pairs
// whose value is empty.
func required(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			return status.Errorf(codes.InvalidArgument, "%s missing", pairs[i])
		}
	}
	return nil
}
