package daemon

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cluster"
	"github.com/blockd/blockd/cluster/etcdtest"
	"github.com/blockd/blockd/internal/leakcheck"
	"github.com/blockd/blockd/transport"
)

// clusterConfig is a one-node cluster on etcd at url, with the node's
// certificate of a fresh CA.
func clusterConfig(t *testing.T, url, state string) Config {
	t.Helper()
	ca, err := transport.GenerateCA("test-ca", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	caPEM, _, _ := ca.PEM()
	cert, err := ca.Issue("n1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	crt, key, _ := transport.CertPEM(cert)
	for name, b := range map[string][]byte{"ca.crt": caPEM, "n1.crt": crt, "n1.key": key} {
		writeTestFile(t, filepath.Join(dir, name), b)
	}
	return Config{StateDir: state, NBDListen: "127.0.0.1:0", Logger: quietLog(),
		Replication: ReplicationConfig{Node: "n1", Listen: "127.0.0.1:0", CAFile: filepath.Join(dir, "ca.crt"),
			CertFile: filepath.Join(dir, "n1.crt"), KeyFile: filepath.Join(dir, "n1.key")},
		Cluster: ClusterConfig{Endpoints: []string{url}, LeaseTTL: 3 * time.Second, Labels: map[string]string{"zone": "a"}}}
}

// A cluster daemon's life: it joins, a volume made through its API gets
// its copy, a client takes it, the metrics count it, and a shutdown
// hands it back cleanly and leaves no goroutine or file descriptor
// behind; the next run finds it and serves it again.
func TestClusterDaemonLifecycle(t *testing.T) {
	etcd := etcdtest.Start(t)
	cfg := clusterConfig(t, etcd.URL, t.TempDir())
	goroutines, fds := numGoroutines(), leakcheck.FDs(t)

	d, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := api.NewClient(filepath.Join(cfg.StateDir, "blockd.sock"))
	if _, err := c.CreateVolume(api.Spec{Name: "v", Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	ns, err := c.Nodes()
	if err != nil || len(ns) != 1 || ns[0].State != api.NodeReady || ns[0].Labels["zone"] != "a" || ns[0].Volumes != 1 {
		t.Fatalf("nodes: %+v %v", ns, err)
	}
	cl := dialNBD(t, d, "v")
	data := bytes.Repeat([]byte{0xab}, 4096)
	if _, err := cl.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	cl.Flush()
	v, err := c.GetVolume("v")
	if err != nil || v.Placement == nil || v.Placement.Owner != "n1" || v.Placement.LastFailover == nil {
		t.Fatalf("volume after the first client: %+v %v", v.Placement, err)
	}
	var out strings.Builder
	mfs, _ := d.reg.Gather()
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "blockd_cluster_") {
			out.WriteString(mf.String() + "\n")
		}
	}
	for _, want := range []string{"blockd_cluster_owner_changes_total", "blockd_cluster_lease_renew_failures_total",
		"blockd_cluster_leases_lost_total", "blockd_cluster_lease_valid_seconds", "blockd_cluster_owned_volumes"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("metric %s missing:\n%s", want, out.String())
		}
	}
	cl.Close()
	if err := d.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	st, err := cluster.Open(context.Background(), cluster.Config{Endpoints: []string{etcd.URL}, Node: "probe", Dir: t.TempDir(), Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	vi, err := st.Get(context.Background(), "v")
	st.Close()
	if err != nil || vi.Owner != "" || !vi.State.Clean {
		t.Fatalf("after the shutdown the store says owner %q, clean %v (%v); want released cleanly", vi.Owner, vi.State.Clean, err)
	}
	leakcheck.Goroutines(t, goroutines)
	if n := leakcheck.FDs(t); n > fds {
		t.Errorf("%d file descriptors open after the shutdown, %d before the start", n, fds)
	}

	d2, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Shutdown(context.Background())
	got := make([]byte, 4096)
	if _, err := dialNBD(t, d2, "v").ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after a restart: %v", err)
	}
}

func writeTestFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func numGoroutines() int { return runtime.NumGoroutine() }
