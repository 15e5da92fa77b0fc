package deploy

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/yaml"

	"github.com/blockd/blockd/cli"
	"github.com/blockd/blockd/csi"
)

const manifests = "kubernetes"

// Sidecar images: csi-driver-host-path's versions. No attacher
// (attachRequired: false), no snapshotter (no snapshots).
var sidecars = map[string]string{
	"csi-provisioner":           "v6.3.0",
	"csi-resizer":               "v2.2.1",
	"csi-node-driver-registrar": "v2.17.0",
	"livenessprobe":             "v2.19.0",
}

// kustomization is kustomization.yaml, decoded strictly too.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images"`
}

// objects are every manifest's objects by kind.
type objects struct {
	namespaces  []*corev1.Namespace
	sas         []*corev1.ServiceAccount
	drivers     []*storagev1.CSIDriver
	classes     []*storagev1.StorageClass
	deployments []*appsv1.Deployment
	daemonsets  []*appsv1.DaemonSet
	croles      []*rbacv1.ClusterRole
	crbs        []*rbacv1.ClusterRoleBinding
	roles       []*rbacv1.Role
	rbs         []*rbacv1.RoleBinding
	pvcs        []*corev1.PersistentVolumeClaim
	pods        []*corev1.Pod
}

// decodeFile decodes every document of a manifest strictly: an unknown or
// duplicated field, a wrong type or an unknown kind fails.
func decodeFile(t *testing.T, file string, into *objects) {
	t.Helper()
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, rbacv1.AddToScheme, storagev1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	dec := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for i, doc := range bytes.Split(b, []byte("\n---\n")) {
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := dec.Decode(doc, nil, nil)
		if err != nil {
			t.Errorf("%s document %d: %v", file, i+1, err)
			continue
		}
		switch o := obj.(type) {
		case *corev1.Namespace:
			into.namespaces = append(into.namespaces, o)
		case *corev1.ServiceAccount:
			into.sas = append(into.sas, o)
		case *storagev1.CSIDriver:
			into.drivers = append(into.drivers, o)
		case *storagev1.StorageClass:
			into.classes = append(into.classes, o)
		case *appsv1.Deployment:
			into.deployments = append(into.deployments, o)
		case *appsv1.DaemonSet:
			into.daemonsets = append(into.daemonsets, o)
		case *rbacv1.ClusterRole:
			into.croles = append(into.croles, o)
		case *rbacv1.ClusterRoleBinding:
			into.crbs = append(into.crbs, o)
		case *rbacv1.Role:
			into.roles = append(into.roles, o)
		case *rbacv1.RoleBinding:
			into.rbs = append(into.rbs, o)
		case *corev1.PersistentVolumeClaim:
			into.pvcs = append(into.pvcs, o)
		case *corev1.Pod:
			into.pods = append(into.pods, o)
		default:
			t.Errorf("%s document %d: kind %s has no check here", file, i+1, gvk.Kind)
		}
	}
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

func loadManifests(t *testing.T) (kustomization, *objects, *objects) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(manifests, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(b, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	// Every manifest is applied, and only manifests are listed.
	files, _ := filepath.Glob(filepath.Join(manifests, "*.yaml"))
	for _, f := range files {
		if base := filepath.Base(f); base != "kustomization.yaml" && !slices.Contains(k.Resources, base) {
			t.Errorf("%s is not in kustomization.yaml's resources", base)
		}
	}
	all := &objects{}
	for _, r := range k.Resources {
		decodeFile(t, filepath.Join(manifests, r), all)
	}
	ex := &objects{}
	examples, _ := filepath.Glob(filepath.Join(manifests, "examples", "*.yaml"))
	for _, f := range examples {
		decodeFile(t, f, ex)
	}
	if len(examples) == 0 || len(ex.pvcs) == 0 || len(ex.pods) == 0 {
		t.Errorf("examples: %d files, %d claims, %d pods; want a PVC and a pod", len(examples), len(ex.pvcs), len(ex.pods))
	}
	return k, all, ex
}

// TestManifests decodes every manifest strictly into the k8s.io/api types
// and checks that they agree with each other and with the binary: driver
// name, namespace, service accounts, roles, socket paths, images, the
// flags of every blockd command line, StorageClass parameters.
func TestManifests(t *testing.T) {
	k, all, ex := loadManifests(t)

	if len(all.namespaces) != 1 {
		t.Fatalf("%d namespaces, want 1", len(all.namespaces))
	}
	ns := all.namespaces[0].Name
	if len(all.drivers) != 1 || all.drivers[0].Name != csi.DefaultName {
		t.Fatalf("CSIDriver objects %v, want one named %s", all.drivers, csi.DefaultName)
	}
	drv := all.drivers[0]
	if drv.Spec.AttachRequired == nil || *drv.Spec.AttachRequired {
		t.Error("CSIDriver must say attachRequired: false (there is no external-attacher)")
	}

	sas := map[string]bool{}
	for _, sa := range all.sas {
		sas[sa.Namespace+"/"+sa.Name] = true
	}
	checkNS := func(kind, name, got string) {
		if got != ns {
			t.Errorf("%s %s is in namespace %q, want %q", kind, name, got, ns)
		}
	}
	for _, sa := range all.sas {
		checkNS("ServiceAccount", sa.Name, sa.Namespace)
	}
	croles, roles := map[string]bool{}, map[string]bool{}
	for _, r := range all.croles {
		croles[r.Name] = true
	}
	for _, r := range all.roles {
		checkNS("Role", r.Name, r.Namespace)
		roles[r.Name] = true
	}
	checkSubjects := func(kind, name string, subs []rbacv1.Subject) {
		for _, s := range subs {
			if s.Kind != "ServiceAccount" || !sas[s.Namespace+"/"+s.Name] {
				t.Errorf("%s %s binds %s %s/%s, which no manifest defines", kind, name, s.Kind, s.Namespace, s.Name)
			}
		}
	}
	for _, b := range all.crbs {
		checkSubjects("ClusterRoleBinding", b.Name, b.Subjects)
		if b.RoleRef.Kind != "ClusterRole" || !croles[b.RoleRef.Name] {
			t.Errorf("ClusterRoleBinding %s refers to %s %s, which no manifest defines", b.Name, b.RoleRef.Kind, b.RoleRef.Name)
		}
	}
	for _, b := range all.rbs {
		checkNS("RoleBinding", b.Name, b.Namespace)
		checkSubjects("RoleBinding", b.Name, b.Subjects)
		if b.RoleRef.Kind != "Role" || !roles[b.RoleRef.Name] {
			t.Errorf("RoleBinding %s refers to %s %s, which no manifest defines", b.Name, b.RoleRef.Kind, b.RoleRef.Name)
		}
	}

	if len(all.deployments) != 1 || len(all.daemonsets) != 1 {
		t.Fatalf("%d Deployments and %d DaemonSets, want the controller and the node plugin", len(all.deployments), len(all.daemonsets))
	}
	ctl, node := all.deployments[0], all.daemonsets[0]
	checkNS("Deployment", ctl.Name, ctl.Namespace)
	checkNS("DaemonSet", node.Name, node.Namespace)
	seen := map[string]bool{}
	for _, p := range []struct {
		what string
		spec *corev1.PodSpec
	}{{"controller " + ctl.Name, &ctl.Spec.Template.Spec}, {"node " + node.Name, &node.Spec.Template.Spec}} {
		if !sas[ns+"/"+p.spec.ServiceAccountName] {
			t.Errorf("%s runs as service account %q, which no manifest defines", p.what, p.spec.ServiceAccountName)
		}
		checkPod(t, p.what, p.spec, k, seen)
	}
	for img, ver := range sidecars {
		if !seen[img] {
			t.Errorf("no container runs %s:%s", img, ver)
		}
	}
	for _, unwanted := range []string{"csi-attacher", "csi-snapshotter"} {
		if seen[unwanted] {
			t.Errorf("%s is deployed, but blockd needs none (attachRequired: false; no snapshots)", unwanted)
		}
	}
	// The provisioner runs per node (the daemon that creates a volume owns
	// it), the resizer once, in the controller.
	if !hasContainer(&node.Spec.Template.Spec, "csi-provisioner") || hasContainer(&ctl.Spec.Template.Spec, "csi-provisioner") {
		t.Error("csi-provisioner must run in the node DaemonSet (distributed provisioning), not in the controller")
	}
	if !hasContainer(&ctl.Spec.Template.Spec, "csi-resizer") {
		t.Error("csi-resizer must run in the controller Deployment")
	}
	checkNodePlugin(t, &node.Spec.Template.Spec)

	known := csi.ParamNames()
	classes := map[string]bool{}
	for _, sc := range all.classes {
		classes[sc.Name] = true
		if sc.Provisioner != drv.Name {
			t.Errorf("StorageClass %s: provisioner %q, want %q", sc.Name, sc.Provisioner, drv.Name)
		}
		if sc.VolumeBindingMode == nil || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer {
			t.Errorf("StorageClass %s: want volumeBindingMode WaitForFirstConsumer (the pod's node creates the volume)", sc.Name)
		}
		for p := range sc.Parameters {
			if !slices.Contains(known, p) && !strings.HasPrefix(p, "csi.storage.k8s.io/") {
				t.Errorf("StorageClass %s: parameter %q is not one blockd knows (%s)", sc.Name, p, strings.Join(known, ", "))
			}
		}
	}
	seeds := false
	for _, sc := range all.classes {
		p := sc.Parameters
		seeds = seeds || p["repl"] == "3" && p["io_profile"] == "db" && p["secure"] == "true"
	}
	if !seeds {
		t.Error("no StorageClass with the seeds' repl: \"3\", io_profile: db, secure: \"true\"")
	}
	for _, c := range ex.pvcs {
		if c.Spec.StorageClassName == nil || !classes[*c.Spec.StorageClassName] {
			t.Errorf("example PVC %s names a StorageClass no manifest defines", c.Name)
		}
	}
	for _, p := range ex.pods {
		for _, v := range p.Spec.Volumes {
			if c := v.PersistentVolumeClaim; c != nil && !slices.ContainsFunc(ex.pvcs, func(x *corev1.PersistentVolumeClaim) bool { return x.Name == c.ClaimName }) {
				t.Errorf("example pod %s uses claim %s, which the example does not define", p.Name, c.ClaimName)
			}
		}
	}
}

func hasContainer(p *corev1.PodSpec, name string) bool {
	return slices.ContainsFunc(p.Containers, func(c corev1.Container) bool { return c.Name == name })
}

// flagValue returns --name=value (or --name value) from args.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

// mountOf returns the volume and mount of c whose mount path holds file.
func mountOf(c *corev1.Container, file string) (corev1.VolumeMount, bool) {
	for _, m := range c.VolumeMounts {
		if path.Dir(file) == m.MountPath {
			return m, true
		}
	}
	return corev1.VolumeMount{}, false
}

// checkPod checks the containers of one pod: images, blockd command
// lines (parsed by the real command), and that every sidecar reaches the
// driver's socket through the same volume.
func checkPod(t *testing.T, what string, p *corev1.PodSpec, k kustomization, seen map[string]bool) {
	t.Helper()
	var endpointVol string
	var healthPort int32
	for i := range p.Containers {
		c := &p.Containers[i]
		img, tag, _ := strings.Cut(path.Base(c.Image), ":")
		seen[img] = true
		if want, ok := sidecars[img]; ok && tag != want {
			t.Errorf("%s: %s runs %s, want %s", what, c.Name, c.Image, want)
		}
		if img != "blockd" {
			continue
		}
		if !slices.ContainsFunc(k.Images, func(i struct {
			Name    string `json:"name"`
			NewName string `json:"newName,omitempty"`
			NewTag  string `json:"newTag,omitempty"`
		}) bool {
			return i.Name+":"+i.NewTag == c.Image
		}) {
			t.Errorf("%s: %s image %s is not the one kustomization.yaml sets", what, c.Name, c.Image)
		}
		if !slices.Equal(c.Command, []string{"/usr/bin/blockd"}) {
			t.Errorf("%s: %s command %v, want /usr/bin/blockd (the image's binary)", what, c.Name, c.Command)
		}
		// The real command line parses every flag (--help stops it there).
		var stderr bytes.Buffer
		if code := cli.Main(append(slices.Clone(c.Args), "--help"), io.Discard, &stderr); code != 0 {
			t.Errorf("%s: %s: blockd %s: exit %d: %s", what, c.Name, strings.Join(c.Args, " "), code, stderr.String())
		}
		if len(c.Args) > 0 && c.Args[0] == "csi" {
			ep, ok := flagValue(c.Args, "endpoint")
			sock := strings.TrimPrefix(ep, "unix://")
			m, mok := mountOf(c, sock)
			if !ok || !mok {
				t.Errorf("%s: %s: --endpoint %q is not on a mounted volume", what, c.Name, ep)
			}
			endpointVol = m.Name
			if strings.Contains(strings.Join(c.Args, " "), "$(NODE_NAME)") &&
				!slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
					return e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
				}) {
				t.Errorf("%s: %s uses $(NODE_NAME) without NODE_NAME from spec.nodeName", what, c.Name)
			}
			for _, port := range c.Ports {
				if port.Name == "healthz" {
					healthPort = port.ContainerPort
				}
			}
		}
	}
	if endpointVol == "" {
		t.Errorf("%s: no blockd csi container", what)
		return
	}
	for i := range p.Containers {
		c := &p.Containers[i]
		addr, ok := flagValue(c.Args, "csi-address")
		if !ok {
			continue
		}
		if m, mok := mountOf(c, addr); !mok || m.Name != endpointVol || path.Base(addr) != "csi.sock" {
			t.Errorf("%s: %s --csi-address=%s is not the driver's socket (volume %s)", what, c.Name, addr, endpointVol)
		}
		if port, ok := flagValue(c.Args, "health-port"); ok && port != fmt.Sprint(healthPort) {
			t.Errorf("%s: livenessprobe serves port %s, the driver container's healthz port is %d", what, port, healthPort)
		}
	}
}

