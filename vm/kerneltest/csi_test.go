//go:build vmtest

package kerneltest

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/csi/sanityrun"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/vm/guest"
)

// The CSI driver in a real kernel: `blockd csi` (the guest's
// /usr/bin/blockd) against `blockd serve`, staging volumes as /dev/nbdN,
// formatting (mkfs.ext4, mkfs.xfs), mounting, bind-publishing and growing
// them with the host's tools (vmrun -tools).

// csiNode is a daemon and its CSI driver in the guest.
type csiNode struct {
	d    *blockd
	drv  *guest.Proc
	sock string
	conn *grpc.ClientConn
}

func startCSI(t *testing.T) *csiNode {
	t.Helper()
	guest.RequireVM(t)
	loadNBD(t)
	loadExt4(t)
	if err := module.Load("xfs"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// A KEK, as the DaemonSet's Secret blockd-kek gives (--kek-dir), for
	// secure: "true".
	kekDir := filepath.Join(dir, "kek")
	key := make([]byte, 32)
	rand.Read(key)
	if err := os.Mkdir(kekDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(kekDir, "kek"), key, 0o400); err != nil {
		t.Fatal(err)
	}
	n := &csiNode{d: startBlockd(t, filepath.Join(dir, "state"), "--kek-dir", kekDir), sock: filepath.Join(dir, "csi.sock")}
	n.drv = guest.Start(t, blockdBin, "csi", "--endpoint", "unix://"+n.sock, "--api-socket", n.d.sock(), "--node-id", "vm-node")
	guest.WaitFor(t, "the CSI socket", 30*time.Second, func() bool {
		_, err := os.Stat(n.sock)
		return err == nil || n.drv.Exited()
	})
	if n.drv.Exited() {
		t.Fatalf("blockd csi exited:\n%s", n.drv.Output())
	}
	conn, err := grpc.NewClient("unix://"+n.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	n.conn = conn
	t.Cleanup(func() {
		conn.Close()
		n.drv.Stop(10 * time.Second)
		n.d.stop()
		if t.Failed() {
			t.Logf("blockd csi log:\n%s", n.drv.Output())
		}
	})
	return n
}

// TestCSISanity runs the whole csi-sanity suite, Node Service included
// (real nbd attach, mkfs, mount, bind publish), for the mount and the block
// access type; its identity and controller tests also run on the host
// (csi/sanity_test.go).
func TestCSISanity(t *testing.T) {
	n := startCSI(t)
	mountCfg := sanity.NewTestConfig()
	mountCfg.Address = "unix://" + n.sock
	// csi-sanity makes these with os.Mkdir: their parent must exist.
	dir := t.TempDir()
	mountCfg.TargetPath = filepath.Join(dir, "mount-target")
	mountCfg.StagingPath = filepath.Join(dir, "mount-staging")
	blockCfg := mountCfg
	blockCfg.TestVolumeAccessType = "block"
	blockCfg.TargetPath = filepath.Join(dir, "block-target")
	blockCfg.StagingPath = filepath.Join(dir, "block-staging")
	sanityrun.Run(t, "blockd CSI sanity (VM: every service, mount and block)", nil,
		sanityrun.Config{Name: "mount", Config: &mountCfg}, sanityrun.Config{Name: "block", Config: &blockCfg})
	if mounts, _ := os.ReadFile("/proc/mounts"); strings.Contains(string(mounts), dir) {
		t.Errorf("csi-sanity left mounts behind:\n%s", mounts)
	}
}

// TestCSIExpandOnline: a volume created through CSI with io_profile db and
// QoS parameters is staged, published, filled with files, expanded by 50%
// while mounted (the daemon grows the volume and its nbd device, the node
// service the filesystem), and the files are intact; then unpublished,
// unstaged and deleted, leaving nothing attached or mounted. On ublk
// (6.12) the expansion of an attached volume is refused, saying why.
func TestCSIExpandOnline(t *testing.T) {
	n := startCSI(t)
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run("nbd-"+fs, func(t *testing.T) { n.expandOnline(t, "nbd", fs, false) })
	}
	// The seeds' secure: "true": encrypted, the same flow.
	t.Run("nbd-ext4-secure", func(t *testing.T) { n.expandOnline(t, "nbd", "ext4", true) })
	t.Run("ublk-refused", func(t *testing.T) {
		if _, err := os.Stat("/sys/module/ublk_drv"); err != nil {
			if err := module.Load("ublk_drv"); err != nil {
				t.Skipf("no ublk_drv in this kernel (%v): Debian's 6.1 has none", err)
			}
		}
		n.expandOnline(t, "ublk", "ext4", false)
	})
}

func mountCap(fs string) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func (n *csiNode) expandOnline(t *testing.T, frontend, fs string, secure bool) {
	ctx := context.Background()
	ctl, node := csipb.NewControllerClient(n.conn), csipb.NewNodeClient(n.conn)
	vc := mountCap(fs)
	const size = 512 << 20
	cv, err := ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name:               "PVC-Expand-" + frontend + "-" + fs + map[bool]string{true: "-secure"}[secure],
		CapacityRange:      &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csipb.VolumeCapability{vc},
		Parameters: map[string]string{"io_profile": "db", "iops_limit": "20k", "bps_limit": "400MiB", "weight": "200",
			"frontend": frontend, "csi.storage.k8s.io/pvc/name": "data", "secure": strconv.FormatBool(secure)},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.GetVolume().GetVolumeId()
	if out := n.d.must("volume", "get", id, "-o", "json"); strings.Contains(out, `"cipher": "aes-256-xts"`) != secure {
		t.Errorf("volume %s: secure %v, but its encryption is not as asked:\n%s", id, secure, out)
	}
	if out := n.d.must("volume", "get", id, "-o", "json"); !strings.Contains(out, `"profile": "db"`) ||
		!strings.Contains(out, `"iops_limit": 20000`) || !strings.Contains(out, `"weight": 200`) {
		t.Errorf("volume %s: io_profile or QoS not as the StorageClass asked:\n%s", id, out)
	}
	staging, target := filepath.Join(t.TempDir(), "staging"), filepath.Join(t.TempDir(), "pod", "mount")
	if _, err := node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: vc, VolumeContext: cv.GetVolume().GetVolumeContext()}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	dev := n.d.get(id).Attachment.Device
	done := false
	t.Cleanup(func() {
		if !done { // a failure midway: leave nothing mounted for the daemon's stop
			node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			node.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		}
	})
	files := filepath.Join(target, "before")
	if err := os.Mkdir(files, 0o755); err != nil {
		t.Fatal(err)
	}
	sums := guest.WriteRandomFiles(t, files, 32, 256<<10)
	before := fsBytes(t, target)

	exp, err := ctl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: size * 3 / 2}, VolumeCapability: vc})
	if frontend == "ublk" {
		// 6.12's ublk driver has no UPDATE_SIZE: refused, nothing changed.
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "UBLK_F_UPDATE_SIZE") {
			t.Errorf("online expansion of a ublk volume: %v, want FailedPrecondition naming UBLK_F_UPDATE_SIZE", err)
		}
		if got := n.d.get(id).Size; got != size {
			t.Errorf("refused expansion changed the size to %d", got)
		}
		t.Logf("ublk online expansion refused as expected: %v", status.Convert(err).Message())
	} else {
		if err != nil {
			t.Fatal(err)
		}
		if exp.GetCapacityBytes() != size*3/2 || !exp.GetNodeExpansionRequired() {
			t.Errorf("controller expand: %d bytes, node expansion %v", exp.GetCapacityBytes(), exp.GetNodeExpansionRequired())
		}
		if got, err := guest.DeviceSize(dev); err != nil || got != size*3/2 {
			t.Errorf("%s after the expansion: %d bytes (%v), want %d", dev, got, err, size*3/2)
		}
		if _, err := node.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target,
			StagingTargetPath: staging, VolumeCapability: vc, CapacityRange: &csipb.CapacityRange{RequiredBytes: size * 3 / 2}}); err != nil {
			t.Fatal(err)
		}
		after := fsBytes(t, target)
		t.Logf("%s on %s (%s): filesystem %d -> %d bytes while mounted", fs, dev, frontend, before, after)
		if after < before+size/2*9/10 {
			t.Errorf("the filesystem did not grow by about 256 MiB: %d -> %d bytes", before, after)
		}
		guest.VerifyFiles(t, files, sums)
		if err := os.Mkdir(filepath.Join(target, "after"), 0o755); err != nil {
			t.Fatal(err)
		}
		more := guest.WriteRandomFiles(t, filepath.Join(target, "after"), 16, 1<<20)
		guest.VerifyFiles(t, filepath.Join(target, "after"), more)
	}
	guest.VerifyFiles(t, files, sums)

	if _, err := node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	done = true
	if _, err := ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	mounts, _ := os.ReadFile("/proc/mounts")
	if strings.Contains(string(mounts), staging) || strings.Contains(string(mounts), target) || strings.Contains(string(mounts), dev+" ") {
		t.Errorf("still mounted after unstage:\n%s", mounts)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("publish target %s left behind: %v", target, err)
	}
	if frontend == "nbd" {
		if got, _ := guest.DeviceSize(dev); got != 0 {
			t.Errorf("%s still has %d bytes after unstage: not detached", dev, got)
		}
	} else if _, err := os.Stat(dev); !os.IsNotExist(err) {
		t.Errorf("%s still exists after unstage: %v", dev, err)
	}
	if out := n.d.must("volume", "list"); strings.Contains(out, id) {
		t.Errorf("volume %s still listed after DeleteVolume:\n%s", id, out)
	}
}

func fsBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}
