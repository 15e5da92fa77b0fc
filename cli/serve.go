package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/daemon"
	"github.com/blockd/blockd/units"
	"github.com/blockd/blockd/volume"
)

func newServe() *cobra.Command {
	var (
		cfg                          daemon.Config
		qosIOPS, qosBPS, cacheMemory string
		qosOn                        bool
		probes, logFormat, logLevel  string
		kernelDevices                bool
		peers                        []string
		resyncRate, resyncMinRate    string
		clusterURLs                  string
		labels                       []string
		shutdownTimeout              time.Duration
		procs                        int
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the daemon",
		Long: `Run the blockd daemon in the foreground: load the volumes in the state dir, serve
them over NBD (TCP and a unix socket), re-attach the kernel devices recorded in
their metadata (unless --kernel-devices=false), and answer the control API on
STATE/blockd.sock (mode 0600).

One daemon per state dir. SIGTERM or SIGINT: stop accepting, let requests in
flight finish and their replies go out, flush every volume, exit 0. Kernel
devices stay attached for the next daemon.

Replication (--node, --peer, --tls-*): the node's volumes may keep copies on
its peers, over QUIC with mutual TLS (see docs/replication.md).

A cluster (--cluster etcd=URL[,URL...]): the nodes agree through etcd on every
volume's spec, where its copies are and which node owns it; any node creates
and lists any volume, a frontend takes a volume where it connects, and a volume
whose owner dies fails over to a node with an in-sync copy once the owner's
lease (--lease-ttl) runs out (see docs/cluster.md).`,
		Args: args(0, ""),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if procs < 0 {
				return usagef("--gomaxprocs %d: want 0 (automatic) or a positive count", procs)
			}
			cfg.QoSDisabled = !qosOn
			cfg.Kernel.Disabled = !kernelDevices
			var err error
			if cfg.QoSCapacity.IOPS, err = units.ParseCount(qosIOPS); err != nil {
				return usagef("--qos-capacity-iops: %v", err)
			}
			if cfg.QoSCapacity.BPS, err = units.ParseRate(qosBPS); err != nil {
				return usagef("--qos-capacity-bps: %v", err)
			}
			switch cacheMemory {
			case "auto":
			case "none":
				cfg.CacheMemory = -1
			default:
				if cfg.CacheMemory, err = units.ParseSize(cacheMemory); err != nil {
					return usagef("--cache-memory: %v", err)
				}
				if cfg.CacheMemory == 0 {
					cfg.CacheMemory = -1
				}
			}
			if len(peers) > 0 || cfg.Replication.Node != "" || clusterURLs != "" {
				if err := replicationFlags(&cfg.Replication, peers, resyncRate, resyncMinRate); err != nil {
					return err
				}
			}
			if err := clusterFlags(&cfg.Cluster, clusterURLs, labels); err != nil {
				return err
			}
			cfg.Cluster.Version, _ = Version()
			if cfg.Logger, err = newLogger(cmd.ErrOrStderr(), logFormat, logLevel); err != nil {
				return err
			}
			// Packages without a logger of their own (the file engine's
			// io_uring fallback) log like the daemon.
			slog.SetDefault(cfg.Logger)
			switch probes {
			case "on":
				cfg.Probes = true
			case "off":
			default:
				return usagef("--probes %q: want on or off", probes)
			}
			if cfg.ProbeDevices != daemon.ProbeDevicesOurs && cfg.ProbeDevices != daemon.ProbeDevicesAll {
				return usagef("--probe-devices %q: want ours or all", cfg.ProbeDevices)
			}
			switch cfg.NBDSocket {
			case "":
				cfg.NBDSocket = filepath.Join(cfg.StateDir, "nbd.sock")
			case "none":
				cfg.NBDSocket = ""
			}
			if procs > 0 {
				runtime.GOMAXPROCS(procs)
			}
			return serve(cfg, shutdownTimeout)
		},
	}
	fs := cmd.Flags()
	fs.SortFlags = false
	fs.StringVar(&cfg.StateDir, "state-dir", api.DefaultStateDir, "`directory` for volume metadata and backing files")
	fs.StringArrayVar(&cfg.KEKFiles, "kek-file", nil, "key-encryption key `file` (32 random bytes, raw or hex; mode 0600, owned by the daemon's user) "+
		"that wraps encrypted volumes' data keys; repeat to keep older KEKs during a rotation: the first wraps new volumes")
	fs.StringVar(&cfg.KEKDir, "kek-dir", "", "`directory` of more KEK files (each file not starting with \".\", by name, after --kek-file; "+
		"a missing directory holds none): a Kubernetes Secret mounted as a volume")
	fs.StringVar(&cfg.NBDListen, "nbd-listen", "127.0.0.1:10809", "TCP `address` NBD clients connect to (\"\" disables)")
	fs.StringVar(&cfg.NBDSocket, "nbd-socket", "", "unix `socket` for NBD clients (default STATE/nbd.sock; \"none\" disables)")
	fs.StringVar(&cfg.APISocket, "api-socket", "", "control API `socket` to listen on (default STATE/blockd.sock, mode 0600)")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", "127.0.0.1:9810", "`address` of the Prometheus /metrics endpoint (\"\" disables)")
	fs.BoolVar(&kernelDevices, "kernel-devices", true, "expose volumes as kernel block devices (attach; re-attach recorded devices at start; "+
		"loads nbd/ublk_drv). --kernel-devices=false: no module loading, no recovery, attach refused: a pure network NBD server, e.g. in an unprivileged container")
	fs.StringVar(&cfg.Replication.Node, "node", "", "this node's `name` for replication (its certificate's CN or DNS SAN); empty: no replication")
	fs.StringVar(&cfg.Replication.Listen, "repl-listen", ":10810", "UDP `address` peers reach this node's replication on")
	fs.StringArrayVar(&peers, "peer", nil, "a peer node, `NAME=HOST:PORT` (repeat for each)")
	fs.StringVar(&cfg.Replication.CAFile, "tls-ca", "", "the cluster CA certificate (PEM `file`) peers' certificates must chain to")
	fs.StringVar(&cfg.Replication.CertFile, "tls-cert", "", "this node's certificate (PEM `file`), naming --node")
	fs.StringVar(&cfg.Replication.KeyFile, "tls-key", "", "this node's private key (PEM `file`)")
	fs.DurationVar(&cfg.Replication.Timeout, "repl-timeout", 5*time.Second, "how long a replica may take to answer before it leaves the in-sync set, while another in-sync copy remains")
	fs.DurationVar(&cfg.Replication.LastTimeout, "repl-last-timeout", 15*time.Second, "the same for the last in-sync replica")
	fs.StringVar(&resyncRate, "resync-rate", "100MiB", "most bytes per second all resyncs of this node copy together (`rate`; 0: no cap)")
	fs.StringVar(&resyncMinRate, "resync-min-rate", "20MiB", "the resync rate while application I/O is running (`rate`; 0: no lowering)")
	fs.StringVar(&clusterURLs, "cluster", "", "join a cluster through etcd: etcd=`URL[,URL...]` (needs --node and the --tls-* flags)")
	fs.StringVar(&cfg.Cluster.CAFile, "etcd-ca", "", "CA certificate (PEM `file`) of etcd's TLS")
	fs.StringVar(&cfg.Cluster.CertFile, "etcd-cert", "", "client certificate (PEM `file`) for etcd")
	fs.StringVar(&cfg.Cluster.KeyFile, "etcd-key", "", "client key (PEM `file`) for etcd")
	fs.StringVar(&cfg.Cluster.Prefix, "cluster-prefix", "/blockd/", "etcd key `prefix` holding the cluster")
	fs.DurationVar(&cfg.Cluster.LeaseTTL, "lease-ttl", 30*time.Second, "the node's lease in etcd: how long after the node dies its volumes fail over, and how long an etcd outage its volumes ride through")
	fs.DurationVar(&cfg.Cluster.ReplaceAfter, "replica-replace-after", 10*time.Minute, "how long a replica may be unreachable before its owner builds a new one on another node")
	fs.StringArrayVar(&labels, "label", nil, "a `key=value` label of this node, e.g. zone=rack1 (copies spread over zones); repeatable")
	fs.StringVar(&cfg.Cluster.Advertise, "advertise", "", "replication `address` the other nodes reach this one at (default --repl-listen, if it names a host)")
	fs.DurationVar(&cfg.Kernel.Timeout, "nbd-timeout", 30*time.Second, "kernel nbd per-request timeout (e.g. 30s); on expiry the socket is replaced and the request retried")
	fs.DurationVar(&cfg.Kernel.DeadConnTimeout, "nbd-dead-conn-timeout", 2*time.Minute, "how long kernel nbd devices hold I/O while blockd restarts (e.g. 2m)")
	fs.StringVar(&qosIOPS, "qos-capacity-iops", "0", "node requests per second (`iops`) that QoS reservations and weights divide, e.g. 50k (0: unlimited, then only caps act)")
	fs.StringVar(&qosBPS, "qos-capacity-bps", "0", "node bytes per second (`rate`) that QoS reservations and weights divide, e.g. 2GiB (0: unlimited)")
	fs.StringVar(&cacheMemory, "cache-memory", "auto", "memory all volumes' prefetch caches and write-back buffers share, e.g. 1GiB "+
		"(`size`; auto: a sixteenth of RAM, 64MiB to 1GiB; none: no limit); idle volumes give theirs back within seconds")
	fs.BoolVar(&qosOn, "qos", true, "apply per-volume QoS (--qos=false removes the stage)")
	fs.StringVar(&probes, "probes", "on", "per-pod block I/O accounting with eBPF: on or off (without BPF permission the daemon logs why and runs without)")
	fs.StringVar(&cfg.ProbeDevices, "probe-devices", daemon.ProbeDevicesOurs, "devices the probes account: ours (attached volumes) or all")
	fs.BoolVar(&cfg.Pprof, "pprof", false, "serve Go's CPU, heap and goroutine profiles at /debug/pprof/ on the metrics address")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.DurationVar(&shutdownTimeout, "shutdown-timeout", 30*time.Second, "how long SIGTERM waits for requests in flight")
	fs.IntVar(&procs, "gomaxprocs", 0, "Go scheduler slots (GOMAXPROCS); 0: Go's choice. More than the CPUs helps many "+
		"concurrent clients of file volumes (a slot stays with a goroutine blocked in pread/fdatasync) but makes QoS timers late")
	for flag, vals := range map[string][]string{
		"probes": {"on", "off"}, "probe-devices": {daemon.ProbeDevicesOurs, daemon.ProbeDevicesAll},
		"log-format": {"text", "json"}, "log-level": {"debug", "info", "warn", "error"},
	} {
		cmd.RegisterFlagCompletionFunc(flag, cobra.FixedCompletions(vals, cobra.ShellCompDirectiveNoFileComp))
	}
	return cmd
}

