package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ExportName is the export (volume) every server serves.
const ExportName = "bench"

// Server is an NBD server under test.
type Server interface {
	// Name is the column label: blockd, nbdkit, qemu-nbd, go-nbd.
	Name() string
	// Start starts the server with a size-byte export on 127.0.0.1, keeping
	// its files and log in dir, and returns once it answers NBD.
	Start(ctx context.Context, dir string, size int64) (*Instance, error)
}

// Instance is a running server.
type Instance struct {
	Server string `json:"server"`
	// URI is what fio's nbd engine connects to.
	URI     string   `json:"uri"`
	Version string   `json:"version,omitempty"`
	Cmdline []string `json:"cmdline"`
	// Notes say how the server was configured and why.
	Notes string `json:"notes,omitempty"`

	procs   []*Proc
	cleanup []func()
}

// Stop stops every process of the instance (in reverse start order) and
// removes what it created.
func (in *Instance) Stop() {
	for i := len(in.procs) - 1; i >= 0; i-- {
		_ = in.procs[i].Stop(5 * time.Second)
	}
	for i := len(in.cleanup) - 1; i >= 0; i-- {
		in.cleanup[i]()
	}
}

// CPUTime returns the CPU time all processes of the instance have used.
func (in *Instance) CPUTime() (time.Duration, error) {
	var sum time.Duration
	for _, p := range in.procs {
		t, err := p.CPUTime()
		if err != nil {
			return 0, err
		}
		sum += t
	}
	return sum, nil
}

// Alive reports an error if any process of the instance has exited.
func (in *Instance) Alive() error {
	for _, p := range in.procs {
		select {
		case <-p.Exited():
			return p.exitError()
		default:
		}
	}
	return nil
}

// startTimeout bounds how long a server may take to come up.
const startTimeout = 30 * time.Second

// startNBD starts argv, listening on port, and waits for its greeting.
func startNBD(ctx context.Context, in *Instance, dir, name string, port int, argv []string) error {
	p, err := StartProc(name, filepath.Join(dir, name+".log"), argv...)
	if err != nil {
		return err
	}
	in.procs = append(in.procs, p)
	in.Cmdline = argv
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	return WaitNBD(ctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), p)
}

func nbdURI(port int) string {
	return "nbd://127.0.0.1:" + strconv.Itoa(port) + "/" + ExportName
}

// version runs argv and returns the first line of its output.
func version(argv ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

// ErrNotBuilt is returned by Blockd.Start when the blockd binary is
// missing, so that a run can go on with the peers.
var ErrNotBuilt = errors.New("not built")

// Server roles in a report (see Report.Roles). A server that names none
// is a peer.
const (
	// RolePeer is another NBD server: "blockd / best peer" compares the
	// primary with the best of these.
	RolePeer = "peer"
	// RoleBlockd is a blockd configuration other than the primary (a file
	// volume): shown, never counted as a peer.
	RoleBlockd = "blockd"
	// RoleCeiling is not a server but the same jobs without NBD (fio on a
	// file): what the machine gives at most.
	RoleCeiling = "ceiling"
)

// Roled is implemented by servers that are not peers.
type Roled interface {
	Role() string
}

// Blockd is the blockd daemon serving one volume (memory engine unless
// Engine says otherwise).
type Blockd struct {
	// Bin is the blockd binary (built from ./cmd/blockd).
	Bin string
	// Label is the server's name in the report; "" means "blockd". Every
	// blockd configuration of one run needs its own (blockd-file).
	Label string
	// Dir, if set, is the parent of the daemon's state dir (and so of a
	// file volume's backing file) instead of the run's directory.
	Dir string
	// Engine is the volume engine; "" means memory.
	Engine string
	// Profile is the volume's io_profile; "" leaves the daemon's default.
	Profile string
	// CreateArgs are appended to `blockd volume create` (e.g. QoS limits).
	CreateArgs []string
	// ServeArgs are appended to `blockd serve`.
	ServeArgs []string
	// Env are NAME=VALUE settings for the daemon (BLOCKD_IO_URING=0).
	Env []string
}

// Name implements Server.
func (b Blockd) Name() string { return cmp.Or(b.Label, "blockd") }

// Role implements Roled.
func (b Blockd) Role() string { return RoleBlockd }

// Start implements Server: `blockd serve`, then `blockd volume create`.
func (b Blockd) Start(ctx context.Context, dir string, size int64) (in *Instance, err error) {
	if _, err := os.Stat(b.Bin); err != nil {
		return nil, fmt.Errorf("%s %w (no ./cmd/blockd yet?)", b.Bin, ErrNotBuilt)
	}
	engine := b.Engine
	if engine == "" {
		engine = "memory"
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	state := filepath.Join(dir, "blockd-state")
	if b.Dir != "" {
		if state, err = os.MkdirTemp(b.Dir, "nbdbench-"+b.Name()+"-"); err != nil {
			return nil, fmt.Errorf("blockd: %w", err)
		}
	} else if err := os.MkdirAll(state, 0o755); err != nil {
		return nil, fmt.Errorf("blockd: %w", err)
	}
	// Metrics stay on, as in production, but on a free port: the default
	// one may belong to another blockd on this machine.
	mport, err := FreePort()
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "blockd.sock")
	argv := []string{b.Bin, "serve", "--state-dir", state,
		"--nbd-listen", "127.0.0.1:" + strconv.Itoa(port), "--api-socket", sock,
		"--metrics-listen", "127.0.0.1:" + strconv.Itoa(mport)}
	argv = append(argv, b.ServeArgs...)
	if len(b.Env) > 0 {
		// env execs blockd: the process, and its CPU time, stay the same.
		argv = append(append([]string{"env"}, b.Env...), argv...)
	}
	in = &Instance{Server: b.Name(), URI: nbdURI(port), Cmdline: argv,
		Notes: "volume engine " + engine + ", profile " + cmp.Or(b.Profile, "default") + "; export name = volume name"}
	if b.Dir != "" {
		in.Notes += "; state dir " + state
		in.cleanup = append(in.cleanup, func() { os.RemoveAll(state) })
	}
	defer func() {
		if err != nil {
			in.Stop()
		}
	}()
	p, err := StartProc("blockd", filepath.Join(dir, "blockd.log"), argv...)
	if err != nil {
		return nil, err
	}
	in.procs = append(in.procs, p)
	wctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	if err := waitUnix(wctx, sock, p); err != nil {
		return nil, err
	}
	create := []string{b.Bin, "volume", "create", ExportName, "--size", SizeString(size),
		"--engine", engine, "--api-socket", sock}
	if b.Profile != "" {
		create = append(create, "--profile", b.Profile)
	}
	create = append(create, b.CreateArgs...)
	if out, err := exec.CommandContext(wctx, create[0], create[1:]...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("blockd volume create: %w: %s", err, strings.TrimSpace(string(out)))
	}
	in.Cmdline = append(append(in.Cmdline, "&&"), create...)
	if err := WaitNBD(wctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), p); err != nil {
		return nil, err
	}
	in.Version = version(b.Bin, "--version")
	return in, nil
}

