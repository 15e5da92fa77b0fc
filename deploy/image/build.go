package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/blockd/blockd/vm"
)

// defaultTools are what k8s.io/mount-utils runs for NodeStageVolume,
// NodeExpandVolume and the publish bind mounts.
var defaultTools = []string{
	"/usr/sbin/mkfs.ext4", "/usr/sbin/mke2fs", "/usr/sbin/e2fsck", "/usr/sbin/fsck", "/usr/sbin/fsck.ext4",
	"/usr/sbin/resize2fs", "/usr/sbin/mkfs.xfs", "/usr/sbin/xfs_growfs", "/usr/sbin/blkid",
	"/usr/bin/mount", "/usr/bin/umount",
}

// extraFiles are data files the tools read.
var extraFiles = []string{"/etc/mke2fs.conf"}

type options struct {
	blockd, tag, out, version string
	tools                     []string
}

// epoch is every file's mtime: the same inputs make the same image.
var epoch = time.Unix(0, 0).UTC()

// entry is one file, directory or symlink of the root filesystem.
type entry struct {
	name   string // absolute path in the image
	host   string // file to copy (regular files)
	link   string // symlink target
	mode   int64
	isDir  bool
	inline []byte
}

// rootfs lists the image's files: usr-merged directories, blockd, the
// tools (symlinks kept as symlinks) and their libraries.
func rootfs(o options) ([]entry, error) {
	if static, err := vm.IsStatic(o.blockd); err != nil || !static {
		return nil, fmt.Errorf("%s must be a static binary (CGO_ENABLED=0): %v", o.blockd, err)
	}
	files := map[string]entry{}
	add := func(e entry) {
		files[e.name] = e
		for d := path.Dir(e.name); d != "/"; d = path.Dir(d) {
			if _, ok := files[d]; !ok {
				files[d] = entry{name: d, isDir: true, mode: 0o755}
			}
		}
	}
	for _, l := range [][2]string{{"/bin", "usr/bin"}, {"/sbin", "usr/sbin"}, {"/lib", "usr/lib"}, {"/lib64", "usr/lib64"}} {
		files[l[0]] = entry{name: l[0], link: l[1], mode: 0o777}
	}
	add(entry{name: "/tmp", isDir: true, mode: 0o1777})
	add(entry{name: "/var/lib/blockd", isDir: true, mode: 0o700})
	add(entry{name: "/csi", isDir: true, mode: 0o755})
	add(entry{name: "/etc/mtab", link: "../proc/self/mounts", mode: 0o777})
	add(entry{name: "/usr/bin/blockd", host: o.blockd, mode: 0o755})

	// canon is where a host path lives in the usr-merged image.
	canon := func(p string) (string, error) {
		dir, err := filepath.EvalSymlinks(filepath.Dir(p))
		if err != nil {
			return "", err
		}
		return filepath.Join(dir, filepath.Base(p)), nil
	}
	copyFile := func(p string, mode int64) error {
		name, err := canon(p)
		if err != nil {
			return err
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return err
		}
		if real != name {
			// A symlink (mkfs.ext4 -> mke2fs): keep it one, and the target.
			rel, err := filepath.Rel(filepath.Dir(name), real)
			if err != nil {
				return err
			}
			add(entry{name: name, link: rel, mode: 0o777})
		}
		add(entry{name: real, host: real, mode: mode})
		return nil
	}
	libs := map[string]bool{}
	for _, t := range o.tools {
		if err := copyFile(t, 0o755); err != nil {
			return nil, fmt.Errorf("tool %s: %w (make deps installs e2fsprogs, xfsprogs, util-linux, mount)", t, err)
		}
		ls, err := vm.SharedLibs(t)
		if err != nil {
			return nil, err
		}
		for _, l := range ls {
			libs[l] = true
		}
	}
	for l := range libs {
		if err := copyFile(l, 0o755); err != nil {
			return nil, fmt.Errorf("library %s: %w", l, err)
		}
	}
	for _, f := range extraFiles {
		if err := copyFile(f, 0o644); err != nil {
			return nil, err
		}
	}
	out := make([]entry, 0, len(files))
	for _, e := range files {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

// layerTar writes the entries as a tar stream.
func layerTar(es []entry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range es {
		h := &tar.Header{Name: strings.TrimPrefix(e.name, "/"), Mode: e.mode, ModTime: epoch, Format: tar.FormatPAX}
		switch {
		case e.isDir:
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		case e.link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.link
		default:
			b := e.inline
			if e.host != "" {
				var err error
				if b, err = os.ReadFile(e.host); err != nil {
					return nil, err
				}
			}
			h.Typeflag, h.Size = tar.TypeReg, int64(len(b))
			if err := tw.WriteHeader(h); err != nil {
				return nil, err
			}
			if _, err := tw.Write(b); err != nil {
				return nil, err
			}
			continue
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// image assembles the OCI image.
func image(o options) (v1.Image, []entry, error) {
	es, err := rootfs(o)
	if err != nil {
		return nil, nil, err
	}
	tb, err := layerTar(es)
	if err != nil {
		return nil, nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(tb)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture, cfg.Created = "linux", "amd64", v1.Time{Time: epoch}
	cfg.Config.Entrypoint = []string{"/usr/bin/blockd"}
	cfg.Config.Cmd = []string{"--help"}
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cfg.Config.Labels = map[string]string{
		"org.opencontainers.image.title":       "blockd",
		"org.opencontainers.image.description": "blockd node block-storage daemon and CSI driver, with the filesystem tools NodeStageVolume runs",
	}
	if o.version != "" {
		cfg.Config.Labels["org.opencontainers.image.version"] = o.version
	}
	img, err = mutate.ConfigFile(img, cfg)
	return img, es, err
}

// dockerManifest is one entry of a `docker save` archive's manifest.json.
type dockerManifest struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

// build writes the image tar and returns a one-line summary.
func build(o options) (string, error) {
	img, es, err := image(o)
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "blockd-image-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return "", err
	}
	name := o.tag
	if !strings.Contains(strings.Split(name, "/")[0], ".") {
		name = "docker.io/" + name // containerd's full form
	}
	_, tag, _ := strings.Cut(path.Base(o.tag), ":")
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          name,
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return "", err
	}
	cfgName, err := img.ConfigName()
	if err != nil {
		return "", err
	}
	layers, err := img.Layers()
	if err != nil {
		return "", err
	}
	dm := dockerManifest{Config: "blobs/sha256/" + cfgName.Hex, RepoTags: []string{o.tag}}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return "", err
		}
		dm.Layers = append(dm.Layers, "blobs/sha256/"+d.Hex)
	}
	mb, err := json.Marshal([]dockerManifest{dm})
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), mb, 0o644); err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		return "", err
	}
	if err := tarDir(dir, o.out); err != nil {
		return "", err
	}
	fi, err := os.Stat(o.out)
	if err != nil {
		return "", err
	}
	digest, _ := img.Digest()
	var tools []string
	for _, e := range es {
		if slices.Contains(o.tools, e.name) {
			tools = append(tools, path.Base(e.name))
		}
	}
	return fmt.Sprintf("%s: %s, %.1f MiB, %d files (manifest %s): blockd and %s", o.out, o.tag, float64(fi.Size())/(1<<20), len(es), digest, strings.Join(tools, ", ")), nil
}

// tarDir writes dir's files into a tar at out, sorted, with fixed times.
func tarDir(dir, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	var paths []string
	if err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	}); err != nil {
		return err
	}
	sort.Strings(paths)
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		h := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, ModTime: epoch, Typeflag: tar.TypeReg, Size: fi.Size()}
		if fi.IsDir() {
			h.Name, h.Mode, h.Typeflag, h.Size = h.Name+"/", 0o755, tar.TypeDir, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if !fi.IsDir() {
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			if err != nil {
				return err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
