package blockd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/probe"
	"github.com/blockd/blockd/qos"
)

// Config is what `blockd serve` runs with.
type Config struct {
	StateDir      string
	NBDListen     string // TCP address for NBD clients; "" disables
	NBDSocket     string // unix socket for NBD clients; "" disables
	APISocket     string // control API; default STATE/blockd.sock
	MetricsListen string // Prometheus /metrics; "" disables
	Kernel        KernelOptions
	Probes        bool         // per-pod eBPF accounting
	ProbeDevices  string       // ProbeDevicesOurs (default) or ProbeDevicesAll
	QoSDisabled   bool         // no QoS stage at all
	QoSCapacity   qos.Capacity // what reservations and weights divide
	Logger        *slog.Logger
}

// Daemon is a running blockd: subsystems start in the order of the fields
// below and stop in reverse.
type Daemon struct {
	cfg  Config
	log  *slog.Logger
	lock *os.File // flock on STATE/blockd.lock: one daemon per state dir

	reg     *prometheus.Registry
	qos     *qos.Node
	volumes *Manager
	nbd     *nbd.Server
	kernel  *kernelNBD
	ublk    *kernelUblk
	probe   *probe.Probe // nil when off or unavailable
	api     *http.Server
	metrics *http.Server

	probeStop context.CancelFunc
	probeDone chan struct{}

	wg   sync.WaitGroup // the accept loops
	errc chan error     // first fatal error of an accept loop
}

// Start brings the daemon up: volumes loaded, listeners open. It returns
// once every listener accepts.
func Start(cfg Config) (*Daemon, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.StateDir == "" {
		return nil, errors.New("serve: --state-dir is required")
	}
	if cfg.APISocket == "" {
		cfg.APISocket = filepath.Join(cfg.StateDir, "blockd.sock")
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, errc: make(chan error, 4)}
	if err := d.start(); err != nil {
		d.stop(context.Background())
		return nil, err
	}
	return d, nil
}

func (d *Daemon) start() (err error) {
	cfg := d.cfg
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if d.lock, err = lockStateDir(cfg.StateDir); err != nil {
		return err
	}

	d.reg = prometheus.NewRegistry()
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if !cfg.QoSDisabled {
		if d.qos, err = qos.NewNode(cfg.QoSCapacity); err != nil {
			return err
		}
		d.reg.MustRegister(d.qos.Collector())
	}
	if d.volumes, err = openManager(cfg.StateDir, d.log, NewMetrics(d.reg), d.qos); err != nil {
		return err
	}

	d.nbd = nbd.NewServer(nbdExports{d.volumes}, nbd.Options{Logger: d.log})
	d.kernel = newKernelNBD(d.nbd, d.volumes, d.log, cfg.Kernel)
	if err := d.kernel.opts.LoadModule("nbd"); err != nil {
		d.log.Warn("kernel nbd driver unavailable: attach will fail, network NBD works", "err", err)
	}
	d.kernel.Recover()
	d.ublk = newKernelUblk(d.volumes, d.log, cfg.Kernel.LoadModule)
	d.ublk.Recover()
	d.startProbes()
	if cfg.NBDListen != "" {
		ln, err := net.Listen("tcp", cfg.NBDListen)
		if err != nil {
			return fmt.Errorf("nbd listen: %w", err)
		}
		d.goServe("nbd tcp", func() error { return d.nbd.Serve(ln) })
		d.log.Info("serving NBD", "addr", ln.Addr().String())
	}
	if cfg.NBDSocket != "" {
		ln, err := listenUnix(cfg.NBDSocket, 0o660)
		if err != nil {
			return fmt.Errorf("nbd socket: %w", err)
		}
		d.goServe("nbd unix", func() error { return d.nbd.Serve(ln) })
		d.log.Info("serving NBD", "socket", cfg.NBDSocket)
	}

	apiLn, err := listenUnix(cfg.APISocket, 0o600)
	if err != nil {
		return fmt.Errorf("api socket: %w", err)
	}
	apiMux := http.NewServeMux()
	apiMux.HandleFunc("GET /v1/io/pods", d.podsHandler)
	apiMux.Handle("/", newAPIHandler(d.volumes, d.kernel, d.ublk, d.updateProbeDevices))
	d.api = &http.Server{Handler: apiMux, ReadHeaderTimeout: 10 * time.Second}
	d.goServe("api", func() error { return d.api.Serve(apiLn) })
	d.log.Info("control API", "socket", cfg.APISocket)

	if cfg.MetricsListen != "" {
		ln, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			return fmt.Errorf("metrics listen: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
		d.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		d.goServe("metrics", func() error { return d.metrics.Serve(ln) })
		d.log.Info("metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	}
	return nil
}

// goServe runs an accept loop owned by the daemon until stop.
func (d *Daemon) goServe(what string, serve func() error) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := serve(); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			d.errc <- fmt.Errorf("%s: %w", what, err)
		}
	}()
}

