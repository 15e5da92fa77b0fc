// Package daemon is `blockd serve`: it wires the volume registry, the
// frontends (the NBD server for network clients, kernel nbd and ublk
// devices), the per-pod eBPF probes, the control API and the metrics
// endpoint, starts them in that order and stops them in reverse.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/attach"
	"github.com/blockd/blockd/encryption"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/metrics"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/probe"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/transport"
	"github.com/blockd/blockd/units"
	"github.com/blockd/blockd/volume"
)

// Probe modes of `blockd serve --probe-devices`.
const (
	ProbeDevicesOurs = "ours" // only the kernel devices of attached volumes
	ProbeDevicesAll  = "all"  // every block device on the node
)

// Config is what `blockd serve` runs with.
type Config struct {
	StateDir      string
	NBDListen     string // TCP address for NBD clients; "" disables
	NBDSocket     string // unix socket for NBD clients; "" disables
	APISocket     string // control API; default STATE/blockd.sock
	MetricsListen string // Prometheus /metrics; "" disables
	Kernel        attach.Options
	Probes        bool         // per-pod eBPF accounting
	ProbeDevices  string       // ProbeDevicesOurs (default) or ProbeDevicesAll
	QoSDisabled   bool         // no QoS stage at all
	QoSCapacity   qos.Capacity // what reservations and weights divide
	// Replication joins the daemon to its peers (Node empty: none).
	Replication ReplicationConfig
	// KEKFiles are the node's key-encryption key files (serve
	// --kek-file): the first wraps the data keys of new encrypted
	// volumes, every one opens the volumes wrapped under it.
	KEKFiles []string
	// KEKDir, if set, holds more KEK files (every file whose name does
	// not start with "."; by name, after KEKFiles): a Kubernetes Secret
	// mounted as a volume. A missing directory holds none.
	KEKDir string
	// Cluster joins the daemon to a cluster on etcd (no Endpoints: none);
	// it needs Replication.
	Cluster ClusterConfig
	// Pprof serves Go's profiles at /debug/pprof/ on the metrics
	// listener.
	Pprof bool
	// CacheMemory bounds the memory of every volume's prefetch cache and
	// write-back buffer together (0: DefaultCacheMemory; < 0: no limit).
	CacheMemory int64
	Logger      *slog.Logger
}

