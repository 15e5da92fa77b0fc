package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Proc is a server process started for a benchmark. It runs in its own
// process group so that Stop also ends anything it forked, and it gets
// SIGKILL if the benchmark driver dies without calling Stop.
type Proc struct {
	Name string
	Argv []string
	// Log is the file holding the process's stdout and stderr.
	Log string

	cmd  *exec.Cmd
	done chan struct{} // closed when the process has been waited for
	err  error         // exit status; read only after done is closed
}

// StartProc starts argv with stdout and stderr appended to logPath.
func StartProc(name, logPath string, argv ...string) (*Proc, error) {
	if len(argv) == 0 {
		return nil, errors.New("start: empty command")
	}
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Argv: argv, Log: logPath, cmd: cmd, done: make(chan struct{})}
	// The waiter goroutine is owned by p; it exits when the process does,
	// which Stop guarantees.
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

// Pid returns the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited is closed once the process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.done }

// Stop sends SIGTERM to the process group, waits up to grace for the
// process to exit, then kills the group. It returns once the process has
// been reaped. Calling Stop again is harmless.
func (p *Proc) Stop(grace time.Duration) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
	// Children that ignored SIGTERM and outlived the leader.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return nil
}

// clockTick is USER_HZ, the unit of the CPU times in /proc/PID/stat; it is
// 100 on every Linux architecture Go supports.
const clockTick = 10 * time.Millisecond

// CPUTime returns the user plus system CPU time the process (all its
// threads) has used so far.
func (p *Proc) CPUTime() (time.Duration, error) {
	return procCPUTime(p.Pid())
}

func procCPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return parseStatCPU(string(b))
}

// parseStatCPU reads utime and stime (fields 14 and 15) from a
// /proc/PID/stat line. The command name (field 2) may contain spaces and
// parentheses, so fields are counted from the last ')'.
func parseStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("cpu time: malformed stat")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return 0, errors.New("cpu time: short stat")
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("cpu time: malformed stat")
	}
	return time.Duration(utime+stime) * clockTick, nil
}

// LogTail returns the last n lines of the process log, for error messages.
func (p *Proc) LogTail(n int) string {
	b, err := os.ReadFile(p.Log)
	if err != nil {
		return ""
	}
	return lastLines(string(b), n)
}

// exitError describes why p is no longer running.
func (p *Proc) exitError() error {
	return fmt.Errorf("%s exited (%v): %s", p.Name, p.err, strings.TrimSpace(p.LogTail(10)))
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// WaitNBD waits until addr answers with the NBD server greeting
// ("NBDMAGIC"), p exits, or ctx ends.
func WaitNBD(ctx context.Context, addr string, p *Proc) error {
	var last error
	for {
		if err := probeNBD(addr); err == nil {
			return nil
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for nbd server on %s: %w (last: %v)", addr, ctx.Err(), last)
		case <-p.Exited():
			return p.exitError()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func probeNBD(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	// Greeting: "NBDMAGIC", "IHAVEOPT", 16-bit handshake flags.
	var greet [18]byte
	if _, err := io.ReadFull(c, greet[:]); err != nil {
		return err
	}
	if string(greet[:8]) != "NBDMAGIC" {
		return fmt.Errorf("no nbd greeting: %q", greet[:8])
	}
	// Leave politely (client flags FIXED_NEWSTYLE, then NBD_OPT_ABORT) so
	// servers do not log a reset connection for every probe.
	var bye [4 + 16]byte
	binary.BigEndian.PutUint32(bye[0:], 1)
	copy(bye[4:], "IHAVEOPT")
	binary.BigEndian.PutUint32(bye[12:], 2) // NBD_OPT_ABORT, length 0
	if _, err := c.Write(bye[:]); err == nil {
		var reply [20]byte
		_, _ = io.ReadFull(c, reply[:])
	}
	return nil
}

// waitUnix waits until a unix socket at path accepts connections.
func waitUnix(ctx context.Context, path string, p *Proc) error {
	for {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last: %v)", path, ctx.Err(), err)
		case <-p.Exited():
			return p.exitError()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// SizeString formats n bytes the way the blockd CLI and most tools accept
// it: "1GiB", "512MiB", or plain bytes.
func SizeString(n int64) string {
	switch {
	case n > 0 && n%(1<<30) == 0:
		return strconv.FormatInt(n>>30, 10) + "GiB"
	case n > 0 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "MiB"
	}
	return strconv.FormatInt(n, 10)
}
