package probe

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// fileidKernfs is the file handle type kernfs (and so cgroupfs) uses; the
// handle body is the 64-bit node id, which is also the cgroup id that
// bpf_get_current_cgroup_id returns.
const fileidKernfs = 0xfe

// podMetaRescan bounds how often a pod uid with no metadata makes the
// resolver re-read the pod log directory.
const podMetaRescan = 2 * time.Second

// cgInfo is what a cgroup id resolves to.
type cgInfo struct {
	abs       string // absolute path, to revalidate the cache
	path      string // below the cgroup v2 mount, with a leading slash
	podUID    string
	container string
	namespace string
	pod       string
}

// resolver maps cgroup ids to cgroup v2 paths and Kubernetes identities.
// Cgroup ids are never reused (kernfs ids grow monotonically), so a cached
// answer stays right for as long as the directory with that inode exists.
// Not safe for concurrent use; Probe serialises it.
type resolver struct {
	root      string // cgroup v2 mount point
	rootFD    int    // for open_by_handle_at
	podLogDir string

	cache    map[uint64]cgInfo
	byHandle bool // open_by_handle_at works; else walk the tree
	walked   map[uint64]string
	walkedAt time.Time

	pods       map[string][2]string // uid -> namespace, name
	podsReadAt time.Time

	devs map[uint32]string
}

func newResolver(root, podLogDir string) (*resolver, error) {
	if root == "" {
		var err error
		if root, err = cgroup2Mount(); err != nil {
			return nil, err
		}
	}
	if podLogDir == "" {
		podLogDir = "/var/log/pods"
	}
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open cgroup root %s: %w", root, err)
	}
	return &resolver{
		root:      root,
		rootFD:    fd,
		podLogDir: podLogDir,
		cache:     map[uint64]cgInfo{},
		byHandle:  true,
		pods:      map[string][2]string{},
		devs:      map[uint32]string{},
	}, nil
}

// ioOnV2 reports whether the io controller is on the cgroup v2 hierarchy,
// so that bios carry v2 blkcgs. When the root's controller list cannot be
// read it says true: the BPF side then checks each bio's hierarchy itself.
func (r *resolver) ioOnV2() bool {
	b, err := os.ReadFile(filepath.Join(r.root, "cgroup.controllers"))
	if err != nil {
		return true
	}
	return slices.Contains(strings.Fields(string(b)), "io")
}

func (r *resolver) close() {
	if r.rootFD >= 0 {
		unix.Close(r.rootFD)
		r.rootFD = -1
	}
}

// cgroup resolves id; alive is false once the cgroup has been removed.
func (r *resolver) cgroup(id uint64) (cgInfo, bool) {
	if c, ok := r.cache[id]; ok {
		var st unix.Stat_t
		if unix.Stat(c.abs, &st) == nil && st.Ino == id {
			if c.podUID != "" && c.pod == "" {
				c.namespace, c.pod = r.podMeta(c.podUID)
				r.cache[id] = c
			}
			return c, true
		}
		delete(r.cache, id)
	}
	abs, err := r.lookup(id)
	if err != nil {
		return cgInfo{}, false
	}
	rel, err := filepath.Rel(r.root, abs)
	if err != nil || strings.HasPrefix(rel, "..") {
		return cgInfo{}, false
	}
	c := cgInfo{abs: abs, path: "/" + strings.TrimPrefix(rel, ".")}
	if rel == "." {
		c.path = "/"
	}
	c.podUID, c.container = parseCgroupPath(c.path)
	if c.podUID != "" {
		c.namespace, c.pod = r.podMeta(c.podUID)
	}
	r.cache[id] = c
	return c, true
}

// lookup finds the absolute path of cgroup id, by file handle when the
// kernel allows it (one syscall) and by walking the hierarchy otherwise.
func (r *resolver) lookup(id uint64) (string, error) {
	if r.byHandle {
		var b [8]byte
		binary.NativeEndian.PutUint64(b[:], id)
		fd, err := unix.OpenByHandleAt(r.rootFD, unix.NewFileHandle(fileidKernfs, b[:]), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_PATH)
		if err == nil {
			defer unix.Close(fd)
			return os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		}
		if errors.Is(err, syscall.ESTALE) || errors.Is(err, syscall.ENOENT) {
			return "", err
		}
		// EPERM (no CAP_DAC_READ_SEARCH) or an unsupported kernel.
		r.byHandle = false
	}
	if p, ok := r.walked[id]; ok {
		return p, nil
	}
	// A miss rewalks at most once a second: ids of dead cgroups are
	// dropped from the maps after one miss and do not come back.
	if time.Since(r.walkedAt) < time.Second && r.walked != nil {
		return "", fs.ErrNotExist
	}
	r.walked = map[uint64]string{}
	r.walkedAt = time.Now()
	filepath.WalkDir(r.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil {
			r.walked[st.Ino] = p
		}
		return nil
	})
	if p, ok := r.walked[id]; ok {
		return p, nil
	}
	return "", fs.ErrNotExist
}