// Nbdkit is nbdkit's memory plugin.
type Nbdkit struct {
	// Bin is the nbdkit binary; "" means nbdkit from PATH.
	Bin string
	// Allocator is the memory plugin's allocator= ("" = nbdkit's default,
	// sparse). "malloc" is a flat array with a read-write lock.
	Allocator string
	// Threads is -t, nbdkit's threads per connection (0 = default, 16).
	Threads int
}

// Name implements Server: "nbdkit", or "nbdkit-malloc" with that allocator.
func (n Nbdkit) Name() string {
	if n.Allocator == "" || n.Allocator == "sparse" {
		return "nbdkit"
	}
	return "nbdkit-" + n.Allocator
}

// Start implements Server.
func (n Nbdkit) Start(ctx context.Context, dir string, size int64) (in *Instance, err error) {
	bin := n.Bin
	if bin == "" {
		bin = "nbdkit"
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	// -f: stay in the foreground so the process we started is the server.
	// --exit-with-parent: a second guarantee besides our Pdeathsig.
	argv := []string{bin, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(port),
		"-e", ExportName}
	if n.Threads > 0 {
		argv = append(argv, "-t", strconv.Itoa(n.Threads))
	}
	argv = append(argv, "memory", strconv.FormatInt(size, 10))
	alloc := "sparse (default)"
	if n.Allocator != "" {
		argv = append(argv, "allocator="+n.Allocator)
		alloc = n.Allocator
	}
	in = &Instance{Server: n.Name(), URI: nbdURI(port), Version: version(bin, "--version"),
		Notes: "memory plugin, allocator " + alloc + ", thread model parallel, can_multi_conn"}
	defer func() {
		if err != nil {
			in.Stop()
		}
	}()
	if err := startNBD(ctx, in, dir, "nbdkit", port, argv); err != nil {
		return nil, err
	}
	return in, nil
}

// QemuNBD is qemu-nbd serving a raw file on tmpfs.
type QemuNBD struct {
	// Bin is the qemu-nbd binary; "" means qemu-nbd from PATH.
	Bin string
	// TmpDir is where the image goes; "" means /dev/shm (tmpfs, so the
	// comparison is memory against memory).
	TmpDir string
	// Cache is --cache ("" = writeback, qemu-nbd's default and what a user
	// gets; "none" would need O_DIRECT on tmpfs and buys nothing there).
	Cache string
	// AIO is --aio ("" = threads).
	AIO string
}

// Name implements Server: "qemu-nbd", or "qemu-nbd-io_uring" with that
// --aio mode.
func (q QemuNBD) Name() string {
	if q.AIO == "" || q.AIO == "threads" {
		return "qemu-nbd"
	}
	return "qemu-nbd-" + q.AIO
}

// Start implements Server.
func (q QemuNBD) Start(ctx context.Context, dir string, size int64) (in *Instance, err error) {
	bin := q.Bin
	if bin == "" {
		bin = "qemu-nbd"
	}
	tmp := q.TmpDir
	if tmp == "" {
		tmp = "/dev/shm"
	}
	cache, aio := q.Cache, q.AIO
	if cache == "" {
		cache = "writeback"
	}
	if aio == "" {
		aio = "threads"
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	imgDir, err := os.MkdirTemp(tmp, "nbdbench-qemu-")
	if err != nil {
		return nil, fmt.Errorf("qemu-nbd: %w", err)
	}
	in = &Instance{Server: q.Name(), Version: version(bin, "--version"), URI: nbdURI(port),
		Notes: "raw image on " + tmp + ", cache=" + cache + ", aio=" + aio}
	in.cleanup = append(in.cleanup, func() { os.RemoveAll(imgDir) })
	defer func() {
		if err != nil {
			in.Stop()
		}
	}()
	img := filepath.Join(imgDir, "disk.raw")
	f, err := os.Create(img)
	if err != nil {
		return nil, fmt.Errorf("qemu-nbd: %w", err)
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("qemu-nbd: %w", err)
	}
	argv := []string{bin, "-f", "raw", "-x", ExportName, "-b", "127.0.0.1", "-p", strconv.Itoa(port),
		"--persistent", "--shared=16", "--cache=" + cache, "--aio=" + aio, img}
	if err := startNBD(ctx, in, dir, "qemu-nbd", port, argv); err != nil {
		return nil, err
	}
	// qemu-nbd holds the image open; unlinking it now means the tmpfs
	// memory is freed however the run ends, even by SIGKILL.
	_ = os.RemoveAll(imgDir)
	return in, nil
}

// GoNBD is github.com/pojntfx/go-nbd's server with its memory backend
// (the program in bench/gonbd).
type GoNBD struct {
	// Bin is the built bench/gonbd program.
	Bin string
}

// Name implements Server.
func (g GoNBD) Name() string { return "go-nbd" }

// Start implements Server.
func (g GoNBD) Start(ctx context.Context, dir string, size int64) (in *Instance, err error) {
	if _, err := os.Stat(g.Bin); err != nil {
		return nil, fmt.Errorf("go-nbd: %w", err)
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	argv := []string{g.Bin, "-listen", "127.0.0.1:" + strconv.Itoa(port), "-size", strconv.FormatInt(size, 10),
		"-name", ExportName}
	in = &Instance{Server: g.Name(), URI: nbdURI(port), Version: version(g.Bin, "-version"),
		Notes: "pkg/server + pkg/backend.MemoryBackend (one mutex, one request at a time per connection)"}
	defer func() {
		if err != nil {
			in.Stop()
		}
	}()
	if err := startNBD(ctx, in, dir, "go-nbd", port, argv); err != nil {
		return nil, err
	}
	return in, nil
}

// Disk is not an NBD server: it runs every row with fio's io_uring engine
// and O_DIRECT on a file of the export's size, so the report shows what
// the filesystem under a file volume gives at most on this machine (the
// ceiling of a blockd file volume's column). Give it the same Dir as that
// volume's blockd.
type Disk struct {
	// Dir is the parent of the file; "" means the run's directory.
	Dir string
}

// Name implements Server.
func (Disk) Name() string { return "disk" }

// Role implements Roled.
func (Disk) Role() string { return RoleCeiling }

// Start implements Server: it creates the file (sparse; the prefill
// writes it) and names it with a file:// URI, which Job.Args turns into
// fio's io_uring engine.
func (d Disk) Start(ctx context.Context, dir string, size int64) (*Instance, error) {
	parent := cmp.Or(d.Dir, dir)
	fdir, err := os.MkdirTemp(parent, "nbdbench-disk-")
	if err != nil {
		return nil, fmt.Errorf("disk: %w", err)
	}
	path := filepath.Join(fdir, "disk.img")
	f, err := os.Create(path)
	if err == nil {
		err = f.Truncate(size)
		f.Close()
	}
	if err != nil {
		os.RemoveAll(fdir)
		return nil, fmt.Errorf("disk: %w", err)
	}
	in := &Instance{Server: d.Name(), URI: fileURI(path),
		Cmdline: []string{"fio", "--ioengine=io_uring", "--direct=1", "--filename=" + path},
		Notes:   "not a server: fio io_uring O_DIRECT on a file in " + parent + ", the disk's ceiling"}
	in.cleanup = append(in.cleanup, func() { os.RemoveAll(fdir) })
	return in, nil
}

func fileURI(path string) string { return "file://" + path }
