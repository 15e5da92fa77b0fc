package module

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func tree(t *testing.T, dep string) (Loader, string) {
	t.Helper()
	rel, err := release()
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	sys := t.TempDir()
	if dep != "" {
		dir := filepath.Join(root, rel)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		// depmod always writes these three; kmod reads all of them.
		for name, data := range map[string]string{"modules.dep": dep, "modules.alias": "", "modules.builtin": ""} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return Loader{Root: root, SysModule: sys}, rel
}

func TestLoadNoTreeNamesModuleAndKernel(t *testing.T) {
	l, rel := tree(t, "")
	err := l.Load("nbd")
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	for _, want := range []string{"load module nbd", rel} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestLoadModuleMissingFromTree(t *testing.T) {
	l, rel := tree(t, "kernel/drivers/block/loop.ko.xz:\n")
	err := l.Load("ublk-drv")
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	for _, want := range []string{"load module ublk_drv", rel} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestLoadAlreadyLiveIsNoop(t *testing.T) {
	// No module tree at all: only the /sys/module entry can make this pass.
	l, _ := tree(t, "")
	if err := os.Mkdir(filepath.Join(l.SysModule, "ublk_drv"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := l.Load("ublk-drv"); err != nil {
		t.Fatalf("Load of a live module: %v", err)
	}
}