// Daemon is a running blockd: subsystems start in the order of the fields
// below and stop in reverse.
type Daemon struct {
	cfg  Config
	log  *slog.Logger
	lock *os.File // flock on STATE/blockd.lock: one daemon per state dir

	reg         *prometheus.Registry
	qos         *qos.Node
	transport   *transport.Transport // nil without replication
	replHandler *replHandler
	cluster     *agent // nil without a cluster
	volumes     *volume.Registry
	nbd         *nbd.Server
	devices     *attach.Devices
	probe       *probe.Probe // nil when off or unavailable
	api         *http.Server
	metrics     *http.Server

	profileHook atomic.Pointer[attach.Devices] // devices, once they exist
	probeStop   context.CancelFunc
	probeDone   chan struct{}

	nbdAddr net.Addr // the TCP listener's address, if any

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
	if cfg.CacheMemory == 0 {
		cfg.CacheMemory = DefaultCacheMemory()
	}
	if cfg.ProbeDevices == "" {
		cfg.ProbeDevices = ProbeDevicesOurs
	}
	cfg.Kernel.Log = cfg.Logger
	if cfg.Kernel.LoadModule == nil {
		cfg.Kernel.LoadModule = module.Load
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
	if cfg.Kernel.DaemonID, err = daemonID(cfg.StateDir); err != nil {
		return err
	}
	d.cfg.Kernel.DaemonID = cfg.Kernel.DaemonID

	d.reg = prometheus.NewRegistry()
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if !cfg.QoSDisabled {
		if d.qos, err = qos.NewNode(cfg.QoSCapacity); err != nil {
			return err
		}
		d.reg.MustRegister(metrics.QoS(d.qos))
	}
	budget := profile.NewBudget(max(cfg.CacheMemory, 0))
	d.reg.MustRegister(metrics.CacheBudget(budget), metrics.FileEngines())
	d.log.Info("cache memory", "limit", limitText(budget.Stats().Limit))
	keys, err := loadKEKs(cfg.KEKFiles, cfg.KEKDir, d.log)
	if err != nil {
		return err
	}
	volOpts := volume.Options{Dir: cfg.StateDir, Log: d.log, Metrics: metrics.NewVolumes(d.reg), QoS: d.qos, CacheBudget: budget, Keys: keys}
	var replNode *replication.Node
	if cfg.Replication.Node != "" {
		if err := d.startTransport(); err != nil {
			return err
		}
		replNode = d.replicationNode()
		volOpts.Replication = replNode
		volOpts.OnFenced = d.fenced
		d.reg.MustRegister(metrics.Replication(d.replicatedVolumes))
	}
	if len(cfg.Cluster.Endpoints) > 0 {
		if err := d.startCluster(); err != nil {
			return err
		}
		volOpts.Cluster, volOpts.ClusterID = d.cluster, d.cluster.st.ID()
	}
	// Volumes open before the kernel frontends exist (those need the
	// volumes); a profile change reaches the devices once they do.
	volOpts.OnProfileChange = func(vol string, eff profile.Profile) {
		if k := d.profileHook.Load(); k != nil {
			k.ProfileChanged(vol, eff)
		}
	}
	// A deleted volume's network clients are cut off, so that they learn
	// it is gone (or find a new volume of the same name) when they
	// reconnect.
	volOpts.OnDelete = func(v *volume.Volume) {
		if d.nbd == nil {
			return // a volume reopened while the daemon starts: no client yet
		}
		if n := d.nbd.Disconnect(v); n > 0 {
			d.log.Info("closed the NBD connections of a deleted volume", "volume", v.Name(), "connections", n)
		}
	}
	if d.volumes, err = volume.Open(volOpts); err != nil {
		return err
	}
	if replNode != nil {
		d.replHandler.svc.Store(replication.NewService(replNode.Name, d.volumes, replNode.Log))
	}
	if d.cluster != nil {
		d.cluster.run()
		// A kernel device here needs its volume: take back what the
		// node no longer owns (its lease ran out while it was down), if
		// no other node took it meanwhile.
		d.cluster.reclaimAttached()
	}

	d.nbd = nbd.NewServer(nbdExports{m: d.volumes, a: d.cluster}, nbd.Options{Logger: d.log})
	d.devices = attach.New(d.nbd, d.volumes, cfg.Kernel)
	d.profileHook.Store(d.devices)
	if cfg.Kernel.Disabled {
		d.log.Info("kernel devices off (--kernel-devices=false): no module loading, no recovery of attached devices, attach refused")
	} else {
		if err := cfg.Kernel.LoadModule("nbd"); err != nil {
			d.log.Warn("kernel nbd driver unavailable: attach will fail, network NBD works", "err", err)
		}
		d.devices.Recover()
	}
	d.startProbes()
	if cfg.NBDListen != "" {
		ln, err := net.Listen("tcp", cfg.NBDListen)
		if err != nil {
			return fmt.Errorf("nbd listen: %w", err)
		}
		d.nbdAddr = ln.Addr()
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
	d.api = &http.Server{Handler: d.apiHandler(), ReadHeaderTimeout: 10 * time.Second}
	d.goServe("api", func() error { return d.api.Serve(apiLn) })
	d.log.Info("control API", "socket", cfg.APISocket)

	if cfg.MetricsListen != "" {
		ln, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			return fmt.Errorf("metrics listen: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
		if cfg.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		d.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		d.goServe("metrics", func() error { return d.metrics.Serve(ln) })
		d.log.Info("metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	}
	return nil
}

// loadKEKs reads the node's KEK files into a keyring; a file that is not
// a private key of the daemon's user stops the daemon (a KEK others can
// read protects nothing).
func loadKEKs(files []string, dir string, log *slog.Logger) (*encryption.Keyring, error) {
	var keks []*encryption.KEK
	flags := make([]string, len(files))
	for i := range files {
		flags[i] = "--kek-file"
	}
	if dir != "" {
		ents, err := os.ReadDir(dir)
		switch {
		case errors.Is(err, os.ErrNotExist):
			log.Info("no key-encryption key directory: encrypted volumes need another KEK", "dir", dir)
		case err != nil:
			return nil, fmt.Errorf("serve --kek-dir: %w", err)
		}
		for _, e := range ents { // by name
			if !strings.HasPrefix(e.Name(), ".") {
				files = append(files, filepath.Join(dir, e.Name()))
				flags = append(flags, "--kek-dir")
			}
		}
	}
	for i, f := range files {
		kek, err := encryption.LoadKEKFile(f)
		if err != nil {
			return nil, fmt.Errorf("serve %s: %w", flags[i], err)
		}
		keks = append(keks, kek)
		log.Info("key-encryption key", "file", f, "kek_id", kek.ID(), "current", len(keks) == 1)
	}
	return encryption.NewKeyring(keks...), nil
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
func (d *Daemon) Volumes() *volume.Registry { return d.volumes }

// NBDAddr returns the address network NBD clients connect to ("" when
// TCP is off): the actual port when Config.NBDListen asked for port 0.
func (d *Daemon) NBDAddr() string {
	if d.nbdAddr == nil {
		return ""
	}
	return d.nbdAddr.String()
}

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
	if d.devices != nil {
		// Kernel devices stay: their I/O waits for the next daemon.
		d.devices.BeginClose()
	}
	if d.nbd != nil {
		if err := d.nbd.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("nbd: %w", err))
			d.nbd.Close()
		}
	}
	if d.devices != nil {
		d.devices.Close()
	}
	d.wg.Wait()
	keep := false
	if d.cluster != nil {
		// No frontend is left: hand the volumes over cleanly, except
		// those a kernel device here still uses (the next run keeps
		// them, with the node's lease).
		d.cluster.stop()
		keep = d.cluster.releaseAll(ctx) > 0
	}
	if d.volumes != nil {
		errs = append(errs, d.volumes.Close())
	}
	if d.cluster != nil {
		d.cluster.close(keep)
	}
	if d.transport != nil {
		// After the volumes: their last flush reaches the replicas.
		errs = append(errs, d.transport.Close())
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

// DefaultCacheMemory is the cache memory budget of a daemon that names
// none: a sixteenth of the machine's RAM, between 64 MiB and 1 GiB. A
// streaming volume wants up to 40 MiB (32 MiB prefetch, 8 MiB write-back),
// so a gigabyte keeps two dozen streams at full speed; past that they
// share, and no number of volumes grows the daemon beyond it.
func DefaultCacheMemory() int64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 256 << 20
	}
	ram := int64(si.Totalram) * int64(si.Unit)
	return min(max(ram/16, 64<<20), 1<<30)
}

func limitText(n int64) string {
	if n == 0 {
		return "none"
	}
	return units.FormatSize(n)
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

// nbdExports serves every volume as an NBD export named after it; in a
// cluster, a client's NBD_OPT_GO takes the volume's ownership (Acquire).
type nbdExports struct {
	m *volume.Registry
	a *agent // nil without a cluster
}

func (e nbdExports) Export(name string) (nbd.Export, bool) {
	if e.a != nil {
		// Looking a cluster volume up (NBD_OPT_INFO, a list) does not
		// take it: any copy here describes it.
		if v, err := e.m.Volume(name); err == nil && v.Spec().Cluster != "" {
			if _, failed := v.Failed(); !failed {
				return v, true
			}
		}
	}
	v, ok := e.m.Lookup(name)
	if !ok {
		return nil, false
	}
	return v, true
}

func (e nbdExports) ExportNames() []string {
	if e.a == nil {
		return e.m.Names()
	}
	var out []string
	for _, v := range e.m.Volumes() {
		if _, failed := v.Failed(); !failed && (v.Role() != api.RoleReplica || v.Spec().Cluster != "") {
			out = append(out, v.Name())
		}
	}
	return out
}

// Acquire implements nbd.Acquirer.
func (e nbdExports) Acquire(name string) (nbd.Export, error) {
	if e.a == nil {
		if v, err := e.m.Get(name); err == nil {
			return v, nil
		} else {
			return nil, err
		}
	}
	v, err := e.a.acquire(name, "nbd")
	if err != nil {
		return nil, err
	}
	return v, nil
}

// NotFound implements nbd.Acquirer.
func (e nbdExports) NotFound(err error) bool { return api.IsCode(err, api.CodeNotFound) }
