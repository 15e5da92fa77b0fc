package csi

import (
	"context"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/volume"
)

func TestVolumeName(t *testing.T) {
	for _, n := range []string{
		"pvc-0a1b2c3d-4e5f-6789-abcd-ef0123456789",
		"Sanity-Controller-CreateVolume-With-UPPER_case and spaces/slashes",
		strings.Repeat("X", 128),
		"---", "", "é",
	} {
		got := VolumeName(n)
		if !volume.ValidName(got) {
			t.Errorf("VolumeName(%q) = %q: not a valid blockd name", n, got)
		}
		if VolumeName(n) != got {
			t.Errorf("VolumeName(%q) is not deterministic", n)
		}
	}
	if got := VolumeName("pvc-0a1b"); !strings.HasPrefix(got, "pvc-0a1b-") {
		t.Errorf("a valid CSI name should stay readable: %q", got)
	}
	if VolumeName("A") == VolumeName("a") {
		t.Error("names differing in case map to the same volume")
	}
}

func TestParseParams(t *testing.T) {
	enc := api.Health{Features: []string{api.FeatureEncryption}}
	for _, tc := range []struct {
		p       map[string]string
		h       api.Health
		code    codes.Code
		errHas  string
		profile string
		repl    int
		iops    int64
		fe      string
		// encrypted: the spec asks for encryption under the node's KEK.
		encrypted bool
	}{
		{p: map[string]string{"repl": "3", "io_profile": "db", "iops_limit": "5k", "csi.storage.k8s.io/pvc/name": "x"},
			profile: "db", repl: 3, iops: 5000, fe: "nbd"},
		{p: map[string]string{"frontend": "ublk", "weight": "200", "bps_limit": "100MiB"}, fe: "ublk"},
		{p: map[string]string{"fsType": "ext4"}, code: codes.InvalidArgument, errHas: "fsType"},
		{p: map[string]string{"repl": "4"}, code: codes.InvalidArgument, errHas: "repl"},
		{p: map[string]string{"io_profile": "fast"}, code: codes.InvalidArgument, errHas: "io_profile"},
		{p: map[string]string{"iops_limit": "lots"}, code: codes.InvalidArgument, errHas: "iops_limit"},
		{p: map[string]string{"frontend": "iscsi"}, code: codes.InvalidArgument, errHas: "frontend"},
		{p: map[string]string{"secure": "yes please"}, code: codes.InvalidArgument, errHas: "secure"},
		{p: map[string]string{"secure": "true"}, code: codes.InvalidArgument, errHas: "encryption is not available in this blockd"},
		{p: map[string]string{"secure": "true", "io_profile": "db", "repl": "3"}, h: enc, profile: "db", repl: 3, fe: "nbd", encrypted: true},
		{p: map[string]string{"secure": "false"}, fe: "nbd"},
	} {
		vp, err := parseParams(tc.p, tc.h)
		if tc.code != codes.OK {
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.errHas) {
				t.Errorf("%v: err %v, want %s naming %q", tc.p, err, tc.code, tc.errHas)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v: %v", tc.p, err)
			continue
		}
		if e := vp.spec.Encryption; (e != nil) != tc.encrypted || (e != nil && *e != api.Encryption{}) {
			t.Errorf("%v: encryption %+v, want it %v (the node's KEK)", tc.p, e, tc.encrypted)
		}
		if vp.spec.Profile != tc.profile || vp.spec.Repl != tc.repl || vp.spec.QoS.IOPS != tc.iops || vp.frontend != tc.fe {
			t.Errorf("%v: got %+v frontend %s", tc.p, vp.spec, vp.frontend)
		}
	}
}

// A provisioner secret's encryption-secret makes a secure volume's KEK
// come from it; without secure, or too short, it is refused.
func TestWithSecret(t *testing.T) {
	secret := strings.Repeat("s", 32)
	s := api.Spec{Encryption: &api.Encryption{}}
	if err := withSecret(&s, map[string]string{SecretKey: secret, "other": "x"}); err != nil ||
		s.Encryption.KEK != api.KEKSecret || s.Encryption.Secret != secret {
		t.Fatalf("secure with a secret: %v, %+v", err, s.Encryption)
	}
	s = api.Spec{Encryption: &api.Encryption{}}
	if err := withSecret(&s, map[string]string{"other": "x"}); err != nil || *s.Encryption != (api.Encryption{}) {
		t.Fatalf("secure without the key: %v, %+v (want the node's KEK)", err, s.Encryption)
	}
	for _, tc := range []struct {
		s      api.Spec
		secret string
		errHas string
	}{
		{api.Spec{}, secret, "does not say secure"},
		{api.Spec{Encryption: &api.Encryption{}}, "short", "want at least 32"},
	} {
		err := withSecret(&tc.s, map[string]string{SecretKey: tc.secret})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.errHas) {
			t.Errorf("%+v with %q: %v, want InvalidArgument naming %q", tc.s, tc.secret, err, tc.errHas)
		}
	}
}

