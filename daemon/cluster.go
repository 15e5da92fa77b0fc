package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/cluster"
	"github.com/blockd/blockd/metrics"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/volume"
)

// ClusterConfig joins the daemon to a cluster through etcd. A daemon
// without Endpoints is a node of its own: its state dir is all it needs.
type ClusterConfig struct {
	// Endpoints are etcd's client URLs.
	Endpoints []string
	// CAFile, CertFile and KeyFile reach etcd over TLS (PEM files; the
	// certificate and key are optional, for etcd's client auth).
	CAFile, CertFile, KeyFile string
	// Prefix holds the cluster's keys (default cluster.DefaultPrefix).
	Prefix string
	// LeaseTTL is the node's lease (default cluster.DefaultLeaseTTL):
	// how long after the node dies another may take its volumes over.
	LeaseTTL time.Duration
	// ReplaceAfter is how long a replica may be unreachable before its
	// owner replaces it with a new copy on another node (default
	// DefaultReplaceAfter).
	ReplaceAfter time.Duration
	// Labels describe the node; "zone" spreads copies.
	Labels map[string]string
	// Advertise is the transport address the other nodes reach this one
	// at (default: the replication listen address, if it names a host).
	Advertise string
	// Version is the daemon's version, shown by `node list`.
	Version string
}

// DefaultReplaceAfter is how long a replica may be gone before it is
// replaced (Mayastor waits as long for a faulted child).
const DefaultReplaceAfter = 10 * time.Minute

// createWait bounds how long a create waits for the nodes to make their
// copies.
const createWait = 30 * time.Second

// agent is the daemon's part of the cluster: it makes and removes this
// node's copies as the store says, takes a volume when a frontend here
// needs it, hands volumes over, fences those it lost and replaces
// replicas gone for good. It implements volume.Cluster.
type agent struct {
	d    *Daemon
	cfg  ClusterConfig
	node string
	st   *cluster.Store
	ss   *cluster.Session
	log  *slog.Logger
	met  *metrics.ClusterMetrics

	// life ends after the volumes closed: state saves need it until then.
	life    context.Context
	endLife context.CancelFunc
	// loops ends the watch and the reconciler, which wg waits for.
	loops     context.Context
	stopLoops context.CancelFunc
	wg        sync.WaitGroup
	kick      chan struct{}

	mu      sync.Mutex
	owned   map[string]*cluster.Ownership // volumes this node owns
	adopted map[string]uint64             // the volumes it owned at start (its lease kept), by epoch
	states  map[string]cluster.State      // their state as last written
	refused map[string]time.Time          // first refusal of a frontend here since the volume was owned here
	volMu   map[string]*sync.Mutex        // serializes taking and giving up a volume
	warned  map[string]time.Time          // rate-limits repeated warnings
	started time.Time

	saveMu sync.Mutex // orders state writes (the replicator's and the attach records)
}

