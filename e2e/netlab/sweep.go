package netlab

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

var (
	// processStart is when this process started (near enough: package
	// initialisation). Only namespaces older than it are swept.
	processStart = time.Now()
	sweepOnce    sync.Once

	nsPattern   = regexp.MustCompile(`^(` + namePrefix + `[0-9a-f]{4})-(sw|[0-9]+)$`)
	lockPattern = regexp.MustCompile(`^(` + namePrefix + `[0-9a-f]{4})\.lock$`)
)

// sweep deletes labs left by runs that were killed before their cleanup: a
// lab is stale when no live process holds its lock and its namespaces and
// lock file are older than before. Failures are logged, not fatal: a new
// lab never needs the old names.
func sweep(logf func(string, ...any), ipPath string, before time.Time) {
	byPrefix := map[string][]string{}
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		if m := nsPattern.FindStringSubmatch(e.Name()); m != nil {
			byPrefix[m[1]] = append(byPrefix[m[1]], e.Name())
		}
	}
	locks, _ := os.ReadDir(lockDir)
	for _, e := range locks {
		if m := lockPattern.FindStringSubmatch(e.Name()); m != nil {
			if _, ok := byPrefix[m[1]]; !ok {
				byPrefix[m[1]] = nil
			}
		}
	}
	for prefix, names := range byPrefix {
		if err := sweepLab(logf, ipPath, prefix, names, before); err != nil {
			logf("netlab: sweeping stale lab %s: %v", prefix, err)
		}
	}
}

func sweepLab(logf func(string, ...any), ipPath, prefix string, names []string, before time.Time) error {
	lock, err := os.OpenFile(lockPath(prefix), os.O_RDWR, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		lock = nil
	case err != nil:
		return err
	default:
		defer lock.Close()
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			return nil // held: a live lab
		}
		if st, err := lock.Stat(); err != nil || !st.ModTime().Before(before) {
			return nil // being created right now, or unreadable
		}
	}
	var del []string
	for _, name := range names {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(netnsDir, name), &st); err != nil {
			continue
		}
		if !time.Unix(st.Mtim.Unix()).Before(before) {
			return nil // younger than this process: not a leftover of an earlier run
		}
		del = append(del, "netns del "+name)
	}
	var errs []error
	for _, name := range names {
		killed, err := killIn(name)
		errs = append(errs, err)
		for _, p := range killed {
			logf("netlab: killed pid %d (%s) left running in stale %s", p.pid, p.comm, name)
		}
	}
	if len(del) > 0 {
		errs = append(errs, runIP(ipPath, "", true, del...))
		logf("netlab: deleted stale lab %s (%d namespaces) left by an earlier run", prefix, len(del))
	}
	if lock != nil {
		if err := os.Remove(lock.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

type proc struct {
	pid  int
	comm string
}

// killIn SIGKILLs every process whose network namespace is the named one
// (except this process) and waits, at most two seconds, until none is left.
func killIn(name string) ([]proc, error) {
	var nsStat unix.Stat_t
	if err := unix.Stat(filepath.Join(netnsDir, name), &nsStat); err != nil {
		return nil, nil
	}
	var killed []proc
	deadline := time.Now().Add(2 * time.Second)
	for {
		procs := procsIn(nsStat)
		if len(procs) == 0 {
			return killed, nil
		}
		if time.Now().After(deadline) {
			return killed, fmt.Errorf("processes %v still in netns %s after SIGKILL", procs, name)
		}
		for _, p := range procs {
			if !containsPid(killed, p.pid) {
				unix.Kill(p.pid, unix.SIGKILL)
				killed = append(killed, p)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func containsPid(ps []proc, pid int) bool {
	for _, p := range ps {
		if p.pid == pid {
			return true
		}
	}
	return false
}

// procsIn scans /proc for processes whose network namespace is ns (a
// zombie has none and is not listed).
func procsIn(ns unix.Stat_t) []proc {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) != nil {
			continue
		}
		if st.Dev == ns.Dev && st.Ino == ns.Ino {
			comm, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
			out = append(out, proc{pid, strings.TrimSpace(string(comm))})
		}
	}
	return out
}