// Volumes returns the volume registry.
func (d *Daemon) Volumes() *Manager { return d.volumes }

// Err delivers the first failure of an accept loop.
func (d *Daemon) Err() <-chan error { return d.errc }

// Shutdown stops accepting, lets in-flight requests finish, flushes every
// volume and releases the state dir, in reverse start order.
func (d *Daemon) Shutdown(ctx context.Context) error { return d.stop(ctx) }

func (d *Daemon) stop(ctx context.Context) error {
	var errs []error
	if d.metrics != nil {
		errs = append(errs, d.metrics.Shutdown(ctx))
	}
	if d.api != nil {
		errs = append(errs, d.api.Shutdown(ctx))
	}
	d.stopProbes()
	if d.ublk != nil {
		// Kernel devices stay: their I/O waits for the next daemon.
		d.ublk.Close()
	}
	if d.kernel != nil {
		d.kernel.beginClose()
	}
	if d.nbd != nil {
		if err := d.nbd.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("nbd: %w", err))
			d.nbd.Close()
		}
	}
	if d.kernel != nil {
		d.kernel.Close()
	}
	d.wg.Wait()
	if d.volumes != nil {
		errs = append(errs, d.volumes.Close())
	}
	if d.qos != nil {
		d.qos.Close()
	}
	for _, p := range []string{d.cfg.APISocket, d.cfg.NBDSocket} {
		if p != "" && d.lock != nil {
			os.Remove(p)
		}
	}
	if d.lock != nil {
		d.lock.Close()
	}
	return errors.Join(errs...)
}

// lockStateDir takes an exclusive flock so two daemons never share a state
// dir; the lock dies with the process, so a kill -9 leaves nothing stale.
func lockStateDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "blockd.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b, _ := os.ReadFile(f.Name())
		f.Close()
		return nil, fmt.Errorf("state dir %s is in use by another blockd (pid %s)", dir, strings.TrimSpace(string(b)))
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

// listenUnix listens on a unix socket, replacing a stale one (safe: the
// state dir lock is held) and setting its mode.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// nbdExports serves every volume as an NBD export named after it.
type nbdExports struct{ m *Manager }

func (e nbdExports) Export(name string) (nbd.Export, bool) {
	v, ok := e.m.lookup(name)
	if !ok {
		return nil, false
	}
	return v, true
}

func (e nbdExports) ExportNames() []string { return e.m.Names() }