// startCluster joins the cluster before the volumes open: their owner
// pipelines need the node's lease.
func (d *Daemon) startCluster() error {
	cc, rc := d.cfg.Cluster, d.cfg.Replication
	if rc.Node == "" {
		return errors.New("cluster: --cluster needs --node and the replication TLS flags (--tls-ca, --tls-cert, --tls-key)")
	}
	if cc.ReplaceAfter <= 0 {
		cc.ReplaceAfter = DefaultReplaceAfter
	}
	if cc.Advertise == "" {
		host, _, err := net.SplitHostPort(d.transport.Addr().String())
		if ip := net.ParseIP(host); err != nil || ip == nil || ip.IsUnspecified() {
			return fmt.Errorf("cluster: the replication address %s names no host the other nodes can reach; set --advertise HOST:PORT", d.transport.Addr())
		}
		cc.Advertise = d.transport.Addr().String()
	}
	var tlsCfg *tls.Config
	if cc.CAFile != "" || cc.CertFile != "" {
		var err error
		if tlsCfg, err = etcdTLS(cc); err != nil {
			return err
		}
	}
	a := &agent{d: d, cfg: cc, node: rc.Node, log: d.log.With("component", "cluster"), kick: make(chan struct{}, 1),
		owned: map[string]*cluster.Ownership{}, states: map[string]cluster.State{}, refused: map[string]time.Time{},
		volMu: map[string]*sync.Mutex{}, warned: map[string]time.Time{}, started: time.Now().UTC()}
	a.life, a.endLife = context.WithCancel(context.Background())
	a.loops, a.stopLoops = context.WithCancel(a.life)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	a.st, err = cluster.Open(ctx, cluster.Config{Endpoints: cc.Endpoints, TLS: tlsCfg, Prefix: cc.Prefix, Node: rc.Node,
		Dir: d.cfg.StateDir, LeaseTTL: cc.LeaseTTL, Log: a.log})
	if err != nil {
		a.endLife()
		return err
	}
	if a.ss, err = a.st.StartSession(ctx, a.nodeInfo, a.leaseLost); err != nil {
		a.st.Close()
		a.endLife()
		return err
	}
	// What the node still owns (a restart within its lease): those
	// copies open as owners, at the same epoch.
	if a.adopted, err = a.st.Owned(ctx, a.ss.Lease()); err != nil {
		a.ss.Close(false)
		a.st.Close()
		a.endLife()
		return fmt.Errorf("cluster: %w", err)
	}
	for name := range a.adopted {
		vi, err := a.st.Get(ctx, name)
		if err != nil {
			a.ss.Close(false)
			a.st.Close()
			a.endLife()
			return fmt.Errorf("cluster: reading volume %s: %w", name, err)
		}
		a.states[name] = vi.State
	}
	d.cluster = a
	a.met = metrics.Cluster(d.reg,
		func() float64 { return float64(a.ss.RenewFailures.Load()) },
		func() float64 { return float64(a.ss.LeasesLost.Load()) },
		func() float64 { return a.ss.ValidFor().Seconds() },
		func() float64 { a.mu.Lock(); defer a.mu.Unlock(); return float64(len(a.owned)) })
	a.log.Info("joined the cluster", "cluster", a.st.ID(), "etcd", strings.Join(cc.Endpoints, ","), "advertise", cc.Advertise,
		"lease_ttl", a.st.LeaseTTL(), "replace_after", cc.ReplaceAfter, "labels", labelText(cc.Labels))
	return nil
}

