package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// BootOptions configure one QEMU run.
type BootOptions struct {
	Kernel  *Kernel
	Initrd  string
	MemMiB  int           // default 1024
	CPUs    int           // default 2
	Timeout time.Duration // hard limit; QEMU is killed after it
	Append  string        // extra kernel command line
	Console io.Writer     // receives the serial console, line by line
	QEMU    string        // default qemu-system-x86_64
}

// Result is the guest's verdict, read from its console.
type Result struct {
	Release  string
	ExitCode int // of the guest command; -1 if it never reported
	Passed   []string
	Failed   []string
	Skipped  []string
	Panic    bool
	TimedOut bool
	Elapsed  time.Duration
}

// OK reports a clean run: the command exited 0, something passed, nothing
// failed, and the kernel neither panicked nor hung.
func (r Result) OK() bool {
	return r.ExitCode == 0 && len(r.Passed) > 0 && len(r.Failed) == 0 && !r.Panic && !r.TimedOut
}

// BootPanic reports a kernel panic before the guest's init ran (it prints
// the VMTEST KERNEL line first): no test started, so the run says nothing
// about the code under test. Under TCG an SMP guest now and then trips
// over its own boot-time code patching (an int3 left in a patched
// instruction); booting again is then the right answer.
func (r Result) BootPanic() bool { return r.Panic && r.Release == "" }

// Go test binaries (-test.v) report tests as "--- PASS: Name (1.23s)";
// subtests are indented.
var testLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+)`)

// Boot runs the kernel with the initramfs and waits for the guest to power
// off, panic, or exceed the timeout.
func Boot(ctx context.Context, o BootOptions) (Result, error) {
	res := Result{ExitCode: -1}
	if o.MemMiB == 0 {
		o.MemMiB = 1024
	}
	if o.CPUs == 0 {
		o.CPUs = 2
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	args := []string{
		"-accel", "tcg", "-cpu", "max",
		"-smp", strconv.Itoa(o.CPUs), "-m", strconv.Itoa(o.MemMiB),
		"-nographic", "-no-reboot", "-nic", "none",
		"-kernel", o.Kernel.Vmlinuz, "-initrd", o.Initrd,
		"-append", strings.TrimSpace("console=ttyS0 quiet panic=-1 " + o.Append),
	}
	cmd := exec.CommandContext(ctx, o.QEMU, args...)
	// Killing QEMU is enough: it has no children, and its stdout pipe
	// closes with it, which ends the reader below.
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.StdoutPipe()
	if err != nil {
		return res, fmt.Errorf("boot: %w", err)
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, fmt.Errorf("boot %s: %w", o.QEMU, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owner: Boot; exits when QEMU's stdout closes
		defer wg.Done()
		s := bufio.NewScanner(out)
		s.Buffer(make([]byte, 64<<10), 1<<20)
		for s.Scan() {
			line := strings.TrimRight(s.Text(), "\r")
			if o.Console != nil {
				fmt.Fprintln(o.Console, line)
			}
			res.parse(line)
		}
	}()
	wg.Wait()
	werr := cmd.Wait()
	res.Elapsed = time.Since(start)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		res.TimedOut = true
		return res, fmt.Errorf("boot %s: killed after %v", o.Kernel.Release, o.Timeout)
	}
	if werr != nil {
		return res, fmt.Errorf("boot %s: qemu: %w", o.Kernel.Release, werr)
	}
	return res, nil
}

func (r *Result) parse(line string) {
	if m := testLine.FindStringSubmatch(line); m != nil {
		switch m[1] {
		case "PASS":
			r.Passed = append(r.Passed, m[2])
		case "FAIL":
			r.Failed = append(r.Failed, m[2])
		case "SKIP":
			r.Skipped = append(r.Skipped, m[2])
		}
		return
	}
	// The markers may follow terminal escapes the firmware left on the
	// same line, so look for them anywhere.
	if _, rest, ok := strings.Cut(line, "VMTEST EXIT "); ok {
		if n, err := strconv.Atoi(strings.TrimSpace(rest)); err == nil {
			r.ExitCode = n
		}
		return
	}
	if _, rest, ok := strings.Cut(line, "VMTEST KERNEL "); ok {
		r.Release, _, _ = strings.Cut(rest, " ")
		return
	}
	if strings.Contains(line, "Kernel panic") {
		r.Panic = true
	}
}
