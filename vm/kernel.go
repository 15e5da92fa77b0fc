// Package vm boots Debian kernels in QEMU (TCG) with a throw-away
// initramfs, so kernel-facing code (nbd, ublk, block-layer eBPF) is tested in
// a real kernel on hosts that cannot load modules.
//
// The flow is Fetch (apt-get download + dpkg -x, cached), BuildInitramfs
// (busybox, static Go binaries, a few dynamic tools with their libraries,
// the kernel's modules), Boot (qemu, console streamed, hard timeout, verdict
// from the guest's output). cmd/vmrun wires these for `make test-kernel`.
package vm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// KernelAliases maps the short names used by `make test-kernel` to Debian
// meta-packages; apt resolves each to the newest concrete image package.
var KernelAliases = map[string]string{
	"6.12": "linux-image-6.12-amd64",
	"6.1":  "linux-image-amd64", // bookworm's default kernel
}

// DefaultModules are staged into every initramfs when the kernel has them
// as modules (a missing or built-in one is skipped): the NBD and ublk
// drivers, loop, ext4 with the crc32c providers its metadata checksums
// ask for through the crypto API, and xfs (the CSI driver formats both).
var DefaultModules = []string{"nbd", "ublk_drv", "loop", "ext4", "xfs", "crc32c_generic", "crc32c_intel"}

// Kernel is an unpacked kernel ready to boot.
type Kernel struct {
	Alias   string // as asked for, e.g. "6.12"
	Package string // concrete Debian package
	Release string // uname -r in the guest
	Vmlinuz string
	// ModRoot holds lib/modules/<Release> with only the staged modules
	// and a modules.dep generated for them.
	ModRoot string
	// Modules are the staged module names (deps included).
	Modules []string
}

// Logf receives progress messages.
type Logf func(format string, args ...any)

// Fetch returns the kernel for alias (a KernelAliases key or a concrete
// package name), downloading and unpacking it under cacheDir on first use.
// A second call with the same inputs touches no network.
func Fetch(ctx context.Context, cacheDir, alias string, modules []string, logf Logf) (*Kernel, error) {
	debs := filepath.Join(cacheDir, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return nil, fmt.Errorf("fetch kernel %s: %w", alias, err)
	}
	pkg, err := resolve(ctx, alias, debs)
	if err != nil {
		return nil, fmt.Errorf("fetch kernel %s: %w", alias, err)
	}
	deb, err := download(ctx, debs, pkg, logf)
	if err != nil {
		return nil, fmt.Errorf("fetch kernel %s: %w", alias, err)
	}
	k, err := stage(ctx, cacheDir, deb, modules, logf)
	if err != nil {
		return nil, fmt.Errorf("fetch kernel %s: %w", alias, err)
	}
	k.Alias, k.Package = alias, pkg
	return k, nil
}

// resolve turns an alias into a concrete linux-image package. When apt has
// no answer (offline, lists cleaned) the newest cached .deb for it is used.
func resolve(ctx context.Context, alias, debs string) (string, error) {
	meta, ok := KernelAliases[alias]
	if !ok {
		return alias, nil
	}
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", meta).Output()
	if err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
				return f[1], nil
			}
		}
	}
	prefix := "linux-image-" + alias + "."
	if alias == "6.1" {
		prefix = "linux-image-6.1.0-"
	}
	cached, _ := filepath.Glob(filepath.Join(debs, prefix+"*-amd64_*.deb"))
	if len(cached) > 0 {
		sort.Strings(cached)
		return strings.SplitN(filepath.Base(cached[len(cached)-1]), "_", 2)[0], nil
	}
	return "", fmt.Errorf("resolve %s: apt-cache depends %s: %v", alias, meta, err)
}

func download(ctx context.Context, debs, pkg string, logf Logf) (string, error) {
	if m, _ := filepath.Glob(filepath.Join(debs, pkg+"_*.deb")); len(m) > 0 {
		sort.Strings(m)
		return m[len(m)-1], nil
	}
	logf("downloading %s", pkg)
	cmd := exec.CommandContext(ctx, "apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", pkg)
	cmd.Dir = debs
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s: %w: %s", pkg, err, bytes.TrimSpace(out))
	}
	m, _ := filepath.Glob(filepath.Join(debs, pkg+"_*.deb"))
	if len(m) == 0 {
		return "", fmt.Errorf("apt-get download %s: no .deb appeared in %s", pkg, debs)
	}
	sort.Strings(m)
	return m[len(m)-1], nil
}