func etcdTLS(cc ClusterConfig) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if cc.CAFile != "" {
		b, err := os.ReadFile(cc.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("etcd TLS: %s holds no PEM certificate", cc.CAFile)
		}
		cfg.RootCAs = pool
	}
	if cc.CertFile != "" || cc.KeyFile != "" {
		c, err := tls.LoadX509KeyPair(cc.CertFile, cc.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg, nil
}

func labelText(l map[string]string) string {
	var kv []string
	for k, v := range l {
		kv = append(kv, k+"="+v)
	}
	slices.Sort(kv)
	return strings.Join(kv, ",")
}

// nodeInfo is what the node tells the cluster about itself.
func (a *agent) nodeInfo() cluster.NodeInfo {
	ni := cluster.NodeInfo{Name: a.node, Addr: a.cfg.Advertise, Labels: a.cfg.Labels, Version: a.cfg.Version, Started: a.started}
	var st unix.Statfs_t
	if err := unix.Statfs(a.d.cfg.StateDir, &st); err == nil {
		ni.Capacity, ni.Free = int64(st.Blocks)*st.Bsize, int64(st.Bavail)*st.Bsize
	}
	return ni
}

// run starts the loops once the volumes are open.
func (a *agent) run() {
	for name, epoch := range a.adopted {
		a.mu.Lock()
		_, open := a.owned[name]
		a.mu.Unlock()
		if !open {
			// No copy here says it owns the volume (the state dir
			// lost it): give the ownership back.
			a.log.Warn("the cluster says this node owns a volume its state dir does not: releasing it", "volume", name, "epoch", epoch)
			if err := a.st.Release(a.life, a.ss.Adopt(name, epoch), cluster.State{}); err != nil {
				a.log.Warn("releasing a volume this node cannot serve", "volume", name, "err", err)
			}
		}
	}
	changed := make(chan struct{}, 1)
	a.wg.Add(2)
	go func() { defer a.wg.Done(); a.st.Watch(a.loops, changed) }()
	go func() { defer a.wg.Done(); a.reconcileLoop(changed) }()
}

// reclaimAttached takes back the volumes attached as kernel devices here
// that the node no longer owns (its lease expired while the daemon was
// down), so that their devices go on; a volume another node took keeps
// its device detached at recovery.
func (a *agent) reclaimAttached() {
	for _, v := range a.d.volumes.Volumes() {
		s := v.Spec()
		if s.Cluster == "" || s.Attachment == nil || s.Replication == nil || s.Replication.Role == api.RoleOwner {
			continue
		}
		if _, err := a.acquire(s.Name, "attach"); err != nil {
			a.log.Error("a volume attached here could not be taken back; its device will be detached", "volume", s.Name, "device", s.Attachment.Device, "err", err)
		}
	}
}

func (a *agent) dropOwned(name string, o *cluster.Ownership) {
	a.mu.Lock()
	if a.owned[name] == o {
		delete(a.owned, name)
	}
	a.mu.Unlock()
}

// leaseLost is the session's news that etcd expired the node's lease:
// every volume owned under it is fenced.
func (a *agent) leaseLost(lease int64) {
	a.mu.Lock()
	var lost []string
	for name, o := range a.owned {
		if o.Lost() {
			lost = append(lost, name)
			delete(a.owned, name)
		}
	}
	a.mu.Unlock()
	for _, name := range lost {
		a.d.volumes.Fence(name, cluster.ErrNotOwner)
	}
	if len(lost) > 0 {
		a.log.Error("the node's lease expired: its volumes are fenced; a frontend here takes one again if no other node did", "volumes", strings.Join(lost, ","))
	}
	a.poke()
}

// Owns implements volume.Cluster.
func (a *agent) Owns(vol string, epoch uint64) bool {
	e, ok := a.adopted[vol]
	return ok && e == epoch
}

// Lease implements volume.Cluster.
func (a *agent) Lease(vol string, epoch uint64) replication.Lease {
	a.mu.Lock()
	defer a.mu.Unlock()
	if o := a.owned[vol]; o != nil && o.Epoch == epoch {
		return o
	}
	if a.Owns(vol, epoch) {
		// A restarted daemon's volume, under the lease it kept.
		o := a.ss.Adopt(vol, epoch)
		a.owned[vol] = o
		return o
	}
	return a.ss.NotOwned(vol, epoch)
}

// SaveState implements volume.Cluster.
func (a *agent) SaveState(vol string, r api.Replication) error {
	return a.saveState(vol, r.Epoch, func(st *cluster.State) {
		st.Generation = r.Generation
		st.InSync = []string{a.node}
		for _, rep := range r.Replicas {
			if rep.InSync {
				st.InSync = append(st.InSync, rep.Node)
			}
		}
		slices.Sort(st.InSync)
	})
}

// saveState changes the stored state of a volume this node owns at epoch.
func (a *agent) saveState(vol string, epoch uint64, change func(*cluster.State)) error {
	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	a.mu.Lock()
	o, st := a.owned[vol], a.states[vol]
	a.mu.Unlock()
	if o == nil || o.Epoch != epoch || o.Lost() {
		return api.Errorf(api.CodeConflict, "volume %s: %w", vol, cluster.ErrNotOwner)
	}
	st.InSync = slices.Clone(st.InSync)
	change(&st)
	st.Owner, st.Epoch, st.Clean = a.node, epoch, false
	if err := a.st.SaveState(a.life, o, st); err != nil {
		return fmt.Errorf("volume %s: persisting its state in the cluster: %w", vol, err)
	}
	a.mu.Lock()
	if a.owned[vol] == o {
		a.states[vol] = st
	}
	a.mu.Unlock()
	return nil
}

func (a *agent) lockVolume(name string) func() {
	a.mu.Lock()
	m := a.volMu[name]
	if m == nil {
		m = &sync.Mutex{}
		a.volMu[name] = m
	}
	a.mu.Unlock()
	m.Lock()
	return m.Unlock
}

// ownedHere returns the volume if this node owns it and serves it.
func (a *agent) ownedHere(name string) (*volume.Volume, bool) {
	a.mu.Lock()
	o := a.owned[name]
	a.mu.Unlock()
	if o == nil || !o.Held() {
		return nil, false
	}
	v, err := a.d.volumes.Volume(name)
	if err != nil || v.Role() != api.RoleOwner || v.Fenced() || v.Replication().Epoch != o.Epoch {
		return nil, false
	}
	if _, failed := v.Failed(); failed {
		return nil, false
	}
	return v, true
}

// acquire returns the volume for a frontend of this node (by: "nbd",
// "attach", "move"), taking its ownership if no live node has it. A
// volume another node owns is refused with who owns it.
func (a *agent) acquire(name, by string) (*volume.Volume, error) {
	if v, ok := a.ownedHere(name); ok {
		return v, nil
	}
	v, err := a.d.volumes.Volume(name)
	if err == nil && v.Spec().Cluster == "" {
		return a.d.volumes.Get(name) // a node's own volume
	}
	unlock := a.lockVolume(name)
	defer unlock()
	if v, ok := a.ownedHere(name); ok {
		return v, nil
	}
	ctx, cancel := context.WithTimeout(a.loops, 30*time.Second)
	defer cancel()
	if err != nil {
		// No copy here: say where the copies are.
		vi, gerr := a.st.Get(ctx, name)
		if gerr != nil {
			if api.IsCode(gerr, api.CodeNotFound) {
				return nil, api.Errorf(api.CodeNotFound, "volume %s not found", name)
			}
			return nil, api.Errorf(api.CodeUnavailable, "volume %s: %v", name, gerr)
		}
		return nil, api.Errorf(api.CodeConflict, "volume %s has no copy on node %s; its copies are on %s (serve it from one of them)",
			name, a.node, strings.Join(vi.Nodes, ", "))
	}
	if why, failed := v.Failed(); failed {
		return nil, api.Errorf(api.CodeConflict, "volume %s is failed on this node: %s", name, why)
	}
	local := v.Replication()
	now := time.Now()
	// Waited: since the first refusal because a (dead) owner still held
	// the volume, unless that is older than the wait could be.
	a.mu.Lock()
	firstTry, tried := a.refused[name]
	if !tried || now.Sub(firstTry) > 3*a.st.LeaseTTL()+10*time.Second {
		firstTry, tried = now, false
	}
	a.mu.Unlock()
	o, before, err := a.st.Acquire(ctx, a.ss, name, func(vi cluster.VolumeInfo) error {
		switch {
		case !vi.Has(a.node):
			return api.Errorf(api.CodeConflict, "volume %s has no copy on node %s any more (its copies: %s)", name, a.node, strings.Join(vi.Nodes, ", "))
		case !vi.InSync(a.node):
			return api.Errorf(api.CodeConflict, "volume %s: this node's copy is not in sync (in sync: %s); only those nodes can serve it",
				name, strings.Join(vi.State.InSync, ", "))
		case local.Generation == 0:
			return api.Errorf(api.CodeConflict, "volume %s: this node's copy is still being built; it cannot serve the volume yet", name)
		}
		return nil
	}, func(vi cluster.VolumeInfo) cluster.State {
		st := vi.State
		st.Owner, st.Clean = a.node, false
		return st
	})
	if err != nil {
		var oe *cluster.OwnedError
		if !tried && errors.As(err, &oe) {
			a.mu.Lock()
			a.refused[name] = now
			a.mu.Unlock()
		}
		if cluster.IsUnreachable(err) {
			return nil, api.Errorf(api.CodeUnavailable, "volume %s: cannot take it: %v", name, err)
		}
		return nil, err
	}
	st := before.State
	st.InSync = slices.Clone(st.InSync)
	st.Owner, st.Epoch, st.Clean = a.node, o.Epoch, false
	// An attachment elsewhere died with that node's ownership.
	st.Attached = ""
	if att := v.Spec().Attachment; att != nil {
		st.Attached = a.node + ":" + att.Device
	}
	if before.State.Owner != a.node || !before.State.Clean {
		st.LastFailover = &api.Failover{From: before.State.Owner, To: a.node, Epoch: o.Epoch, At: now.UTC(), Clean: before.State.Clean,
			Waited: api.Duration(now.Sub(firstTry).Round(time.Millisecond)), By: by}
	}
	a.mu.Lock()
	delete(a.refused, name)
	a.owned[name], a.states[name] = o, st
	a.mu.Unlock()

	// This node's bitmaps and activity log are its history only if it
	// was the last owner, at the epoch its copy last knew (no node owned
	// the volume since); otherwise they go, and whatever this node
	// cannot vouch for is compared.
	fresh := !(before.State.Owner == a.node && local.Epoch != 0 && local.Epoch == before.State.Epoch)
	r := api.Replication{Role: api.RoleOwner, Owner: a.node, Epoch: o.Epoch, Generation: before.State.Generation}
	for _, n := range before.Nodes {
		if n == a.node {
			continue
		}
		rep := api.Replica{Node: n, InSync: before.InSync(n)}
		switch {
		case fresh:
			rep.Compare = !before.State.Clean || !rep.InSync
		default:
			for _, old := range local.Replicas {
				if old.Node == n {
					rep.Compare = old.Compare
				}
			}
		}
		r.Replicas = append(r.Replicas, rep)
	}
	nv, err := a.d.volumes.TakeOwnership(name, r, fresh)
	if err == nil {
		// The epoch in the stored state, and the in-sync set as the
		// new pipeline found it.
		err = a.SaveState(name, nv.Replication())
	}
	if err != nil {
		a.dropOwned(name, o)
		a.d.volumes.Fence(name, err)
		rel := before.State
		if rerr := a.st.Release(a.life, o, rel); rerr != nil {
			a.log.Warn("giving back a volume this node could not open as owner", "volume", name, "err", rerr)
		}
		return nil, fmt.Errorf("volume %s: taking it over: %w", name, err)
	}
	kind := "clean"
	if !before.State.Clean {
		kind = "failover"
	}
	if before.State.Owner != a.node || !before.State.Clean {
		a.met.OwnerChanges.WithLabelValues(name, kind).Inc()
	}
	a.log.Warn("took the volume over", "volume", name, "epoch", o.Epoch, "from", before.State.Owner, "handed_over", before.State.Clean,
		"by", by, "waited", time.Since(firstTry).Round(time.Millisecond), "compare", fresh && !before.State.Clean)
	return nv, nil
}

// release hands a volume this node owns back to the cluster: its
// frontends here are cut off, its writes drained and flushed to every
// replica, and the store learns it is free, clean if all that worked.
func (a *agent) release(ctx context.Context, name string) error {
	unlock := a.lockVolume(name)
	defer unlock()
	a.mu.Lock()
	o := a.owned[name]
	a.mu.Unlock()
	if o == nil || o.Lost() {
		return api.Errorf(api.CodeConflict, "volume %s is not owned by node %s", name, a.node)
	}
	v, err := a.d.volumes.Volume(name)
	if err != nil {
		return err
	}
	if att := v.Spec().Attachment; att != nil {
		return api.Errorf(api.CodeConflict, "volume %s is attached as %s on node %s; detach it there first", name, att.Device, a.node)
	}
	final, shutErr := a.d.volumes.GiveUpOwnership(name)
	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	a.mu.Lock()
	st := a.states[name]
	a.mu.Unlock()
	st.InSync = []string{a.node}
	for _, rep := range final.Replicas {
		if rep.InSync {
			st.InSync = append(st.InSync, rep.Node)
		}
	}
	slices.Sort(st.InSync)
	st.Owner, st.Epoch, st.Generation, st.Clean = a.node, o.Epoch, final.Generation, shutErr == nil && final.Generation != 0
	err = a.st.Release(ctx, o, st)
	a.dropOwned(name, o)
	if err != nil {
		return fmt.Errorf("volume %s: releasing it: %w", name, err)
	}
	a.log.Info("handed the volume over", "volume", name, "epoch", o.Epoch, "clean", st.Clean)
	return nil
}

func (a *agent) poke() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// reconcileLoop brings this node in line with the store whenever it
// changes, and every few seconds (replacements are due by time).
func (a *agent) reconcileLoop(changed <-chan struct{}) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-a.loops.Done():
			return
		case <-changed:
		case <-a.kick:
		case <-t.C:
		}
		a.reconcile()
	}
}

