// Package bench runs the same fio job matrix (fio's nbd engine over TCP on
// 127.0.0.1) against blockd and against peer NBD servers, and reports the
// results as a markdown table and as JSON.
//
// The pieces are usable alone by other benchmarks (QoS, io profiles): a
// Server starts one NBD server and returns an Instance with its URI; Fio
// runs a Job against a URI and parses fio's JSON into Metrics; Report holds
// Results and prints them. Runner ties them together for `make bench`:
// servers run one after another, never side by side, so that they do not
// compete for the machine's CPUs.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Runner runs Rows against Servers.
type Runner struct {
	Fio     Fio
	Servers []Server
	Rows    []Row
	// Conns is the number of NBD connections (fio jobs) a row with a queue
	// depth above one is spread over; see MakeJob.
	Conns   int
	Runtime time.Duration
	Ramp    time.Duration
	// Size is the export size in bytes.
	Size int64
	// Prefill writes every export once before its rows run.
	Prefill bool
	// Dir holds the server logs and fio output.
	Dir string
	// Primary is the server the ratio column compares with its best peer.
	Primary string
	// Progress receives one line per step; nil discards.
	Progress io.Writer
}

func (r *Runner) logf(format string, args ...any) {
	if r.Progress != nil {
		fmt.Fprintf(r.Progress, format+"\n", args...)
	}
}

// Run runs the matrix. Every server is stopped before Run returns, also
// when ctx is cancelled. The report is returned even when some cells
// failed; the error then lists the failures. A server whose binary is not
// built (ErrNotBuilt) is recorded in Report.Skipped and is not an error.
func (r *Runner) Run(ctx context.Context) (*Report, error) {
	rep := &Report{
		Started: time.Now().UTC(),
		Primary: r.Primary,
		Rows:    r.Rows,
		Skipped: map[string]string{},
		Host:    hostInfo(),
	}
	for _, s := range r.Servers {
		rep.Servers = append(rep.Servers, s.Name())
	}
	var failures []string
	for _, s := range r.Servers {
		if ctx.Err() != nil {
			failures = append(failures, "interrupted: "+ctx.Err().Error())
			break
		}
		if err := r.runServer(ctx, s, rep); err != nil {
			if errors.Is(err, ErrNotBuilt) {
				rep.Skipped[s.Name()] = err.Error()
				r.logf("SKIP %s: %v", s.Name(), err)
				continue
			}
			failures = append(failures, err.Error())
		}
	}
	rep.Finished = time.Now().UTC()
	if len(failures) > 0 {
		return rep, fmt.Errorf("bench: %d failure(s):\n  %s", len(failures), strings.Join(failures, "\n  "))
	}
	return rep, nil
}

// runServer starts s, runs every row against it and stops it. Row failures
// are recorded in rep and returned joined.
func (r *Runner) runServer(ctx context.Context, s Server, rep *Report) error {
	dir := filepath.Join(r.Dir, s.Name())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("%s: %w", s.Name(), err)
	}
	r.logf("== %s: starting", s.Name())
	in, err := s.Start(ctx, dir, r.Size)
	if err != nil {
		if errors.Is(err, ErrNotBuilt) {
			return err
		}
		for _, row := range r.Rows {
			rep.Results = append(rep.Results, Result{Row: row.Name, Server: s.Name(), Err: "start: " + err.Error()})
		}
		return fmt.Errorf("%s: start: %w", s.Name(), err)
	}
	defer in.Stop()
	rep.Instances = append(rep.Instances, *in)
	r.logf("   %s at %s (%s)", s.Name(), in.URI, strings.Join(in.Cmdline, " "))
	f := r.Fio
	f.Dir = dir
	if r.Prefill {
		t := time.Now()
		m, err := f.Prefill(ctx, in.URI, "")
		if err != nil {
			for _, row := range r.Rows {
				rep.Results = append(rep.Results, Result{Row: row.Name, Server: s.Name(), Err: "prefill: " + err.Error()})
			}
			return fmt.Errorf("%s: prefill: %w", s.Name(), err)
		}
		r.logf("   prefill: %.0f MiB/s, %.1fs", m.MiBps, time.Since(t).Seconds())
	}
	var errs []error
	for _, row := range r.Rows {
		job := MakeJob(row, r.Conns, r.Runtime, r.Ramp, r.Size)
		res := Result{Row: row.Name, Server: s.Name(), Job: job}
		m, raw, err := f.Run(ctx, in.URI, job, "")
		if err == nil {
			err = in.Alive()
		}
		if err != nil {
			res.Err = err.Error()
			errs = append(errs, fmt.Errorf("%s %s: %w", s.Name(), row.Name, err))
			r.logf("   %-18s FAILED: %v", row.Name, err)
		} else {
			res.Metrics = m
			r.logf("   %-18s %4d×%-3d %9s IOPS %8.1f MiB/s  p50 %7.1fµs  p99 %8.1fµs",
				row.Name, job.Jobs, job.IODepth, fmtIOPS(m.IOPS), m.MiBps, m.P50us, m.P99us)
		}
		res.Fio = raw
		rep.Results = append(rep.Results, res)
		if ctx.Err() != nil {
			break
		}
	}
	return errors.Join(errs...)
}

func hostInfo() Host {
	h := Host{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	h.Hostname, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.Kernel = strings.TrimSpace(string(b))
	}
	h.FioVersion = version("fio", "--version")
	return h
}