// clusterFlags checks the cluster flags and fills cc.
func clusterFlags(cc *daemon.ClusterConfig, urls string, labels []string) error {
	if urls == "" {
		for _, set := range []string{cc.CAFile, cc.CertFile, cc.KeyFile} {
			if set != "" {
				return usagef("--etcd-ca, --etcd-cert and --etcd-key need --cluster")
			}
		}
		if len(labels) > 0 {
			return usagef("--label needs --cluster")
		}
		return nil
	}
	list, ok := strings.CutPrefix(urls, "etcd=")
	if !ok || list == "" {
		return usagef("--cluster %q: want etcd=URL[,URL...], e.g. etcd=http://10.0.0.1:2379", urls)
	}
	for _, u := range strings.Split(list, ",") {
		if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			return usagef("--cluster: %q is not an http:// or https:// URL", u)
		}
		cc.Endpoints = append(cc.Endpoints, u)
	}
	if cc.LeaseTTL < 2*time.Second {
		return usagef("--lease-ttl %s: want at least 2s", cc.LeaseTTL)
	}
	if cc.ReplaceAfter <= 0 {
		return usagef("--replica-replace-after %s: want a positive duration", cc.ReplaceAfter)
	}
	cc.Labels = map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			return usagef("--label %q: want key=value", l)
		}
		cc.Labels[k] = v
	}
	return nil
}