// warn logs at most once a minute per key.
func (a *agent) warn(key, msg string, args ...any) {
	a.mu.Lock()
	last, ok := a.warned[key]
	if ok && time.Since(last) < time.Minute {
		a.mu.Unlock()
		return
	}
	a.warned[key] = time.Now()
	a.mu.Unlock()
	a.log.Warn(msg, args...)
}

// reconcile makes this node's copies what the store says: a new volume's
// copy made, a removed one deleted, a spec change applied, a hand-over
// done, a lost ownership fenced, a replica gone too long replaced.
func (a *agent) reconcile() {
	ctx, cancel := context.WithTimeout(a.loops, 30*time.Second)
	defer cancel()
	members, alive, err := a.st.Nodes(ctx)
	if err != nil {
		a.warn("etcd", "cannot reach etcd; volumes keep serving while the node's lease lasts", "err", err, "lease_left", a.ss.ValidFor().Round(time.Second))
		return
	}
	for _, m := range members {
		if m.Name != a.node && m.Addr != "" {
			if err := a.d.transport.SetPeer(m.Name, m.Addr); err != nil {
				a.warn("peer "+m.Name, "cannot use a node's address", "node", m.Name, "addr", m.Addr, "err", err)
			}
		}
	}
	infos, _, err := a.st.List(ctx)
	if err != nil {
		a.warn("etcd", "cannot reach etcd; volumes keep serving while the node's lease lasts", "err", err)
		return
	}
	inStore := map[string]bool{}
	for _, vi := range infos {
		inStore[vi.Spec.Name] = true
		a.reconcileVolume(ctx, vi, alive)
	}
	// Copies of volumes the store no longer has: deleted meanwhile.
	for _, v := range a.d.volumes.Volumes() {
		s := v.Spec()
		if s.Cluster == a.st.ID() && !inStore[s.Name] {
			a.removeCopy(ctx, s.Name, "the volume was deleted")
		}
	}
}

