package csi_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/attach"
	"github.com/blockd/blockd/csi"
	"github.com/blockd/blockd/csi/sanityrun"
	"github.com/blockd/blockd/daemon"
)

// hostSkip is why the Node Service tests do not run on the build host:
// staging attaches kernel nbd devices and mounts filesystems, and the
// build hosts have no nbd and load no modules. vm/kerneltest's
// TestCSISanity runs the whole suite, node tests included, in QEMU.
const hostSkip = "Node Service"

// startDriver runs a daemon (kernel devices off) on a temp state dir and
// the driver against it; it returns the driver's socket and state dir.
func startDriver(t *testing.T) (sock, dir string) {
	t.Helper()
	dir = t.TempDir()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	d, err := daemon.Start(daemon.Config{StateDir: dir, Logger: quiet, Kernel: attach.Options{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown(context.Background()) })
	drv, err := csi.New(csi.Options{NodeID: "node-a", Version: "test", Client: api.NewClient(filepath.Join(dir, "blockd.sock")), Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(dir, "csi.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go drv.ServeListener(ln)
	t.Cleanup(drv.Stop)
	return sock, dir
}

// TestSanity runs csi-sanity's Identity and Controller tests against the
// driver and a real daemon (file volumes, sparse: the suite's volumes are
// 10 GiB).
func TestSanity(t *testing.T) {
	sock, dir := startDriver(t)
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeParameters = map[string]string{"io_profile": "db", "iops_limit": "5k"}
	t.Logf("skipping the %q tests on the build host: they attach kernel nbd devices and mount; TestCSISanity in vm/kerneltest runs them", hostSkip)
	sanityrun.Run(t, "blockd CSI sanity (host: identity and controller)", []string{hostSkip}, sanityrun.Config{Name: "file", Config: &cfg})
}

// CreateVolume refuses what blockd cannot do, saying why, with the code
// the external-provisioner acts on; and a CSI name that is no blockd name
// maps to one that is, kept in the volume context.
func TestCreateVolumeRefusals(t *testing.T) {
	sock, dir := startDriver(t)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctl := csipb.NewControllerClient(conn)
	mount := &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	req := func(name string, params map[string]string) *csipb.CreateVolumeRequest {
		return &csipb.CreateVolumeRequest{Name: name, Parameters: params, VolumeCapabilities: []*csipb.VolumeCapability{mount},
			CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20}}
	}
	fromSnap := req("from-snap", nil)
	fromSnap.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{
		Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: "s1"}}}
	multi := req("multi", nil)
	multi.VolumeCapabilities = []*csipb.VolumeCapability{{AccessType: mount.AccessType,
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER}}}
	for _, tc := range []struct {
		what string
		req  *csipb.CreateVolumeRequest
		code codes.Code
		has  string
	}{
		{"repl 3 without replication", req("r3", map[string]string{"repl": "3"}), codes.InvalidArgument, "this daemon runs without replication"},
		{"secure without a KEK", req("sec", map[string]string{"secure": "true"}), codes.InvalidArgument, "this daemon has no KEK"},
		{"unknown parameter", req("unk", map[string]string{"replicas": "3"}), codes.InvalidArgument, "parameter replicas"},
		{"bad QoS value", req("qos", map[string]string{"bps_limit": "fast"}), codes.InvalidArgument, "bps_limit"},
		{"from a snapshot", fromSnap, codes.InvalidArgument, "no snapshots"},
		{"multi-node access", multi, codes.InvalidArgument, "one node"},
	} {
		_, err := ctl.CreateVolume(context.Background(), tc.req)
		if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.has) {
			t.Errorf("%s: %v, want %s saying %q", tc.what, err, tc.code, tc.has)
		}
	}
	// secure with the provisioner secret's key: encrypted under a KEK
	// derived from it; the API shows the cipher and KEK id only.
	sec := req("sec", map[string]string{"secure": "true", "io_profile": "db"})
	sec.Secrets = map[string]string{csi.SecretKey: strings.Repeat("k", 40)}
	if _, err := ctl.CreateVolume(context.Background(), sec); err != nil {
		t.Fatalf("secure with a secret: %v", err)
	}
	v, err := api.NewClient(filepath.Join(dir, "blockd.sock")).GetVolume(csi.VolumeName("sec"))
	if err != nil {
		t.Fatal(err)
	}
	if e := v.Encryption; e == nil || e.KEK != api.KEKSecret || e.KEKID == "" || e.Secret != "" || e.WrappedKey != "" {
		t.Fatalf("secure volume's encryption: %+v", e)
	}
	name := "Sanity Volume/With UPPER case"
	r, err := ctl.CreateVolume(context.Background(), req(name, map[string]string{"io_profile": "db", "iops_limit": "5k"}))
	if err != nil {
		t.Fatal(err)
	}
	if id := r.GetVolume().GetVolumeId(); id != csi.VolumeName(name) || r.GetVolume().GetVolumeContext()["csi-name"] != name {
		t.Errorf("volume %q for %q, context %v", id, name, r.GetVolume().GetVolumeContext())
	}
	if top := r.GetVolume().GetAccessibleTopology(); len(top) != 1 || top[0].GetSegments()[csi.TopologyKey] != "node-a" {
		t.Errorf("accessible topology %v, want node-a only", top)
	}
}
