package main

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func needTool(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not installed (make deps installs it)", tool)
		}
		t.Skipf("%s not installed; run make deps", tool)
	}
	return p
}

// untar unpacks r into dir: directories, files and symlinks only.
func untar(t *testing.T, r io.Reader, dir string) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(p, dir) {
			t.Fatalf("tar entry %q escapes", h.Name)
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, os.FileMode(h.Mode).Perm()|os.ModeDir)
		case tar.TypeSymlink:
			err = os.Symlink(h.Linkname, p)
		case tar.TypeReg:
			var f *os.File
			if f, err = os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode).Perm()); err == nil {
				_, err = io.Copy(f, tr)
				f.Close()
			}
		default:
			t.Fatalf("tar entry %q: unexpected type %c", h.Name, h.Typeflag)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestImage builds the image from a static blockd, reads it back both as
// an OCI layout (what ctr import reads) and as a docker save archive (what
// docker load reads), unpacks its root filesystem and runs blockd and the
// filesystem tools from it in a chroot: mkfs.ext4 formats a file that
// e2fsck then finds clean.
func TestImage(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("chroot needs root")
		}
		t.Skip("chroot needs root")
	}
	chroot := needTool(t, "chroot")
	dir := t.TempDir()
	bin := filepath.Join(dir, "blockd")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	cmd := exec.Command(gobin, "build", "-o", bin, "github.com/blockd/blockd/cmd/blockd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "image.tar")
	sum, err := build(options{blockd: bin, tag: "blockd/blockd:test", out: out, tools: defaultTools, version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(sum)

	// As an OCI layout, named for containerd.
	oci := filepath.Join(dir, "oci")
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	untar(t, f, oci)
	f.Close()
	for _, want := range []string{"oci-layout", "index.json", "manifest.json"} {
		if _, err := os.Stat(filepath.Join(oci, want)); err != nil {
			t.Errorf("the image tar has no %s: %v", want, err)
		}
	}
	idx, err := layout.ImageIndexFromPath(oci)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Annotations["io.containerd.image.name"] != "docker.io/blockd/blockd:test" {
		t.Fatalf("index.json: %+v, want one image named docker.io/blockd/blockd:test", im.Manifests)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	// As a docker save archive, the same image.
	tag, _ := name.NewTag("blockd/blockd:test")
	dimg, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatalf("docker archive: %v", err)
	}
	c1, _ := img.ConfigName()
	c2, err := dimg.ConfigName()
	if err != nil || c1 != c2 {
		t.Errorf("docker manifest.json config %s (%v), OCI config %s", c2, err, c1)
	}
	if _, err := exec.LookPath("skopeo"); err == nil || os.Getenv("CI") == "true" {
		skopeo := needTool(t, "skopeo")
		for _, ref := range []string{"oci-archive:" + out, "docker-archive:" + out} {
			if b, err := exec.Command(skopeo, "inspect", ref).CombinedOutput(); err != nil {
				t.Errorf("skopeo inspect %s: %v\n%s", ref, err, b)
			}
		}
	}

	root := filepath.Join(dir, "root")
	rc := mutate.Extract(img)
	untar(t, rc, root)
	rc.Close()
	run := func(args ...string) string {
		t.Helper()
		b, err := exec.Command(chroot, append([]string{root}, args...)...).CombinedOutput()
		if err != nil {
			t.Errorf("chroot %s: %v\n%s", strings.Join(args, " "), err, b)
		}
		return string(b)
	}
	if v := run("/usr/bin/blockd", "version"); !strings.HasPrefix(v, "blockd ") {
		t.Errorf("blockd version: %q", v)
	}
	if v := run("/usr/sbin/mkfs.ext4", "-V"); !strings.Contains(v, "mke2fs") {
		t.Errorf("mkfs.ext4 -V: %q", v)
	}
	for _, tool := range [][]string{{"/usr/sbin/mkfs.xfs", "-V"}, {"/usr/sbin/xfs_growfs", "-V"}, {"/usr/sbin/blkid", "-V"},
		{"/usr/bin/mount", "-V"}, {"/usr/bin/umount", "-V"}, {"/usr/sbin/fsck", "-V"}} {
		run(tool...)
	}
	run("/usr/sbin/mkfs.ext4", "-q", "-F", "/tmp/fs.img", "32M")
	if v := run("/usr/sbin/e2fsck", "-fn", "/tmp/fs.img"); !strings.Contains(v, "clean") && !strings.Contains(v, "files") {
		t.Errorf("e2fsck of a fresh filesystem: %q", v)
	}
	// resize2fs reads the mount table (/proc, absent in a bare chroot):
	// it is checked to be there and to load its libraries.
	if v, _ := exec.Command(chroot, root, "/usr/sbin/resize2fs").CombinedOutput(); !strings.Contains(string(v), "resize2fs 1.") {
		t.Errorf("resize2fs: %q", v)
	}
}