func (a *agent) reconcileVolume(ctx context.Context, vi cluster.VolumeInfo, alive map[string]cluster.NodeInfo) {
	name := vi.Spec.Name
	v, err := a.d.volumes.Volume(name)
	have := err == nil
	if have && v.Spec().Cluster != a.st.ID() {
		a.warn("clash "+name, "a cluster volume has the name of a volume of this node's own; this node holds no copy of it", "volume", name)
		if vi.Has(a.node) && vi.Copies[a.node] == "" {
			a.st.SetCopy(ctx, name, "error: node "+a.node+" has a volume of its own named "+name)
		}
		return
	}
	switch {
	case !vi.Has(a.node):
		if have {
			a.removeCopy(ctx, name, "the volume's copies moved to other nodes")
		}
		return
	case !have && vi.State.Owner == "" && vi.State.Epoch == 0 && vi.Copies[a.node] == "":
		// A new volume: every copy starts empty and in sync. (A copy
		// of a volume with history is made by its owner, which
		// resyncs it.)
		spec := vi.Spec
		spec.Cluster = a.st.ID()
		r := api.Replication{Role: api.RoleReplica, Generation: vi.State.Generation}
		if _, err := a.d.volumes.CreateCopy(spec, r); err != nil {
			a.log.Error("cannot make this node's copy of a new volume", "volume", name, "err", err)
			a.st.SetCopy(ctx, name, "error: "+err.Error())
			return
		}
		a.log.Info("made this node's copy of a new volume", "volume", name, "size", int64(spec.Size), "nodes", strings.Join(vi.Nodes, ","))
		a.st.SetCopy(ctx, name, "ok")
		return
	case !have:
		return
	}
	if vi.Copies[a.node] != "ok" {
		a.st.SetCopy(ctx, name, "ok")
	}
	if err := a.d.volumes.SyncSpec(name, vi.Spec); err != nil {
		a.warn("spec "+name, "cannot apply a volume's changed settings", "volume", name, "err", err)
	}

	a.mu.Lock()
	o := a.owned[name]
	a.mu.Unlock()
	if o != nil {
		if vi.Owner != a.node || vi.Epoch != o.Epoch {
			// The owner key is gone or another's: whatever happened,
			// this node must not serve the volume any more.
			o.Lose()
			a.dropOwned(name, o)
			a.d.volumes.Fence(name, cluster.ErrNotOwner)
			a.log.Error("the cluster no longer lists this node as the volume's owner: fenced", "volume", name, "epoch", o.Epoch, "owner_now", vi.Owner)
			return
		}
		if m := vi.Move; m != nil && m.To != a.node && m.Error == "" {
			a.handOver(ctx, name, m)
			return
		}
		a.replaceReplicas(ctx, v, vi, o, alive)
		return
	}
	if m := vi.Move; m != nil && m.To == a.node && vi.Owner == "" && m.Error == "" {
		if _, err := a.acquire(name, "move"); err != nil {
			a.st.SetMove(ctx, name, &cluster.Move{To: m.To, At: m.At, Error: "node " + a.node + " could not take it: " + err.Error()})
			return
		}
		a.st.SetMove(ctx, name, nil)
	}
}