func TestPlacement(t *testing.T) {
	top := func(ns ...string) []*csipb.Topology {
		var out []*csipb.Topology
		for _, n := range ns {
			out = append(out, &csipb.Topology{Segments: map[string]string{TopologyKey: n}})
		}
		return out
	}
	peers := api.Health{Peers: []string{"b", "c", "d"}, Features: []string{api.FeatureReplication}}
	// WaitForFirstConsumer picked c: c gets a copy, then the requisite order.
	got, err := placement(&csipb.TopologyRequirement{Preferred: top("c", "a"), Requisite: top("a", "b", "c", "d")}, "a", 3, peers)
	if err != nil || strings.Join(got, ",") != "c,b" {
		t.Errorf("repl 3: %v %v", got, err)
	}
	// One copy lives here: requirements that exclude this node fail.
	if _, err := placement(&csipb.TopologyRequirement{Requisite: top("b")}, "a", 1, peers); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("repl 1 elsewhere: %v", err)
	}
	if got, err := placement(&csipb.TopologyRequirement{Requisite: top("a", "b")}, "a", 1, peers); err != nil || got != nil {
		t.Errorf("repl 1 here: %v %v", got, err)
	}
	// Non-peers are never named; too few named lets the daemon choose.
	if got, err := placement(&csipb.TopologyRequirement{Preferred: top("x")}, "a", 2, peers); err != nil || got != nil {
		t.Errorf("non-peer: %v %v", got, err)
	}
	// In a cluster every copy is named, the picked node first, this one
	// or not.
	cluster := api.Health{Features: []string{api.FeatureCluster}}
	got, err = placement(&csipb.TopologyRequirement{Preferred: top("c", "a"), Requisite: top("a", "b", "c")}, "a", 2, cluster)
	if err != nil || strings.Join(got, ",") != "c,a" {
		t.Errorf("cluster repl 2: %v %v", got, err)
	}
	if got, err := placement(&csipb.TopologyRequirement{Requisite: top("b")}, "a", 1, cluster); err != nil || strings.Join(got, ",") != "b" {
		t.Errorf("cluster repl 1 elsewhere: %v %v", got, err)
	}
}

func TestCapacity(t *testing.T) {
	for _, tc := range []struct {
		req, lim, want int64
		code           codes.Code
	}{
		{0, 0, DefaultVolumeSize, codes.OK},
		{1, 0, 4096, codes.OK},
		{10 << 30, 0, 10 << 30, codes.OK},
		{0, 8192, 8192, codes.OK},
		{5000, 6000, 0, codes.OutOfRange},
		{10, 5, 0, codes.InvalidArgument},
	} {
		got, err := capacity(&csipb.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim})
		if status.Code(err) != tc.code || got != tc.want {
			t.Errorf("capacity(%d, %d) = %d, %v; want %d, %s", tc.req, tc.lim, got, err, tc.want, tc.code)
		}
	}
}

// A controller apart from the daemons accepts an expansion without asking
// one (there is none), and leaves the growing to the node.
func TestExpandOnNode(t *testing.T) {
	d, err := New(Options{NodeID: "n", Client: api.NewClient("/nonexistent/blockd.sock"), ExpandOnNode: true})
	if err != nil {
		t.Fatal(err)
	}
	blockCap := &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	r, err := d.ControllerExpandVolume(context.Background(), &csipb.ControllerExpandVolumeRequest{VolumeId: "v",
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 3<<30 + 1}, VolumeCapability: blockCap})
	if err != nil || r.GetCapacityBytes() != 3<<30+4096 || !r.GetNodeExpansionRequired() {
		t.Errorf("expand on node: %v %v", r, err)
	}
	p, err := d.Probe(context.Background(), &csipb.ProbeRequest{})
	if err != nil || !p.GetReady().GetValue() {
		t.Errorf("probe without a daemon: %v %v", p, err)
	}
}
