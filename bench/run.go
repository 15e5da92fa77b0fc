// Package bench runs the same fio job matrix (fio's nbd engine over TCP on
// 127.0.0.1) against blockd and against peer NBD servers, and reports the
// results as a markdown table and as JSON.
//
// The pieces are usable alone by other benchmarks (QoS, io profiles): a
// Server starts one NBD server and returns an Instance with its URI; Fio
// runs a Job against a URI and parses fio's JSON into Metrics; Report holds
// Results and prints them. Runner ties them together for `make bench`:
// one fio runs at a time, so servers never compete with each other for the
// machine's CPUs.
package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Runner runs Rows against Servers.
//
// All servers are started (and prefilled) first and stay up for the whole
// run; the rows then run server after server, one fio at a time, with the
// server order rotated from row to row. On a shared machine the background
// load drifts over minutes, and interleaving spreads that drift over every
// server instead of charging it to whichever ran last. An idle server costs
// next to no CPU.
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
	// Prefill writes every export once before the rows run.
	Prefill bool
	// Repeat runs the whole matrix this many times (at least once); each
	// cell reports the repetition with the median IOPS.
	Repeat int
	// Dir holds the server logs and fio output.
	Dir string
	// Primary is the server the ratio column compares with its best peer.
	Primary string
	// Pairs are further ratio columns, server A over server B (blockd's
	// file volume over its memory volume, over the disk).
	Pairs []Pair
	// Progress receives one line per step; nil discards.
	Progress io.Writer
}

func (r *Runner) logf(format string, args ...any) {
	if r.Progress != nil {
		fmt.Fprintf(r.Progress, format+"\n", args...)
	}
}

// live is a started server during a run.
type live struct {
	s   Server
	in  *Instance
	f   Fio
	err error // set once the server failed; it is skipped from then on
}

// sample is one fio run of one row against one server.
type sample struct {
	m   Metrics
	raw []byte
}