// checkNodePlugin checks what the node plugin needs from the host.
func checkNodePlugin(t *testing.T, p *corev1.PodSpec) {
	t.Helper()
	hostPaths := map[string]string{}
	for _, v := range p.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	container := func(name string) *corev1.Container {
		for i := range p.Containers {
			if p.Containers[i].Name == name {
				return &p.Containers[i]
			}
		}
		t.Fatalf("node plugin: no container %s", name)
		return nil
	}
	daemon, plugin, reg := container("blockd"), container("blockd-csi"), container("node-driver-registrar")

	// The daemon: privileged, its state on the host, the devices, modules.
	state, _ := flagValue(daemon.Args, "state-dir")
	if m, ok := mountOf(daemon, filepath.Join(state, "x")); !ok || hostPaths[m.Name] == "" {
		t.Errorf("blockd serve --state-dir %s is not a hostPath mount", state)
	} else {
		// The plugin reaches the daemon's API socket through the same
		// host directory.
		api, _ := flagValue(plugin.Args, "api-socket")
		pm, ok := mountOf(plugin, api)
		if !ok || hostPaths[pm.Name] != hostPaths[m.Name] || path.Base(api) != "blockd.sock" || path.Dir(api) != state {
			t.Errorf("blockd csi --api-socket %s is not the daemon's socket in %s (host %s)", api, state, hostPaths[m.Name])
		}
	}
	for _, c := range []*corev1.Container{daemon, plugin} {
		if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
			t.Errorf("node plugin: %s must be privileged (kernel devices, mounts)", c.Name)
		}
		for _, want := range []struct {
			host string
			ro   bool
		}{{"/dev", false}, {"/sys", c == plugin}, {"/lib/modules", true}} {
			ok := slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
				return hostPaths[m.Name] == want.host && m.MountPath == want.host && m.ReadOnly == want.ro
			})
			if !ok {
				t.Errorf("node plugin: %s needs hostPath %s at %s (read-only %v)", c.Name, want.host, want.host, want.ro)
			}
		}
	}
	// Mounts made in the plugin container must reach kubelet.
	if !slices.ContainsFunc(plugin.VolumeMounts, func(m corev1.VolumeMount) bool {
		return hostPaths[m.Name] == "/var/lib/kubelet" && m.MountPath == "/var/lib/kubelet" &&
			m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional
	}) {
		t.Error("node plugin: blockd-csi needs /var/lib/kubelet with mountPropagation Bidirectional")
	}
	// kubelet finds the driver's socket where the registrar says, which is
	// the host directory the driver serves in.
	regPath, _ := flagValue(reg.Args, "kubelet-registration-path")
	ep, _ := flagValue(plugin.Args, "endpoint")
	m, _ := mountOf(plugin, strings.TrimPrefix(ep, "unix://"))
	if want := filepath.Join("/var/lib/kubelet/plugins", csi.DefaultName, "csi.sock"); regPath != want || filepath.Join(hostPaths[m.Name], "csi.sock") != want {
		t.Errorf("registration path %s, plugin socket on the host %s/csi.sock; want both %s", regPath, hostPaths[m.Name], want)
	}
	if !slices.ContainsFunc(reg.VolumeMounts, func(vm corev1.VolumeMount) bool {
		return hostPaths[vm.Name] == "/var/lib/kubelet/plugins_registry" && vm.MountPath == "/registration"
	}) {
		t.Error("node-driver-registrar needs /var/lib/kubelet/plugins_registry at /registration")
	}
}