// handOver releases a volume for a requested move, or records why not.
func (a *agent) handOver(ctx context.Context, name string, m *cluster.Move) {
	if err := a.release(ctx, name); err != nil {
		a.log.Warn("cannot hand the volume over", "volume", name, "to", m.To, "err", err)
		a.st.SetMove(ctx, name, &cluster.Move{To: m.To, At: m.At, Error: err.Error()})
		return
	}
	a.log.Info("volume released for its move", "volume", name, "to", m.To)
}

// removeCopy deletes this node's copy of a cluster volume.
func (a *agent) removeCopy(ctx context.Context, name, why string) {
	unlock := a.lockVolume(name)
	defer unlock()
	a.mu.Lock()
	if o := a.owned[name]; o != nil {
		o.Lose()
		delete(a.owned, name)
	}
	delete(a.states, name)
	a.mu.Unlock()
	if err := a.d.volumes.DeleteCopy(name); err != nil && !api.IsCode(err, api.CodeNotFound) {
		a.warn("delete "+name, "cannot remove this node's copy", "volume", name, "err", err)
		return
	}
	a.log.Info("removed this node's copy", "volume", name, "why", why)
	if err := a.st.SetCopy(ctx, name, ""); err != nil {
		a.warn("delete "+name, "cannot tell the cluster the copy is gone", "volume", name, "err", err)
	}
}

