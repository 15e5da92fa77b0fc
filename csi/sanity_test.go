package csi_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

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

// TestSanity runs csi-sanity's Identity and Controller tests against the
// driver and a real daemon (file volumes, sparse: the suite's volumes are
// 10 GiB).
func TestSanity(t *testing.T) {
	dir := t.TempDir()
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
	sock := filepath.Join(dir, "csi.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go drv.ServeListener(ln)
	t.Cleanup(drv.Stop)

	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeParameters = map[string]string{"io_profile": "db", "iops_limit": "5k"}
	t.Logf("skipping the %q tests on the build host: they attach kernel nbd devices and mount; TestCSISanity in vm/kerneltest runs them", hostSkip)
	sanityrun.Run(t, "blockd CSI sanity (host: identity and controller)", []string{hostSkip}, sanityrun.Config{Name: "file", Config: &cfg})
}
