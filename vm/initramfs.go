package vm

import (
	"bufio"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Binary is a host file placed in the guest.
type Binary struct {
	Host  string // path on the host
	Guest string // absolute path in the guest
}

// InitramfsOptions says what goes into the initramfs besides busybox and the
// kernel's modules.
type InitramfsOptions struct {
	// Busybox is a static busybox; its applets are installed at boot.
	Busybox string
	// Binaries are static programs (CGO_ENABLED=0 Go builds).
	Binaries []Binary
	// Tools are dynamic host programs (mke2fs, e2fsck, etcd); they are
	// copied to the same path with the shared libraries and loader ldd
	// names.
	Tools []string
	// Files are extra host files copied to the same path (e.g.
	// /etc/mke2fs.conf).
	Files []string
	// Command is what /init runs after setting up the system; its exit
	// status is printed as "VMTEST EXIT <n>" before power-off.
	Command []string
	// Env is added to Command's environment.
	Env []string
}

// BuildInitramfs writes a gzip-compressed newc cpio archive to path.
func BuildInitramfs(path string, k *Kernel, o InitramfsOptions) error {
	w := &cpioWriter{seen: map[string]bool{}}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	// Speed over size: the archive is read once, from the page cache.
	zw, _ := gzip.NewWriterLevel(bw, gzip.BestSpeed)
	w.w = zw

	for _, d := range []string{"/bin", "/sbin", "/usr", "/usr/bin", "/usr/sbin", "/etc", "/proc", "/sys", "/dev", "/tmp", "/run", "/mnt", "/root", "/lib", "/lib/modules"} {
		w.dir(d)
	}
	if err := w.file(o.Busybox, "/bin/busybox", 0o755); err != nil {
		return err
	}
	w.symlink("/bin/busybox", "/bin/sh")
	for _, b := range o.Binaries {
		// A cgo build would die in the guest with a cryptic "not found".
		if static, err := IsStatic(b.Host); err != nil || !static {
			return fmt.Errorf("initramfs: %s must be a static binary (CGO_ENABLED=0): %v", b.Host, err)
		}
		if err := w.file(b.Host, b.Guest, 0o755); err != nil {
			return err
		}
	}
	libs := map[string]bool{}
	for _, t := range o.Tools {
		if err := w.file(t, t, 0o755); err != nil {
			return err
		}
		ls, err := sharedLibs(t)
		if err != nil {
			return err
		}
		for _, l := range ls {
			libs[l] = true
		}
	}
	var sorted []string
	for l := range libs {
		sorted = append(sorted, l)
	}
	sort.Strings(sorted)
	for _, l := range sorted {
		real, err := filepath.EvalSymlinks(l)
		if err != nil {
			return fmt.Errorf("initramfs: %w", err)
		}
		if err := w.file(real, l, 0o755); err != nil {
			return err
		}
	}
	for _, p := range o.Files {
		if err := w.file(p, p, 0o644); err != nil {
			return err
		}
	}
	if err := w.tree(k.ModRoot, ""); err != nil {
		return err
	}
	if err := w.data("/init", []byte(initScript(k, o)), 0o755); err != nil {
		return err
	}
	if err := w.trailer(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return f.Close()
}

// initScript mounts the pseudo filesystems, runs the command and powers off;
// a kernel panic (panic=-1) or a missing power-off ends QEMU too, because
// it runs with -no-reboot.
func initScript(k *Kernel, o InitramfsOptions) string {
	var b strings.Builder
	b.WriteString(`#!/bin/busybox sh
/bin/busybox --install -s /bin
ln -s /bin/modprobe /sbin/modprobe
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
echo /sbin/modprobe > /proc/sys/kernel/modprobe
# Loopback only (QEMU runs with -nic none): etcd and blockd's replication
# between daemons in the guest.
ip link set lo up
# Real tools (e2fsprogs, util-linux) before busybox's applets of the same name.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp BLOCKD_VM=1
`)
	fmt.Fprintf(&b, "echo \"VMTEST KERNEL $(uname -r) modules=%s\"\n", strings.Join(k.Modules, ","))
	for _, e := range o.Env {
		fmt.Fprintf(&b, "export %s\n", shellQuote(e))
	}
	b.WriteString("cd /tmp\n")
	var q []string
	for _, a := range o.Command {
		q = append(q, shellQuote(a))
	}
	b.WriteString(strings.Join(q, " ") + " </dev/null 2>&1\n")
	b.WriteString("echo \"VMTEST EXIT $?\"\nsync\npoweroff -f\n")
	return b.String()
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// sharedLibs lists the libraries and loader ldd reports for a program.
func sharedLibs(prog string) ([]string, error) {
	out, err := exec.Command("ldd", prog).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", prog, err)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				libs = append(libs, f)
			}
		}
	}
	return libs, nil
}

// cpioWriter writes the "newc" format the kernel unpacks (see
// Documentation/driver-api/early-userspace/buffer-format.rst).
type cpioWriter struct {
	w    io.Writer
	ino  uint32
	seen map[string]bool
	err  error
}

func (c *cpioWriter) header(name string, mode uint32, size int) {
	if c.err != nil {
		return
	}
	c.ino++
	name = strings.TrimPrefix(name, "/")
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	buf := append([]byte(hdr), name...)
	buf = append(buf, 0)
	buf = append(buf, make([]byte, pad4(len(buf)))...)
	_, c.err = c.w.Write(buf)
}

func pad4(n int) int { return (4 - n%4) % 4 }

// parents emits directory entries for every missing ancestor of p.
func (c *cpioWriter) parents(p string) {
	d := filepath.Dir(p)
	if d == "/" || d == "." || c.seen[d] {
		return
	}
	c.parents(d)
	c.seen[d] = true
	c.header(d, 0o040755, 0)
}

func (c *cpioWriter) dir(p string) {
	if c.seen[p] {
		return
	}
	c.parents(p)
	c.seen[p] = true
	c.header(p, 0o040755, 0)
}

func (c *cpioWriter) symlink(target, p string) {
	c.parents(p)
	c.seen[p] = true
	c.header(p, 0o120777, len(target))
	c.body([]byte(target))
}

func (c *cpioWriter) body(b []byte) {
	if c.err != nil {
		return
	}
	if _, c.err = c.w.Write(b); c.err != nil {
		return
	}
	_, c.err = c.w.Write(make([]byte, pad4(len(b))))
}

func (c *cpioWriter) data(p string, b []byte, perm uint32) error {
	if c.seen[p] {
		return nil
	}
	c.parents(p)
	c.seen[p] = true
	c.header(p, 0o100000|perm, len(b))
	c.body(b)
	if c.err != nil {
		return fmt.Errorf("initramfs %s: %w", p, c.err)
	}
	return nil
}

func (c *cpioWriter) file(host, guest string, perm uint32) error {
	b, err := os.ReadFile(host)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return c.data(guest, b, perm)
}

// tree copies the host directory root into the guest at prefix.
func (c *cpioWriter) tree(root, prefix string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		g := prefix + "/" + filepath.ToSlash(rel)
		if d.IsDir() {
			c.dir(g)
			return c.err
		}
		return c.file(p, g, 0o644)
	})
}

func (c *cpioWriter) trailer() error {
	c.header("TRAILER!!!", 0, 0)
	return c.err
}

// IsStatic reports whether the ELF program at path needs no dynamic loader.
func IsStatic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}
