// Command nbdbench runs the fio nbd-engine job matrix against blockd (a
// memory volume and a file volume) and its peers (nbdkit memory, qemu-nbd
// on tmpfs, go-nbd memory), and with fio's io_uring engine against a file
// beside the file volume (the disk's ceiling); it prints markdown tables
// and writes the raw results as JSON and a chart as SVG. `make bench` runs
// it; every flag has a BENCH_* environment default so make can pass them.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/blockd/blockd/bench"
)

func main() {
	os.Exit(run())
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// parseSeconds accepts "10" (seconds) or a Go duration ("1500ms").
func parseSeconds(s string) (time.Duration, error) {
	if n, err := strconv.ParseFloat(s, 64); err == nil {
		return time.Duration(n * float64(time.Second)), nil
	}
	return time.ParseDuration(s)
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		m      int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"G", 1 << 30}, {"M", 1 << 20}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.m
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

func run() int {
	var (
		runtimeS  = flag.String("runtime", env("BENCH_RUNTIME", "10"), "measured seconds per row (env BENCH_RUNTIME)")
		rampS     = flag.String("ramp", env("BENCH_RAMP", "2"), "ramp seconds per row, not measured (env BENCH_RAMP)")
		rows      = flag.String("rows", env("BENCH_ROWS", "all"), "comma-separated rows (env BENCH_ROWS): "+rowNames())
		servers   = flag.String("servers", env("BENCH_SERVERS", "blockd,blockd-file,disk,nbdkit,qemu-nbd,go-nbd"), "comma-separated servers (env BENCH_SERVERS): "+serverNames)
		conns     = flag.Int("conns", atoi(env("BENCH_CONNS", "2")), "NBD connections (fio jobs) per row with QD>1 (env BENCH_CONNS)")
		sizeS     = flag.String("size", env("BENCH_SIZE", "1GiB"), "export size (env BENCH_SIZE)")
		repeat    = flag.Int("repeat", atoi(env("BENCH_REPEAT", "1")), "repetitions of the whole matrix; cells report the median (env BENCH_REPEAT)")
		prefill   = flag.Bool("prefill", env("BENCH_PREFILL", "1") != "0", "write every export once before reading (env BENCH_PREFILL=0 disables)")
		blockdBin = flag.String("blockd", env("BENCH_BLOCKD", "bin/blockd"), "blockd binary")
		gonbdBin  = flag.String("gonbd", env("BENCH_GONBD", "bin/nbdbench-gonbd"), "bench/gonbd binary")
		profile   = flag.String("blockd-profile", env("BENCH_BLOCKD_PROFILE", ""), "io_profile of blockd's volume; empty = daemon default (env BENCH_BLOCKD_PROFILE)")
		fileProf  = flag.String("file-profile", env("BENCH_FILE_PROFILE", "none"), "io_profile of blockd-file's volume (env BENCH_FILE_PROFILE)")
		fileDir   = flag.String("file-dir", env("BENCH_FILE_DIR", ""), "directory on a disk for blockd-file's state dir and disk's file; default: the work directory (env BENCH_FILE_DIR)")
		shm       = flag.String("qemu-dir", env("BENCH_QEMU_DIR", "/dev/shm"), "directory (tmpfs) for qemu-nbd's image")
		out       = flag.String("out", env("BENCH_OUT", "bench/results"), "directory for the JSON report")
		workDir   = flag.String("workdir", env("BENCH_WORKDIR", ""), "directory for logs and fio output (default: temporary, removed on success)")
	)
	flag.Parse()

	rt, err := parseSeconds(*runtimeS)
	if err != nil || rt <= 0 {
		fmt.Fprintf(os.Stderr, "nbdbench: bad runtime %q\n", *runtimeS)
		return 2
	}
	ramp, err := parseSeconds(*rampS)
	if err != nil || ramp < 0 {
		fmt.Fprintf(os.Stderr, "nbdbench: bad ramp %q\n", *rampS)
		return 2
	}
	size, err := parseSize(*sizeS)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbdbench: %v\n", err)
		return 2
	}
	sel, err := bench.SelectRows(*rows)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbdbench: %v (rows: %s)\n", err, rowNames())
		return 2
	}
	dir := *workDir
	keep := dir != ""
	if dir == "" {
		if dir, err = os.MkdirTemp("", "nbdbench-"); err != nil {
			fmt.Fprintf(os.Stderr, "nbdbench: %v\n", err)
			return 1
		}
	}
	// The file volume and the disk ceiling share a directory, so the
	// ceiling is the disk under that volume.
	fdir := *fileDir
	if fdir == "" {
		fdir = dir
	}

	all := map[string]bench.Server{}
	for _, s := range []bench.Server{
		bench.Blockd{Bin: *blockdBin, Profile: *profile},
		bench.Blockd{Bin: *blockdBin, Label: "blockd-file", Engine: "file", Profile: *fileProf, Dir: fdir},
		bench.Blockd{Bin: *blockdBin, Label: "blockd-file-syscalls", Engine: "file", Profile: *fileProf, Dir: fdir,
			Env: []string{"BLOCKD_IO_URING=0"}},
		bench.Disk{Dir: fdir},
		bench.Nbdkit{},
		bench.Nbdkit{Allocator: "malloc"},
		bench.QemuNBD{TmpDir: *shm},
		bench.QemuNBD{TmpDir: *shm, AIO: "io_uring"},
		bench.GoNBD{Bin: *gonbdBin},
	} {
		all[s.Name()] = s
	}
	var srv []bench.Server
	for _, n := range strings.Split(*servers, ",") {
		s, ok := all[strings.TrimSpace(n)]
		if !ok {
			fmt.Fprintf(os.Stderr, "nbdbench: unknown server %q (%s)\n", n, serverNames)
			return 2
		}
		srv = append(srv, s)
	}

	var pairs []bench.Pair
	for _, p := range []bench.Pair{{A: "blockd-file", B: "blockd"}, {A: "blockd-file", B: "disk"},
		{A: "blockd-file", B: "blockd-file-syscalls"}} {
		if slices.ContainsFunc(srv, func(s bench.Server) bool { return s.Name() == p.A }) &&
			slices.ContainsFunc(srv, func(s bench.Server) bool { return s.Name() == p.B }) {
			pairs = append(pairs, p)
		}
	}

	// SIGINT/SIGTERM cancel the context; Runner.Run then stops every server
	// it started before returning. Servers also get SIGKILL from the kernel
	// (Pdeathsig) if this process is killed outright.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	r := &bench.Runner{
		Servers: srv, Rows: sel, Conns: *conns, Runtime: rt, Ramp: ramp, Size: size,
		Prefill: *prefill, Repeat: *repeat, Dir: dir, Primary: "blockd", Pairs: pairs, Progress: os.Stderr,
	}
	fmt.Fprintf(os.Stderr, "nbdbench: %d rows × %d servers, runtime %v + ramp %v, export %s, up to %d conns; logs in %s\n",
		len(sel), len(srv), rt, ramp, bench.SizeString(size), *conns, dir)
	rep, runErr := r.Run(ctx)

	fmt.Println()
	_ = rep.WriteMarkdown(os.Stdout)
	path, err := rep.Save(*out)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nbdbench: %v\n", err)
		return 1
	}
	fmt.Printf("\nraw results: %s\n", path)
	if path, err = rep.SaveSVG(*out); err != nil {
		fmt.Fprintf(os.Stderr, "nbdbench: %v\n", err)
		return 1
	}
	fmt.Printf("chart: %s (and latest.svg beside it)\n", path)
	if runErr != nil {
		fmt.Fprintf(os.Stderr, "nbdbench: %v\nlogs kept in %s\n", runErr, dir)
		return 1
	}
	if !keep {
		os.RemoveAll(dir)
	}
	return 0
}

const serverNames = "blockd, blockd-file, blockd-file-syscalls, disk, nbdkit, nbdkit-malloc, qemu-nbd, qemu-nbd-io_uring, go-nbd"

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0
	}
	return n
}

func rowNames() string {
	var n []string
	for _, r := range bench.DefaultRows {
		n = append(n, r.Name)
	}
	return strings.Join(n, ",")
}