// replicationFlags checks the replication flags and fills rc.
func replicationFlags(rc *daemon.ReplicationConfig, peers []string, rate, minRate string) error {
	if rc.Node == "" {
		return usagef("--peer and --cluster need --node (this node's name)")
	}
	if !volume.ValidName(rc.Node) {
		return usagef("--node %q: want a name of a-z, 0-9, '.', '_', '-'", rc.Node)
	}
	rc.Peers = map[string]string{}
	for _, p := range peers {
		name, addr, ok := strings.Cut(p, "=")
		if !ok || !volume.ValidName(name) || addr == "" {
			return usagef("--peer %q: want NAME=HOST:PORT", p)
		}
		if name == rc.Node {
			return usagef("--peer %q names this node", p)
		}
		if _, dup := rc.Peers[name]; dup {
			return usagef("--peer %s given twice", name)
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return usagef("--peer %q: %v", p, err)
		}
		rc.Peers[name] = addr
	}
	if rc.CAFile == "" || rc.CertFile == "" || rc.KeyFile == "" {
		return usagef("replication needs --tls-ca, --tls-cert and --tls-key (peers authenticate each other with the cluster CA)")
	}
	var err error
	if rc.ResyncRate, err = units.ParseRate(rate); err != nil {
		return usagef("--resync-rate: %v", err)
	}
	if rc.ResyncMinRate, err = units.ParseRate(minRate); err != nil {
		return usagef("--resync-min-rate: %v", err)
	}
	if rc.Timeout <= 0 || rc.LastTimeout < rc.Timeout {
		return usagef("--repl-timeout %s, --repl-last-timeout %s: want positive, the last at least as long", rc.Timeout, rc.LastTimeout)
	}
	return nil
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usagef("--log-format %q: want text or json", format)
}

