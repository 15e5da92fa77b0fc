package probe

import (
	"os"
	"path/filepath"
	"testing"
)

func TestParseCgroupPath(t *testing.T) {
	for _, tc := range []struct{ path, uid, ctr string }{
		// cgroupfs driver
		{"/kubepods/burstable/pod0b7d8a4c-1c2e-4f5a-9e3b-aaaaaaaaaaaa/abc123", "0b7d8a4c-1c2e-4f5a-9e3b-aaaaaaaaaaaa", "abc123"},
		{"/kubepods/besteffort/podu1/c1", "u1", "c1"},
		{"/kubepods/podu2/c2", "u2", "c2"}, // guaranteed QoS
		{"/kubepods/podu3", "u3", ""},      // the pod cgroup itself
		{"/kubepods/podu4/c4/nested", "u4", "c4"},
		{"/kubepods/burstable", "", ""},
		// systemd driver
		{"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f3c2b1a_7d6e_4c8b_9a0f_bbbbbbbbbbbb.slice/cri-containerd-deadbeef.scope",
			"5f3c2b1a-7d6e-4c8b-9a0f-bbbbbbbbbbbb", "deadbeef"},
		{"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu6.slice/crio-feed.scope", "u6", "feed"},
		{"/kubepods.slice/kubepods-podu7.slice/docker-cafe.scope", "u7", "cafe"},
		{"/kubepods.slice/kubepods-podu8.slice/crio-conmon-cafe.scope", "u8", "conmon-cafe"},
		// under a prefix (kind, nested node containers, our tests)
		{"/blockd-probe-test-1/kubepods/podu9/c9", "u9", "c9"},
		// not pods
		{"/", "", ""},
		{"/system.slice/kubelet.service", "", ""},
		{"/user.slice/podman-pod1.slice", "", ""},
	} {
		uid, ctr := parseCgroupPath(tc.path)
		if uid != tc.uid || ctr != tc.ctr {
			t.Errorf("parseCgroupPath(%q) = %q, %q; want %q, %q", tc.path, uid, ctr, tc.uid, tc.ctr)
		}
	}
}

func TestPodMeta(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"team-a_web-0_u1", "kube-system_coredns-5d78c9869d-abcde_u2", "junk"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	r := &resolver{podLogDir: dir, pods: map[string][2]string{}}
	if ns, name := r.podMeta("u2"); ns != "kube-system" || name != "coredns-5d78c9869d-abcde" {
		t.Errorf("u2: %q %q", ns, name)
	}
	if ns, name := r.podMeta("u1"); ns != "team-a" || name != "web-0" {
		t.Errorf("u1: %q %q", ns, name)
	}
	if ns, name := r.podMeta("nope"); ns != "" || name != "" {
		t.Errorf("unknown pod named %q %q", ns, name)
	}
}

func TestUnescapeMount(t *testing.T) {
	if got := unescapeMount(`/sys/fs/cgroup\040x`); got != "/sys/fs/cgroup x" {
		t.Errorf("got %q", got)
	}
}

func TestCgroup2Mount(t *testing.T) {
	root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.procs")); err != nil {
		t.Errorf("%s is not a cgroup2 mount: %v", root, err)
	}
}

// TestIOOnV2: the BPF blkcg walk is kept where the v2 root lists the io
// controller, dropped where it does not (hybrid hosts, io on v1 blkio),
// and kept when the list cannot be read (the BPF side then checks).
func TestIOOnV2(t *testing.T) {
	const missing = "(no file)"
	for _, tc := range []struct {
		controllers string
		want        bool
	}{
		{"cpuset cpu io memory pids\n", true},
		{"cpuset cpu memory pids\n", false},
		{"iocost memory\n", false},
		{missing, true},
	} {
		root := t.TempDir()
		if tc.controllers != missing {
			if err := os.WriteFile(filepath.Join(root, "cgroup.controllers"), []byte(tc.controllers), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		r, err := newResolver(root, "")
		if err != nil {
			t.Fatal(err)
		}
		if got := r.ioOnV2(); got != tc.want {
			t.Errorf("controllers %q: ioOnV2 = %v, want %v", tc.controllers, got, tc.want)
		}
		r.close()
	}
}