// parseCgroupPath extracts the pod uid and container id from a cgroup v2
// path in either kubelet layout:
//
//	cgroupfs: .../kubepods[/<qos>]/pod<uid>/<container-id>
//	systemd:  .../kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice/<runtime>-<container-id>.scope
//
// with <runtime> cri-containerd, crio or docker. Deeper cgroups belong to
// their container; the pod cgroup itself gives an empty container.
func parseCgroupPath(p string) (podUID, container string) {
	parts := strings.Split(strings.Trim(p, "/"), "/")
	kube := -1
	for i, c := range parts {
		if c == "kubepods" || c == "kubepods.slice" {
			kube = i
			break
		}
	}
	if kube < 0 {
		return "", ""
	}
	for i := kube + 1; i < len(parts) && i <= kube+2; i++ {
		uid := podComponent(parts[i])
		if uid == "" {
			continue
		}
		if i+1 < len(parts) {
			container = containerComponent(parts[i+1])
		}
		return uid, container
	}
	return "", ""
}

func podComponent(c string) string {
	if rest, ok := strings.CutSuffix(c, ".slice"); ok {
		i := strings.LastIndex(rest, "-pod")
		if i < 0 || !strings.HasPrefix(rest, "kubepods") {
			return ""
		}
		return strings.ReplaceAll(rest[i+len("-pod"):], "_", "-")
	}
	if uid, ok := strings.CutPrefix(c, "pod"); ok && uid != "" {
		return uid
	}
	return ""
}

func containerComponent(c string) string {
	id, ok := strings.CutSuffix(c, ".scope")
	if !ok {
		return c
	}
	for _, pre := range []string{"cri-containerd-", "crio-", "docker-", "cri-o-"} {
		if rest, ok := strings.CutPrefix(id, pre); ok {
			return rest
		}
	}
	return id
}

// podMeta names a pod from the kubelet's log directory
// (/var/log/pods/<namespace>_<name>_<uid>): the kubelet creates it for
// every pod before its containers start and removes it with the pod, and
// neither namespaces nor pod names may contain '_', so the split is exact.
// The pod's own hostname file is not used: it holds spec.hostname when set
// and never the namespace. Unknown pods give empty strings.
func (r *resolver) podMeta(uid string) (namespace, name string) {
	if m, ok := r.pods[uid]; ok {
		return m[0], m[1]
	}
	if time.Since(r.podsReadAt) < podMetaRescan && !r.podsReadAt.IsZero() {
		return "", ""
	}
	r.podsReadAt = time.Now()
	ents, err := os.ReadDir(r.podLogDir)
	if err != nil {
		return "", ""
	}
	for _, e := range ents {
		f := strings.Split(e.Name(), "_")
		if len(f) == 3 && e.IsDir() {
			r.pods[f[2]] = [2]string{f[0], f[1]}
		}
	}
	m := r.pods[uid]
	return m[0], m[1]
}

// device names a kernel dev_t from sysfs ("nbd0"), or "major:minor".
func (r *resolver) device(dev uint32) string {
	if n, ok := r.devs[dev]; ok {
		return n
	}
	mm := fmt.Sprintf("%d:%d", DevMajor(dev), DevMinor(dev))
	n := mm
	if l, err := os.Readlink("/sys/dev/block/" + mm); err == nil {
		n = filepath.Base(l)
	}
	r.devs[dev] = n
	return n
}

// cgroup2Mount finds the cgroup v2 mount point: /sys/fs/cgroup on pure v2
// hosts, /sys/fs/cgroup/unified in hybrid mode.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint opts [optional...] - fstype src superopts
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return unescapeMount(fields[4]), nil
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	return "", fmt.Errorf("find cgroup2 mount: %w", fs.ErrNotExist)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