// serve runs the daemon until SIGTERM, SIGINT or a fatal error.
func serve(cfg daemon.Config, shutdownTimeout time.Duration) error {
	log := cfg.Logger
	ver, commit := Version()
	log.Info("starting blockd", "version", ver, "commit", commit)
	log.Info("scheduler slots", "gomaxprocs", runtime.GOMAXPROCS(0), "cpus", runtime.NumCPU())
	sd := newNotifier(log)
	sd.status("loading volumes and recovering kernel devices from %s", cfg.StateDir)
	d, err := daemon.Start(cfg)
	if err != nil {
		sd.status("start failed: %v", err)
		return err
	}
	nvols := len(d.Volumes().Names())
	log.Info("blockd ready", "state_dir", cfg.StateDir, "volumes", nvols, "pid", os.Getpid())
	apiSocket := cfg.APISocket
	if apiSocket == "" {
		apiSocket = filepath.Join(cfg.StateDir, "blockd.sock")
	}
	sd.ready(fmt.Sprintf("serving %d volumes from %s", nvols, cfg.StateDir), apiSocket)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigc)
	var runErr error
	select {
	case s := <-sigc:
		log.Info("shutting down", "signal", s.String())
	case runErr = <-d.Err():
		log.Error("shutting down after failure", "err", runErr)
	}
	sd.stopping("shutting down: finishing requests in flight, flushing volumes")
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := d.Shutdown(ctx); err != nil {
		log.Error("shutdown", "err", err)
		return errors.Join(runErr, err)
	}
	log.Info("stopped cleanly")
	return runErr
}