// replaceReplicas replaces each replica of a volume owned here that has
// been unreachable for longer than ReplaceAfter, and keeps the store's
// list of nodes in line with the owner's replicas.
func (a *agent) replaceReplicas(ctx context.Context, v *volume.Volume, vi cluster.VolumeInfo, o *cluster.Ownership, alive map[string]cluster.NodeInfo) {
	name := v.Name()
	for _, rs := range v.ReplicaStatus() {
		if rs.DownSince.IsZero() || time.Since(rs.DownSince) < a.cfg.ReplaceAfter {
			continue
		}
		holders := []string{a.node}
		zoneOf := map[string]string{}
		for _, r := range v.Replication().Replicas {
			holders = append(holders, r.Node)
		}
		var cands []cluster.Candidate
		for _, ni := range alive {
			zoneOf[ni.Name] = ni.Labels[cluster.ZoneLabel]
			if ni.Name != rs.Node {
				cands = append(cands, cluster.Candidate{Name: ni.Name, Zone: ni.Labels[cluster.ZoneLabel], Free: ni.Free})
			}
		}
		if z, ok := zoneOf[rs.Node]; !ok || z == "" {
			// The lost node's zone, from its last record.
			if ms, _, err := a.st.Nodes(ctx); err == nil {
				for _, m := range ms {
					if m.Name == rs.Node {
						zoneOf[rs.Node] = m.Labels[cluster.ZoneLabel]
					}
				}
			}
		}
		next, err := cluster.Replacement(cands, holders, zoneOf)
		if err != nil {
			a.warn("replace "+name, "a replica is gone for good but cannot be replaced", "volume", name, "replica", rs.Node,
				"down_since", rs.DownSince, "err", err)
			continue
		}
		if err := v.ReplaceReplica(rs.Node, next); err != nil {
			a.warn("replace "+name, "replacing a replica failed", "volume", name, "replica", rs.Node, "new", next, "err", err)
			continue
		}
		a.met.ReplicasReplaced.WithLabelValues(name).Inc()
		a.log.Warn("replaced a replica gone for longer than --replica-replace-after", "volume", name, "lost", rs.Node, "new", next,
			"down_for", time.Since(rs.DownSince).Round(time.Second))
	}
	want := []string{a.node}
	for _, r := range v.Replication().Replicas {
		want = append(want, r.Node)
	}
	slices.Sort(want)
	if !slices.Equal(want, vi.Nodes) && v.Replication().Epoch == o.Epoch {
		if err := a.st.SetNodes(ctx, o, want); err != nil {
			a.warn("nodes "+name, "cannot record the volume's new copies", "volume", name, "err", err)
		}
	}
}

// stop ends the loops; the daemon's volumes stay as they are.
func (a *agent) stop() {
	a.stopLoops()
	a.wg.Wait()
}

// releaseAll hands over every volume this node owns that no kernel device
// here uses (those stay owned: the daemon's next run adopts the lease and
// serves them on), within ctx.
func (a *agent) releaseAll(ctx context.Context) (kept int) {
	a.mu.Lock()
	var names []string
	for n := range a.owned {
		names = append(names, n)
	}
	a.mu.Unlock()
	slices.Sort(names)
	for _, n := range names {
		if v, err := a.d.volumes.Volume(n); err == nil && v.Spec().Attachment != nil {
			kept++
			continue
		}
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := a.release(c, n); err != nil && !errors.Is(err, cluster.ErrNotOwner) && !api.IsCode(err, api.CodeConflict) {
			a.log.Warn("handing a volume over at shutdown", "volume", n, "err", err)
		}
		cancel()
	}
	return kept
}

// close leaves the cluster after the volumes closed: the lease is revoked
// unless the node keeps volumes owned for its next run.
func (a *agent) close(keep bool) {
	a.ss.Close(!keep)
	a.endLife()
	a.st.Close()
}