func serveCmd(args []string, stderr io.Writer) error {
	fs := newFlagSet("serve", "blockd serve [--state-dir DIR] [--nbd-listen ADDR] [--nbd-socket PATH] [--api-socket PATH] [--metrics-listen ADDR]", stderr)
	var cfg Config
	fs.StringVar(&cfg.StateDir, "state-dir", DefaultStateDir, "directory for volume metadata and backing files")
	fs.StringVar(&cfg.NBDListen, "nbd-listen", "127.0.0.1:10809", "TCP address NBD clients connect to (\"\" disables)")
	fs.StringVar(&cfg.NBDSocket, "nbd-socket", "", "unix socket for NBD clients (default STATE/nbd.sock; \"none\" disables)")
	fs.StringVar(&cfg.APISocket, "api-socket", "", "control API socket (default STATE/blockd.sock, mode 0600)")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", "127.0.0.1:9810", "address of the Prometheus /metrics endpoint (\"\" disables)")
	fs.DurationVar(&cfg.Kernel.Timeout, "nbd-timeout", 30*time.Second, "kernel nbd per-request timeout; on expiry the socket is replaced and the request retried")
	fs.DurationVar(&cfg.Kernel.DeadConnTimeout, "nbd-dead-conn-timeout", 2*time.Minute, "how long kernel nbd devices hold I/O while blockd restarts")
	fs.Int64Var(&cfg.QoSCapacity.IOPS, "qos-capacity-iops", 0, "node IOPS that QoS reservations and weights divide (0: unlimited; reservations and weights then have no effect, caps still do)")
	qosBPS := fs.String("qos-capacity-bps", "0", "node bytes/s that QoS reservations and weights divide (0: unlimited; see --qos-capacity-iops)")
	qosOn := fs.Bool("qos", true, "apply per-volume QoS (false removes the stage)")
	probes := fs.String("probes", "on", "per-pod block I/O accounting with eBPF: on or off")
	fs.StringVar(&cfg.ProbeDevices, "probe-devices", ProbeDevicesOurs, "devices the probes account: ours (attached volumes) or all")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	shutdownTimeout := fs.Duration("shutdown-timeout", 30*time.Second, "how long SIGTERM waits for in-flight requests")
	procs := fs.Int("gomaxprocs", 0, "Go scheduler slots (GOMAXPROCS); 0: Go's choice ($GOMAXPROCS, else the CPUs it may use). "+
		"More than the CPUs helps many concurrent clients of file volumes (a P stays with a goroutine blocked in pread/fdatasync) but makes QoS timers late")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := wantArgs(fs, pos, 0, "serve takes no arguments"); err != nil {
		return err
	}
	if *procs < 0 {
		return fmt.Errorf("--gomaxprocs %d: want 0 (automatic) or a positive count", *procs)
	}
	cfg.QoSDisabled = !*qosOn
	if cfg.QoSCapacity.BPS, err = ParseSize(*qosBPS); err != nil {
		return fmt.Errorf("--qos-capacity-bps: %w", err)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", *logLevel)
	}
	hopts := &slog.HandlerOptions{Level: level}
	switch *logFormat {
	case "text":
		cfg.Logger = slog.New(slog.NewTextHandler(stderr, hopts))
	case "json":
		cfg.Logger = slog.New(slog.NewJSONHandler(stderr, hopts))
	default:
		return fmt.Errorf("--log-format %q: want text or json", *logFormat)
	}
	switch *probes {
	case "on":
		cfg.Probes = true
	case "off":
	default:
		return fmt.Errorf("--probes %q: want on or off", *probes)
	}
	if cfg.ProbeDevices != ProbeDevicesOurs && cfg.ProbeDevices != ProbeDevicesAll {
		return fmt.Errorf("--probe-devices %q: want ours or all", cfg.ProbeDevices)
	}
	switch cfg.NBDSocket {
	case "":
		cfg.NBDSocket = filepath.Join(cfg.StateDir, "nbd.sock")
	case "none":
		cfg.NBDSocket = ""
	}

	if *procs > 0 {
		runtime.GOMAXPROCS(*procs)
	}
	cfg.Logger.Info("scheduler slots", "gomaxprocs", runtime.GOMAXPROCS(0), "cpus", runtime.NumCPU())

	d, err := Start(cfg)
	if err != nil {
		return err
	}
	cfg.Logger.Info("blockd ready", "state_dir", cfg.StateDir, "volumes", len(d.volumes.Names()), "pid", os.Getpid())
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigc)
	var runErr error
	select {
	case s := <-sigc:
		cfg.Logger.Info("shutting down", "signal", s.String())
	case runErr = <-d.Err():
		cfg.Logger.Error("shutting down after failure", "err", runErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	if err := d.Shutdown(ctx); err != nil {
		cfg.Logger.Error("shutdown", "err", err)
		return errors.Join(runErr, err)
	}
	cfg.Logger.Info("stopped cleanly")
	return runErr
}