// Run runs the matrix. Every server is stopped before Run returns, also
// when ctx is cancelled. The report is returned even when some cells
// failed; the error then lists the failures. A server whose binary is not
// built (ErrNotBuilt) is recorded in Report.Skipped and is not an error.
func (r *Runner) Run(ctx context.Context) (*Report, error) {
	rep := &Report{
		Started: time.Now().UTC(),
		Primary: r.Primary,
		Pairs:   r.Pairs,
		Rows:    r.Rows,
		Skipped: map[string]string{},
		Roles:   map[string]string{},
		Host:    hostInfo(),
	}
	for _, s := range r.Servers {
		rep.Servers = append(rep.Servers, s.Name())
		if ro, ok := s.(Roled); ok && s.Name() != r.Primary {
			rep.Roles[s.Name()] = ro.Role()
		}
	}
	var failures []string
	fail := func(l *live, row string, err error) {
		failures = append(failures, fmt.Sprintf("%s %s: %v", l.s.Name(), row, err))
		r.logf("   %s %s FAILED: %v", l.s.Name(), row, err)
	}

	var lives []*live
	defer func() {
		for i := len(lives) - 1; i >= 0; i-- {
			if lives[i].in != nil {
				lives[i].in.Stop()
			}
		}
	}()
	for _, s := range r.Servers {
		if ctx.Err() != nil {
			break
		}
		l := &live{s: s}
		dir := filepath.Join(r.Dir, s.Name())
		l.f, l.f.Dir = r.Fio, dir
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return rep, fmt.Errorf("bench: %w", err)
		}
		r.logf("== %s: starting", s.Name())
		in, err := s.Start(ctx, dir, r.Size)
		if errors.Is(err, ErrNotBuilt) {
			rep.Skipped[s.Name()] = err.Error()
			r.logf("SKIP %s: %v", s.Name(), err)
			continue
		}
		lives = append(lives, l)
		if err != nil {
			l.err = fmt.Errorf("start: %w", err)
			fail(l, "start", err)
			continue
		}
		l.in = in
		rep.Instances = append(rep.Instances, *in)
		r.logf("   %s at %s (%s)", s.Name(), in.URI, strings.Join(in.Cmdline, " "))
		if r.Prefill {
			t := time.Now()
			m, err := l.f.Prefill(ctx, in.URI, "")
			if err != nil {
				l.err = fmt.Errorf("prefill: %w", err)
				fail(l, "prefill", err)
				continue
			}
			r.logf("   prefill: %.0f MiB/s, %.1fs", m.MiBps, time.Since(t).Seconds())
		}
	}

	repeat := max(r.Repeat, 1)
	samples := map[[2]string][]sample{}
	jobs := map[string]Job{}
	for i := 0; i < repeat && ctx.Err() == nil; i++ {
		if repeat > 1 {
			r.logf("== repetition %d/%d", i+1, repeat)
		}
		for ri, row := range r.Rows {
			job := MakeJob(row, r.Conns, r.Runtime, r.Ramp, r.Size)
			jobs[row.Name] = job
			for k := range lives {
				if ctx.Err() != nil {
					break
				}
				l := lives[(k+ri+i)%len(lives)]
				if l.err != nil {
					continue
				}
				tag := ""
				if repeat > 1 {
					tag = fmt.Sprintf("r%d", i+1)
				}
				cpu0, cpuErr := l.in.CPUTime()
				t0 := time.Now()
				m, raw, err := l.f.Run(ctx, l.in.URI, job, tag)
				wall := time.Since(t0)
				cpu1, cpuErr1 := l.in.CPUTime()
				if err == nil {
					err = l.in.Alive()
				}
				if err == nil && cpuErr == nil && cpuErr1 == nil {
					// The wall time includes fio's ramp and connection set-up,
					// which the IOPS exclude; the ratio still holds because the
					// server does the same work per request throughout.
					m.ServerCPU = (cpu1 - cpu0).Seconds() / wall.Seconds()
					if m.IOPS > 0 {
						m.ServerCPUPerIO = m.ServerCPU / m.IOPS * 1e6
					}
				}
				if err != nil {
					if aerr := l.in.Alive(); aerr != nil {
						// A dead server fails every later row too.
						l.err = aerr
					}
					fail(l, row.Name, err)
					continue
				}
				key := [2]string{row.Name, l.s.Name()}
				samples[key] = append(samples[key], sample{m, raw})
				r.logf("   %-18s %-17s %2d×%-3d %9s IOPS %8.1f MiB/s  p50 %8.1fµs  p99 %8.1fµs  server %.2f CPU, %.1fµs/IO",
					row.Name, l.s.Name(), job.Jobs, job.IODepth, fmtIOPS(m.IOPS), m.MiBps, m.P50us, m.P99us, m.ServerCPU, m.ServerCPUPerIO)
			}
		}
	}
	if ctx.Err() != nil {
		failures = append(failures, "interrupted: "+ctx.Err().Error())
	}

	for _, row := range r.Rows {
		for _, l := range lives {
			res := Result{Row: row.Name, Server: l.s.Name(), Job: jobs[row.Name]}
			ss := samples[[2]string{row.Name, l.s.Name()}]
			switch {
			case len(ss) > 0:
				med := medianSample(ss)
				res.Metrics, res.Fio = med.m, med.raw
				for _, s := range ss {
					res.Samples = append(res.Samples, s.m.IOPS)
				}
			case l.err != nil:
				res.Err = l.err.Error()
			default:
				res.Err = "no successful run"
			}
			rep.Results = append(rep.Results, res)
		}
	}
	rep.Finished = time.Now().UTC()
	if len(failures) > 0 {
		return rep, fmt.Errorf("bench: %d failure(s):\n  %s", len(failures), strings.Join(failures, "\n  "))
	}
	return rep, nil
}

// medianSample returns the sample with the median IOPS (the lower middle
// one for an even count), so that its latencies come from the same run.
func medianSample(ss []sample) sample {
	sorted := slices.Clone(ss)
	slices.SortFunc(sorted, func(a, b sample) int { return cmp.Compare(a.m.IOPS, b.m.IOPS) })
	return sorted[(len(sorted)-1)/2]
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