// stage unpacks deb once and keeps vmlinuz plus the closure of modules
// under cacheDir/kernels/<deb>-<hash of module list>.
func stage(ctx context.Context, cacheDir, deb string, modules []string, logf Logf) (*Kernel, error) {
	h := sha256.Sum256([]byte(strings.Join(modules, ",")))
	dir := filepath.Join(cacheDir, "kernels", strings.TrimSuffix(filepath.Base(deb), ".deb")+"-"+hex.EncodeToString(h[:4]))
	done := filepath.Join(dir, "staged")
	if b, err := os.ReadFile(done); err == nil {
		return parseStaged(dir, b)
	}
	logf("unpacking %s", filepath.Base(deb))
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	tmp := dir + ".unpack"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, tmp).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("dpkg-deb -x %s: %w: %s", deb, err, out)
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(tmp, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return nil, fmt.Errorf("%s: want one boot/vmlinuz-*, found %d", deb, len(vmlinuz))
	}
	rel := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	// Debian generates modules.dep at install time; do it for the whole
	// tree once to learn each wanted module's dependencies.
	if out, err := exec.CommandContext(ctx, "depmod", "-b", tmp, rel).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("depmod %s: %w: %s", rel, err, out)
	}
	src := filepath.Join(tmp, "lib", "modules", rel)
	deps, err := readDeps(filepath.Join(src, "modules.dep"))
	if err != nil {
		return nil, err
	}
	files := map[string]bool{}
	for _, m := range modules {
		path, ok := deps.byName[m]
		if !ok {
			logf("kernel %s: no module %s (built in or absent), skipped", rel, m)
			continue
		}
		files[path] = true
		for _, d := range deps.deps[path] {
			files[d] = true
		}
	}
	modDir := filepath.Join(dir, "modroot", "lib", "modules", rel)
	for f := range files {
		if err := copyFile(filepath.Join(src, f), filepath.Join(modDir, f)); err != nil {
			return nil, err
		}
	}
	for _, f := range []string{"modules.builtin", "modules.builtin.modinfo", "modules.order"} {
		if err := copyFile(filepath.Join(src, f), filepath.Join(modDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	if out, err := exec.CommandContext(ctx, "depmod", "-b", filepath.Join(dir, "modroot"), rel).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("depmod staged %s: %w: %s", rel, err, out)
	}
	if err := copyFile(vmlinuz[0], filepath.Join(dir, "vmlinuz")); err != nil {
		return nil, err
	}
	var names []string
	for f := range files {
		names = append(names, moduleName(f))
	}
	sort.Strings(names)
	rec := rel + "\n" + strings.Join(names, " ") + "\n"
	if err := os.WriteFile(done, []byte(rec), 0o644); err != nil {
		return nil, err
	}
	return parseStaged(dir, []byte(rec))
}

func parseStaged(dir string, b []byte) (*Kernel, error) {
	lines := strings.SplitN(string(b), "\n", 3)
	if len(lines) < 2 || lines[0] == "" {
		return nil, fmt.Errorf("%s: corrupt staged record", dir)
	}
	return &Kernel{
		Release: lines[0],
		Vmlinuz: filepath.Join(dir, "vmlinuz"),
		ModRoot: filepath.Join(dir, "modroot"),
		Modules: strings.Fields(lines[1]),
	}, nil
}

type depTable struct {
	byName map[string]string   // module name -> relative path
	deps   map[string][]string // relative path -> dependency paths
}

func readDeps(path string) (depTable, error) {
	t := depTable{byName: map[string]string{}, deps: map[string][]string{}}
	f, err := os.Open(path)
	if err != nil {
		return t, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		mod, rest, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		t.byName[moduleName(mod)] = mod
		t.deps[mod] = strings.Fields(rest)
	}
	return t, s.Err()
}

// moduleName maps kernel/fs/ext4/ext4.ko.xz to ext4 and crc32c-intel to
// crc32c_intel, as the kernel names modules.
func moduleName(path string) string {
	b := filepath.Base(path)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}
