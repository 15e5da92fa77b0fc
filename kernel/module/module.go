// Package module loads Linux kernel modules (nbd, ublk_drv) and their
// dependencies from /lib/modules/$(uname -r), the way modprobe would, so the
// daemon can bring up its frontends on a node without shelling out.
//
// Debian 6.12 kernels ship modules as .ko.xz and are built with
// MODULE_DECOMPRESS, so compressed files are handed to finit_module(2) with
// MODULE_INIT_COMPRESSED_FILE and the kernel decompresses them.
package module

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/pmorjan/kmod"
	"golang.org/x/sys/unix"
)

// ErrNotFound reports that the running kernel has no such module (neither
// loaded, built in, nor a file listed in modules.dep).
var ErrNotFound = errors.New("module not found")

// initCompressedFile is MODULE_INIT_COMPRESSED_FILE from
// include/uapi/linux/module.h: the fd holds a compressed module.
const initCompressedFile = 4

// Loader loads modules from one module tree. The zero value is not usable;
// use Load for the running system, or a Loader with explicit paths in tests.
type Loader struct {
	// Root is the modules root, normally /lib/modules.
	Root string
	// SysModule is the sysfs directory of live modules, normally /sys/module.
	SysModule string
}

// Load loads the named module (and what it depends on) into the running
// kernel. It is a no-op when the module is already live or built in
// (/sys/module/<name> exists). Names may use '-' or '_'.
func Load(name string) error {
	l := Loader{Root: "/lib/modules", SysModule: "/sys/module"}
	return l.Load(name)
}

// Loaded reports whether the module is live or built into the running kernel.
func Loaded(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/module", normalize(name)))
	return err == nil
}

// Load loads the named module from l's tree; see the package-level Load.
func (l Loader) Load(name string) error {
	name = normalize(name)
	if _, err := os.Stat(filepath.Join(l.SysModule, name)); err == nil {
		return nil
	}
	// The tree is always the running kernel's: loading a module built for
	// another release would fail anyway.
	rel, err := release()
	if err != nil {
		return fmt.Errorf("load module %s: %w", name, err)
	}
	dir := filepath.Join(l.Root, rel)
	if _, err := os.Stat(filepath.Join(dir, "modules.dep")); err != nil {
		// Without modules.dep there is no module tree for this kernel at
		// all (typical in containers that do not mount /lib/modules).
		return fmt.Errorf("load module %s: %w in %s (kernel %s): %w", name, ErrNotFound, dir, rel, err)
	}
	k, err := kmod.New(
		kmod.SetRootDir(l.Root),
		kmod.SetInitFunc(finit),
		// modprobe.conf options are the node admin's business, not ours.
		kmod.SetConfigFile(filepath.Join(dir, "nonexistent-modprobe.conf")),
	)
	if err != nil {
		return fmt.Errorf("load module %s: kernel %s: %w", name, rel, err)
	}
	if err := k.Load(name, "", 0); err != nil {
		if errors.Is(err, kmod.ErrModuleNotFound) {
			return fmt.Errorf("load module %s: %w in %s (kernel %s)", name, ErrNotFound, dir, rel)
		}
		return fmt.Errorf("load module %s: kernel %s: %w", name, rel, err)
	}
	return nil
}

// finit hands a module file to the kernel; compressed files carry
// MODULE_INIT_COMPRESSED_FILE so the kernel decompresses them itself.
func finit(path, params string, flags int) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	switch filepath.Ext(path) {
	case ".xz", ".zst", ".gz":
		flags |= initCompressedFile
	}
	if err := unix.FinitModule(int(f.Fd()), params, flags); err != nil {
		return fmt.Errorf("finit_module %s: %w", path, err)
	}
	return nil
}

func normalize(name string) string {
	return strings.ReplaceAll(strings.TrimSpace(name), "-", "_")
}

func release() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return string(u.Release[:bytes.IndexByte(u.Release[:], 0)]), nil
}
