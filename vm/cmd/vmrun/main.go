// Command vmrun boots each kernel of a matrix in QEMU with an initramfs
// holding the given binaries, runs a guest command (normally a Go test
// binary with -test.v) and exits non-zero unless every kernel passed.
//
//	vmrun -kernels 6.12,6.1 -bin bin/vm/kernel.test -run TestNBD -- /usr/bin/kernel.test -test.v
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/blockd/blockd/vm"
)

type binList []vm.Binary

func (b *binList) String() string { return fmt.Sprint(*b) }

// Set takes host[:guest]; the guest path defaults to /usr/bin/<base>.
func (b *binList) Set(s string) error {
	host, guest, ok := strings.Cut(s, ":")
	if !ok {
		guest = "/usr/bin/" + filepath.Base(host)
	}
	*b = append(*b, vm.Binary{Host: host, Guest: guest})
	return nil
}

func main() {
	home, _ := os.UserHomeDir()
	var bins binList
	kernels := flag.String("kernels", "6.12,6.1", "kernels to boot: aliases ("+aliases()+") or linux-image package names, comma or space separated")
	cache := flag.String("cache", filepath.Join(home, ".cache", "blockd-vm"), "download and unpack cache")
	work := flag.String("work", "bin/vm", "directory for initramfs images and console logs")
	run := flag.String("run", "", "only tests matching this regexp (passed as -test.run)")
	timeout := flag.Duration("timeout", 5*time.Minute, "hard limit per kernel boot")
	mem := flag.Int("m", 1024, "guest memory in MiB")
	smp := flag.Int("smp", 2, "guest CPUs")
	appendArgs := flag.String("append", "", "extra kernel command line")
	tools := flag.String("tools", "/sbin/mke2fs,/sbin/e2fsck,/usr/sbin/blkdiscard,/usr/bin/etcd", "dynamic host tools copied with their libraries (missing ones are left out)")
	modules := flag.String("modules", strings.Join(vm.DefaultModules, ","), "kernel modules to stage (with dependencies)")
	flag.Var(&bins, "bin", "static binary host[:guest] to include (repeatable)")
	flag.Parse()
	command := flag.Args()
	if len(command) == 0 {
		fmt.Fprintln(os.Stderr, "vmrun: no guest command (after --)")
		os.Exit(2)
	}
	if *run != "" {
		command = append(command, "-test.run="+*run)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(*work, 0o755); err != nil {
		fatal(err)
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "vmrun: "+format+"\n", args...) }

	type row struct {
		alias string
		res   vm.Result
		err   error
	}
	var rows []row
	for _, alias := range strings.FieldsFunc(*kernels, func(r rune) bool { return r == ',' || r == ' ' }) {
		res, err := one(ctx, alias, *cache, *work, split(*modules), split(*tools), bins, command,
			vm.BootOptions{MemMiB: *mem, CPUs: *smp, Timeout: *timeout, Append: *appendArgs}, logf)
		rows = append(rows, row{alias, res, err})
		if ctx.Err() != nil {
			break
		}
	}

	failed := false
	fmt.Println("\nvmrun summary:")
	for _, r := range rows {
		verdict := "PASS"
		if r.err != nil || !r.res.OK() {
			verdict, failed = "FAIL", true
		}
		fmt.Printf("  %s kernel %-5s %-24s pass=%d fail=%d skip=%d exit=%d boot+tests=%.1fs",
			verdict, r.alias, r.res.Release, len(r.res.Passed), len(r.res.Failed), len(r.res.Skipped), r.res.ExitCode, r.res.Elapsed.Seconds())
		if len(r.res.Failed) > 0 {
			fmt.Printf(" failed=%s", strings.Join(r.res.Failed, ","))
		}
		if r.res.Panic {
			fmt.Print(" (kernel panic)")
		}
		if r.err != nil {
			fmt.Printf(" error: %v", r.err)
		}
		fmt.Println()
	}
	if failed || len(rows) == 0 {
		os.Exit(1)
	}
}

// one fetches, builds and boots one kernel; boot carries the QEMU settings.
func one(ctx context.Context, alias, cache, work string, modules, tools []string, bins []vm.Binary, command []string, boot vm.BootOptions, logf func(string, ...any)) (vm.Result, error) {
	k, err := vm.Fetch(ctx, cache, alias, modules, logf)
	if err != nil {
		return vm.Result{ExitCode: -1}, err
	}
	var have []string
	for _, t := range tools {
		if _, err := os.Stat(t); err == nil {
			have = append(have, t)
		} else {
			logf("tool %s not on host, left out", t)
		}
	}
	initrd := filepath.Join(work, "initrd-"+alias+".gz")
	bb, err := busybox()
	if err != nil {
		return vm.Result{ExitCode: -1}, err
	}
	if err := vm.BuildInitramfs(initrd, k, vm.InitramfsOptions{
		Busybox:  bb,
		Binaries: bins,
		Tools:    have,
		Files:    existing("/etc/mke2fs.conf"),
		Command:  command,
	}); err != nil {
		return vm.Result{ExitCode: -1}, err
	}
	logPath := filepath.Join(work, "console-"+alias+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return vm.Result{ExitCode: -1}, err
	}
	defer lf.Close()
	logf("booting %s (%s, release %s), console log %s", alias, k.Package, k.Release, logPath)
	boot.Kernel, boot.Initrd = k, initrd
	boot.Console = io.MultiWriter(os.Stdout, lf)
	// A panic before init ran is TCG's doing, not the tests' (see
	// vm.Result.BootPanic): boot again, at most twice. A panic once the
	// tests run stays a failure.
	for attempt := 1; ; attempt++ {
		res, err := vm.Boot(ctx, boot)
		if !res.BootPanic() || attempt == 3 || ctx.Err() != nil {
			return res, err
		}
		logf("%s panicked while booting, before any test ran (attempt %d of 3); booting again", alias, attempt)
	}
}

// busybox finds a static busybox (Debian's busybox-static installs it as
// /bin/busybox; the dynamic busybox package would not run in the guest).
func busybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if _, err := os.Stat(p); err == nil {
			if static, _ := vm.IsStatic(p); static {
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("no static busybox found: apt-get install busybox-static")
}

func existing(paths ...string) []string {
	var out []string
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func split(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' })
}

func aliases() string {
	var a []string
	for k := range vm.KernelAliases {
		a = append(a, k)
	}
	return strings.Join(a, ", ")
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "vmrun:", err)
	os.Exit(1)
}
