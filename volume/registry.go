package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/blockd/blockd/internal/durable"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/qos"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/units"
)

// Metrics is what the registry tells the metrics stage about volumes
// (package metrics implements it).
type Metrics interface {
	// Stage is the volume's metrics stage, first in its pipeline.
	Stage(vol string, size int64) pipeline.Stage
	SetSize(vol string, size int64)
	SetProfile(vol string, eff profile.Profile)
	Forget(vol string)
}

// Options configure a Registry.
type Options struct {
	// Dir is the state dir (required).
	Dir string
	// Log receives volume lifecycle events; default slog.Default().
	Log *slog.Logger
	// Metrics, if set, puts a metrics stage first in every pipeline.
	Metrics Metrics
	// QoS, if set, puts a QoS stage in every pipeline.
	QoS *qos.Node
	// CacheBudget is the node-wide memory the io_profile stages' prefetch
	// caches and write-back buffers share (nil: no node limit).
	CacheBudget *profile.Budget
	// Replication, if set, lets volumes have copies on other nodes: the
	// replication stage of the volumes this node owns, and the replicas
	// it holds for others. Without it a replicated volume cannot be
	// created or opened here.
	Replication *replication.Node
	// Cluster, if set, joins the registry to a cluster (ClusterID): the
	// owner pipelines of its volumes hold their ownership lease and
	// persist their replication state in the cluster store first. A
	// volume of another cluster, or of any cluster when Cluster is nil,
	// does not open (it is failed, with the reason).
	Cluster   Cluster
	ClusterID string
	// OnFenced, if set, is told that a volume this node owned is fenced
	// (another node owns it at a higher epoch): the daemon cuts its
	// frontends off.
	OnFenced func(v *Volume)
	// OnProfileChange, if set, is called when a volume's effective
	// io_profile changes (and once when it opens), on the profile stage's
	// goroutine or in Update; never on the data path. The kernel attach
	// code follows it with the device's read-ahead.
	OnProfileChange func(vol string, eff profile.Profile)
	// OnDelete, if set, is called with a volume being deleted once no
	// lookup can find it any more and before it drains: the daemon closes
	// the volume's NBD connections there, so clients reconnect (to a new
	// volume of the same name, or to learn it is gone) instead of getting
	// errors forever.
	OnDelete func(v *Volume)

	// openEngine and reopenEngine replace ioengine.Open and
	// ioengine.Reopen in tests.
	openEngine, reopenEngine func(kind, path string, size int64) (ioengine.Engine, error)
}

// Metrics that also track failed volumes.
type failedMetrics interface {
	SetFailed(vol string, failed bool)
}

// Registry owns every open volume and its metadata under the state dir:
//
//	STATE/volumes/NAME.json   metadata (api.Spec), replaced atomically
//	STATE/data/NAME.img       backing file of file-engine volumes
//
// Metadata is the source of truth: a backing file without metadata is the
// leftover of an interrupted create or delete and is removed at start.
type Registry struct {
	dir  string
	log  *slog.Logger
	opts Options

	mu   sync.RWMutex // guards vols and deleting; held across metadata changes so they are ordered
	vols map[string]*Volume
	// deleting holds the volumes that Delete has taken out of vols and
	// is draining, without the lock.
	deleting map[string]bool
}

func (m *Registry) metaDir() string { return filepath.Join(m.dir, "volumes") }
func (m *Registry) dataDir() string { return filepath.Join(m.dir, "data") }

// DataPath returns the backing file of a file-engine volume.
func (m *Registry) DataPath(name string) string {
	return filepath.Join(m.dataDir(), name+".img")
}

// Open loads every volume recorded in the state dir, creating the layout if
// needed. A volume that cannot be opened (unreadable metadata, a missing
// or shortened backing file) is kept as failed, with the reason, and the
// others load: one bad volume never stops the node. Only errors of the
// state dir itself are returned.
func Open(opts Options) (*Registry, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.openEngine == nil {
		opts.openEngine = ioengine.Open
	}
	if opts.reopenEngine == nil {
		opts.reopenEngine = ioengine.Reopen
	}
	m := &Registry{dir: opts.Dir, log: opts.Log, opts: opts, vols: map[string]*Volume{}, deleting: map[string]bool{}}
	for _, d := range []string{m.dir, m.metaDir(), m.dataDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
	}
	ents, err := os.ReadDir(m.metaDir())
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	for _, e := range ents {
		n := e.Name()
		if isTempFile(n) {
			// A metadata write that never reached its rename: the
			// volume's metadata is the file it was to replace.
			if err := os.Remove(filepath.Join(m.metaDir(), n)); err != nil {
				m.log.Warn("cannot remove an interrupted metadata write", "file", n, "err", err)
			}
			continue
		}
		name, ok := strings.CutSuffix(n, ".json")
		if !ok || !e.Type().IsRegular() {
			m.log.Warn("ignoring a file in the metadata dir that is not a volume's metadata", "file", filepath.Join(m.metaDir(), n))
			continue
		}
		if !ValidName(name) {
			m.log.Warn("ignoring metadata whose file name is not a volume name", "file", filepath.Join(m.metaDir(), n))
			continue
		}
		v := m.load(name)
		m.vols[name] = v
		if why, failed := v.Failed(); failed {
			m.log.Error("volume failed to load; it serves no I/O until repaired or deleted", "volume", name, "reason", why)
		} else {
			s := v.Spec()
			m.log.Info("volume loaded", "volume", name, "size", units.FormatSize(int64(s.Size)), "engine", s.Engine)
		}
		m.setFailedMetric(name, v)
	}
	if err := m.sweepData(); err != nil {
		m.closeAll()
		return nil, fmt.Errorf("state dir: %w", err)
	}
	return m, nil
}

// isTempFile reports whether n is a temp file of durable.WriteFile.
func isTempFile(n string) bool {
	return strings.HasPrefix(n, ".") && strings.Contains(n, ".json.tmp-")
}

// load opens the volume whose metadata is STATE/volumes/NAME.json, or
// returns it as failed with the reason.
func (m *Registry) load(name string) *Volume {
	path := filepath.Join(m.metaDir(), name+".json")
	b, err := os.ReadFile(path)
	if err != nil {
		return newFailed(api.Spec{Name: name}, fmt.Sprintf("metadata %s cannot be read: %v", path, err))
	}
	var s api.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return newFailed(api.Spec{Name: name}, fmt.Sprintf("metadata %s is corrupt: %v", path, err))
	}
	if s.Name != name {
		return newFailed(api.Spec{Name: name}, fmt.Sprintf("metadata %s names volume %q", path, s.Name))
	}
	if err := Validate(&s); err != nil {
		return newFailed(s, fmt.Sprintf("metadata %s is invalid: %v", path, err))
	}
	if r := s.Replication; s.Cluster != "" && r != nil && r.Role == api.RoleOwner && m.opts.Cluster != nil &&
		s.Cluster == m.opts.ClusterID && !m.opts.Cluster.Owns(name, r.Epoch) {
		// It owned the volume when the daemon stopped, and the cluster
		// has let it go since (the node's lease expired): a replica
		// now, which a frontend here may take again. Its bitmaps stay:
		// if no other node owned the volume meanwhile, they are still
		// this node's history.
		r.Role = api.RoleReplica
		if err := m.persist(s); err != nil {
			return newFailed(s, fmt.Sprintf("metadata %s cannot be written: %v", path, err))
		}
		m.log.Warn("this node owned the volume when it stopped; the cluster let it go since: it opens as a replica", "volume", name, "epoch", r.Epoch)
	}
	v, err := m.open(s, m.opts.reopenEngine)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return newFailed(s, fmt.Sprintf("backing file %s is missing; blockd will not recreate it empty "+
			"(restore the file and restart, or delete the volume)", m.DataPath(name)))
	case errors.Is(err, ioengine.ErrTruncated):
		return newFailed(s, fmt.Sprintf("%v (restore the file and restart, or delete the volume)", err))
	case errors.Is(err, errCluster):
		return newFailed(s, err.Error())
	case err != nil:
		return newFailed(s, fmt.Sprintf("cannot open: %v", err))
	}
	return v
}

// sweepData removes the backing files that no metadata claims: leftovers
// of a create or delete interrupted by a crash. It touches only NAME.img
// files of valid volume names, never anything else a person put there.
func (m *Registry) sweepData() error {
	data, err := os.ReadDir(m.dataDir())
	if err != nil {
		return err
	}
	for _, e := range data {
		known := func(v string) bool { _, ok := m.vols[v]; return ok }
		if isRepl, owned := replicationFile(e.Name(), known); isRepl && e.Type().IsRegular() {
			// A replicated volume's bitmap or activity log.
			if !owned {
				m.log.Warn("removing a replication bitmap without its volume (interrupted delete)", "file", filepath.Join(m.dataDir(), e.Name()))
				if err := durable.Remove(m.dataDir(), e.Name()); err != nil {
					return err
				}
			}
			continue
		}
		name, ok := strings.CutSuffix(e.Name(), ".img")
		if !ok || !ValidName(name) || !e.Type().IsRegular() {
			m.log.Warn("ignoring a file in the data dir that is not a volume's backing file", "file", filepath.Join(m.dataDir(), e.Name()))
			continue
		}
		if _, ok := m.vols[name]; ok {
			continue
		}
		m.log.Warn("removing backing file without metadata (interrupted create or delete)", "file", filepath.Join(m.dataDir(), e.Name()))
		if err := durable.Remove(m.dataDir(), e.Name()); err != nil {
			return err
		}
	}
	return nil
}

// replicationFile reports whether n is a file of package replication in
// the data dir (VOLUME.al, VOLUME.NODE.bitmap) and whether a volume that
// known reports owns it. Volume names may hold dots, so every split of a
// bitmap's name is tried.
func replicationFile(n string, known func(string) bool) (isRepl, owned bool) {
	if v, ok := strings.CutSuffix(n, ".al"); ok && ValidName(v) {
		return true, known(v)
	}
	rest, ok := strings.CutSuffix(n, ".bitmap")
	if !ok {
		return false, false
	}
	for i := 1; i < len(rest)-1; i++ {
		if rest[i] != '.' || !ValidName(rest[:i]) {
			continue
		}
		isRepl = true
		if known(rest[:i]) {
			return true, true
		}
	}
	return isRepl, false
}

func (m *Registry) setFailedMetric(name string, v *Volume) {
	if fm, ok := m.opts.Metrics.(failedMetrics); ok {
		_, failed := v.Failed()
		fm.SetFailed(name, failed)
	}
}

// open opens the engine of s and builds its pipeline:
//
//	metrics -> read-only -> qos -> profile -> engine
func (m *Registry) open(s api.Spec, openEngine func(kind, path string, size int64) (ioengine.Engine, error)) (*Volume, error) {
	if s.Cluster != "" && (m.opts.Cluster == nil || s.Cluster != m.opts.ClusterID) {
		return nil, errForeignCluster(s.Cluster, m.opts.ClusterID)
	}
	e, err := openEngine(s.Engine, m.DataPath(s.Name), int64(s.Size))
	if err != nil {
		return nil, err
	}
	v := &Volume{name: s.Name, engine: e, spec: s, inMemory: s.Engine == ioengine.KindMemory, reg: m}
	v.readOnly.Store(s.ReadOnly)
	var stages []pipeline.Stage
	if m.opts.Metrics != nil {
		stages = append(stages, m.opts.Metrics.Stage(s.Name, e.Size()))
	}
	if s.Replication != nil && s.Replication.Role == api.RoleReplica {
		// A replica applies what its owner sends, straight to the
		// engine (the replica service does); it serves no frontend.
		v.pipe = pipeline.Chain(ioengine.Handler(e), stages...)
		return v, nil
	}
	stages = append(stages, pipeline.ReadOnly(v.ReadOnly))
	if m.opts.QoS != nil {
		if v.qos, err = m.opts.QoS.Volume(s.Name, s.QoS); err != nil {
			e.Close()
			return nil, err
		}
		stages = append(stages, v.qos.Stage())
		m.warnIdleShares(s.Name, s.QoS)
	}
	v.prof = m.newProfileStage(v, s, e)
	stages = append(stages, v.prof.Wrap)
	if s.Replication != nil && len(s.Replication.Replicas) > 0 {
		// Replication: last before the engine, so replicas get what the
		// engine gets (the profile stage's merged writes and group
		// flushes).
		if v.repl, err = m.newReplicator(v, s, e); err != nil {
			v.prof.Close()
			if v.qos != nil {
				v.qos.Close()
			}
			e.Close()
			return nil, err
		}
		stages = append(stages, v.repl.Stage())
	}
	v.pipe = pipeline.Chain(ioengine.Handler(e), stages...)
	return v, nil
}

// newProfileStage builds the volume's io_profile stage.
func (m *Registry) newProfileStage(v *Volume, s api.Spec, e ioengine.Engine) *profile.Stage {
	p, err := profile.Parse(s.Profile)
	if err != nil { // Validate admits only known profiles
		p = profile.Auto
	}
	// A memory engine is as fast as the stage's cache and buffer: they
	// would only add a copy per request.
	opts := profile.Options{Size: e.Size, InMemory: s.Engine == ioengine.KindMemory,
		Budget: m.opts.CacheBudget, Logger: m.log.With("volume", s.Name)}
	if c, ok := e.(ioengine.CachedWriter); ok && (s.Replication == nil || len(s.Replication.Replicas) == 0) {
		// db writes through the page cache: straight to the engine, so
		// not for a replicated volume, whose writes must pass the
		// replication stage below.
		opts.Cached = c
	}
	opts.OnChange = func(eff profile.Profile) {
		if m.opts.Metrics != nil {
			m.opts.Metrics.SetProfile(s.Name, eff)
		}
		if v.qos != nil {
			// journal: small synchronous writes that others wait on go
			// first in the QoS stage (after reservations).
			v.qos.SetPriority(eff == profile.Journal)
		}
		if m.opts.OnProfileChange != nil {
			m.opts.OnProfileChange(s.Name, eff)
		}
	}
	return profile.New(p, opts)
}

// saveSpec applies fn to v's metadata and persists the result, under v's
// metadata lock (callers that also hold m.mu take it first).
func (m *Registry) saveSpec(v *Volume, fn func(*api.Spec) error) (api.Spec, error) {
	v.metaMu.Lock()
	defer v.metaMu.Unlock()
	s := v.Spec()
	if err := fn(&s); err != nil {
		return api.Spec{}, err
	}
	if err := m.persist(s); err != nil {
		return api.Spec{}, err
	}
	v.setSpec(s)
	return s, nil
}

func (m *Registry) persist(s api.Spec) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return durable.WriteFile(m.metaDir(), s.Name+".json", append(b, '\n'))
}

// Create makes a new volume. It returns once the volume's metadata is
// durable and, for a replicated volume, once every copy exists.
func (m *Registry) Create(s api.Spec) (api.Spec, error) {
	s.Attachment, s.Replication = nil, nil
	if err := Validate(&s); err != nil {
		return api.Spec{}, err
	}
	s.CreatedAt = time.Now().UTC().Truncate(time.Second)
	if err := m.placeReplicas(&s); err != nil {
		return api.Spec{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if v, ok := m.vols[s.Name]; ok {
		if _, failed := v.Failed(); failed {
			return api.Spec{}, api.Errorf(api.CodeExists, "volume %s already exists (failed: delete it first to create it anew)", s.Name)
		}
		return api.Spec{}, api.Errorf(api.CodeExists, "volume %s already exists", s.Name)
	}
	v, err := m.createLocked(s)
	if err != nil {
		return api.Spec{}, err
	}
	if v.repl != nil {
		// The metadata names the replicas first: a crash before they
		// exist leaves replicas the owner finds missing and rebuilds.
		if err := v.repl.CreateReplicas(); err != nil {
			delete(m.vols, s.Name)
			m.removeLocked(v)
			return api.Spec{}, api.Errorf(api.CodeUnavailable, "create %s: %w", s.Name, err)
		}
	}
	m.log.Info("volume created", "volume", s.Name, "size", units.FormatSize(int64(s.Size)), "engine", s.Engine, "profile", s.Profile, "repl", max(s.Repl, 1))
	return v.Spec(), nil
}

// createLocked makes a volume's engine and metadata and registers it.
func (m *Registry) createLocked(s api.Spec) (*Volume, error) {
	if m.deleting[s.Name] {
		return nil, api.Errorf(api.CodeConflict, "volume %s is still being deleted; try again", s.Name)
	}
	// A backing file without metadata is garbage from an interrupted
	// create or delete: never hand its old data to a new volume.
	if err := durable.Remove(m.dataDir(), s.Name+".img"); err != nil {
		return nil, fmt.Errorf("create %s: %w", s.Name, err)
	}
	if s.Replication != nil {
		// Likewise bitmaps and an activity log left by a volume of
		// the same name.
		if err := replication.RemoveFiles(m.dataDir(), s.Name, s.Replication.Replicas); err != nil {
			return nil, fmt.Errorf("create %s: %w", s.Name, err)
		}
	}
	v, err := m.open(s, m.opts.openEngine)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", s.Name, err)
	}
	if s.Engine == ioengine.KindFile {
		if err := durable.SyncDir(m.dataDir()); err != nil {
			v.close()
			return nil, fmt.Errorf("create %s: %w", s.Name, err)
		}
	}
	if err := m.persist(s); err != nil {
		if cerr := v.close(); cerr != nil {
			m.log.Warn("closing the volume of a failed create", "volume", s.Name, "err", cerr)
		}
		if rerr := durable.Remove(m.dataDir(), s.Name+".img"); rerr != nil {
			// The next start removes it: no metadata claims it.
			m.log.Warn("removing the backing file of a failed create", "volume", s.Name, "err", rerr)
		}
		return nil, fmt.Errorf("create %s: %w", s.Name, err)
	}
	m.vols[s.Name] = v
	m.setFailedMetric(s.Name, v)
	return v, nil
}

// removeLocked undoes createLocked for a volume that is no longer in
// vols: metadata first, then the engine and its files.
func (m *Registry) removeLocked(v *Volume) {
	if err := durable.Remove(m.metaDir(), v.name+".json"); err != nil {
		m.log.Error("removing the metadata of a failed create", "volume", v.name, "err", err)
	}
	if err := v.close(); err != nil {
		m.log.Warn("closing the volume of a failed create", "volume", v.name, "err", err)
	}
	if err := durable.Remove(m.dataDir(), v.name+".img"); err != nil {
		m.log.Warn("removing the backing file of a failed create", "volume", v.name, "err", err)
	}
	if r := v.Spec().Replication; r != nil {
		if err := replication.RemoveFiles(m.dataDir(), v.name, r.Replicas); err != nil {
			m.log.Warn("removing the bitmaps of a failed create", "volume", v.name, "err", err)
		}
	}
	if m.opts.Metrics != nil {
		m.opts.Metrics.Forget(v.name)
	}
}

func notFound(name string) error {
	return api.Errorf(api.CodeNotFound, "volume %s not found", name)
}

// healthyLocked returns the volume called name if it is open; a failed one
// is a conflict that says why.
func (m *Registry) healthyLocked(name string) (*Volume, error) {
	v, ok := m.vols[name]
	if !ok {
		return nil, notFound(name)
	}
	if why, failed := v.Failed(); failed {
		return nil, api.Errorf(api.CodeConflict, "volume %s is failed (%s); it can only be deleted", name, why)
	}
	if r := v.Spec().Replication; r != nil && r.Role == api.RoleReplica {
		return nil, api.Errorf(api.CodeConflict, "volume %s is a replica here; its owner %s serves it (use it there, or `blockd volume promote %s` here if the owner is gone)", name, r.Owner, name)
	}
	return v, nil
}

// Get returns an open volume; a failed one is an error that says why.
func (m *Registry) Get(name string) (*Volume, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.healthyLocked(name)
}

// Volume returns the volume called name, failed or not.
func (m *Registry) Volume(name string) (*Volume, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	v, ok := m.vols[name]
	if !ok {
		return nil, notFound(name)
	}
	return v, nil
}

// Volumes returns every volume, failed ones included, sorted by name.
func (m *Registry) Volumes() []*Volume {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*Volume, 0, len(m.vols))
	for _, v := range m.vols {
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b *Volume) int { return strings.Compare(a.name, b.name) })
	return out
}

// List returns the metadata of every volume, failed ones included, sorted
// by name.
func (m *Registry) List() []api.Spec {
	vs := m.Volumes()
	out := make([]api.Spec, len(vs))
	for i, v := range vs {
		out[i] = v.Spec()
	}
	return out
}

// SetReason records what the daemon did to a volume (a kernel device it
// had to detach at start, say); the API shows it with the volume's state
// until the daemon stops.
func (m *Registry) SetReason(name, reason string) {
	m.mu.RLock()
	v, ok := m.vols[name]
	m.mu.RUnlock()
	if !ok {
		return
	}
	v.mu.Lock()
	v.reason = reason
	v.mu.Unlock()
}

// Delete removes a volume and its data, a failed volume too. Requests
// still in flight finish first; later ones fail. The volume drains
// without the registry lock: other volumes are served and managed
// meanwhile.
func (m *Registry) Delete(name string) error { return m.delete(name, false) }

// delete removes a volume; only the replica service (forOwner) may remove
// a replica: its owner would rebuild a copy deleted under it.
func (m *Registry) delete(name string, forOwner bool) error {
	m.mu.Lock()
	v, ok := m.vols[name]
	if !ok {
		m.mu.Unlock()
		return notFound(name)
	}
	if r := v.Spec().Replication; r != nil && r.Role == api.RoleReplica && !forOwner {
		m.mu.Unlock()
		return api.Errorf(api.CodeConflict, "volume %s is a replica of %s's volume; delete it on its owner, which removes every copy", name, r.Owner)
	}
	if a := v.Spec().Attachment; a != nil {
		m.mu.Unlock()
		return api.Errorf(api.CodeConflict, "volume %s is attached as %s; detach it first (blockd detach %s)", name, a.Device, name)
	}
	// Metadata goes first: a crash after this leaves an orphan backing
	// file, which the next start removes, never a volume without data.
	if err := durable.Remove(m.metaDir(), name+".json"); err != nil {
		m.mu.Unlock()
		return fmt.Errorf("delete %s: %w", name, err)
	}
	delete(m.vols, name)
	m.deleting[name] = true
	m.mu.Unlock()

	defer func() {
		m.mu.Lock()
		delete(m.deleting, name)
		m.mu.Unlock()
	}()
	if m.opts.OnDelete != nil {
		m.opts.OnDelete(v)
	}
	if err := v.close(); err != nil {
		// The data is being deleted: what did not reach it is moot.
		m.log.Warn("closing deleted volume", "volume", name, "err", err)
	}
	if v.repl != nil && v.Spec().Cluster == "" {
		// (A cluster volume's nodes each remove their own copy.)
		if err := v.repl.DeleteReplicas(); err != nil {
			m.log.Warn("some replicas could not be told to delete their copies", "volume", name, "err", err)
		}
	}
	if r := v.Spec().Replication; r != nil {
		if err := replication.RemoveFiles(m.dataDir(), name, r.Replicas); err != nil {
			m.log.Warn("removing a deleted volume's bitmaps", "volume", name, "err", err)
		}
	}
	if m.opts.Metrics != nil {
		m.opts.Metrics.Forget(name)
	}
	if err := durable.Remove(m.dataDir(), name+".img"); err != nil {
		return fmt.Errorf("delete %s: remove data: %w", name, err)
	}
	m.log.Info("volume deleted", "volume", name)
	return nil
}

// Resize grows a volume. Shrinking is refused: it would destroy data that a
// filesystem on the volume may still reference.
func (m *Registry) Resize(name string, size int64) (api.Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, err := m.healthyLocked(name)
	if err != nil {
		return api.Spec{}, err
	}
	s := v.Spec()
	if s.Attachment != nil && size != int64(s.Size) {
		return api.Spec{}, api.Errorf(api.CodeConflict, "volume %s is attached as %s; detach it first (the kernel device cannot change size while attached)", name, s.Attachment.Device)
	}
	switch {
	case size < int64(s.Size):
		return api.Spec{}, api.Errorf(api.CodeInvalid, "resize %s to %s: shrinking is not supported (current size %s); create a new volume and copy the data",
			name, units.FormatSize(size), units.FormatSize(int64(s.Size)))
	case size == int64(s.Size):
		return s, nil
	}
	s.Size = api.Size(size)
	if err := Validate(&s); err != nil {
		return api.Spec{}, err
	}
	// Grow the engine first: metadata that claims more than the engine
	// holds must never exist. A crash in between leaves a larger file
	// that the next open reads at the old size.
	if err := v.engine.Resize(size); err != nil {
		return api.Spec{}, fmt.Errorf("resize %s: %w", name, err)
	}
	if s, err = m.saveSpec(v, func(cur *api.Spec) error { cur.Size = s.Size; return nil }); err != nil {
		return api.Spec{}, fmt.Errorf("resize %s: %w", name, err)
	}
	if m.opts.Metrics != nil {
		m.opts.Metrics.SetSize(name, size)
	}
	m.log.Info("volume resized", "volume", name, "size", units.FormatSize(size))
	return s, nil
}

// Update applies fn to a volume's metadata and persists the result.
func (m *Registry) Update(name string, fn func(*api.Spec) error) (api.Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, err := m.healthyLocked(name)
	if err != nil {
		return api.Spec{}, err
	}
	old := v.Spec()
	s := old
	if err := fn(&s); err != nil {
		return api.Spec{}, err
	}
	if err := Validate(&s); err != nil {
		return api.Spec{}, err
	}
	if s.Size != old.Size || s.Name != name || s.Engine != old.Engine || s.Attachment != old.Attachment {
		return api.Spec{}, api.Errorf(api.CodeInvalid, "name, size and engine cannot be changed by update")
	}
	if v.qos != nil && s.QoS != old.QoS {
		if err := v.qos.Set(s.QoS); err != nil {
			return api.Spec{}, api.Errorf(api.CodeInvalid, "%w", err)
		}
		m.warnIdleShares(name, s.QoS)
	}
	saved, err := m.saveSpec(v, func(cur *api.Spec) error {
		cur.Profile, cur.ReadOnly, cur.QoS = s.Profile, s.ReadOnly, s.QoS
		return nil
	})
	if err != nil {
		if v.qos != nil && s.QoS != old.QoS {
			if rerr := v.qos.Set(old.QoS); rerr != nil {
				// The old limits were valid when set; this cannot
				// happen, but if it does the stage runs the new ones.
				m.log.Error("restoring QoS limits after a failed update", "volume", name, "err", rerr)
			}
		}
		return api.Spec{}, fmt.Errorf("update %s: %w", name, err)
	}
	if s.Profile != old.Profile {
		v.setProfile(s.Profile)
	}
	return saved, nil
}

// warnIdleShares logs when a volume's reservation or weight cannot act:
// they divide the node capacity, and a capacity left unlimited
// (--qos-capacity-iops/--qos-capacity-bps 0) leaves nothing to divide.
// Caps work either way.
func (m *Registry) warnIdleShares(name string, l qos.Limits) {
	c := m.opts.QoS.Capacity()
	switch {
	case l.IOPSReservation > 0 && c.IOPS == 0:
		m.log.Warn("iops reservation has no effect while the node IOPS capacity is unlimited; set --qos-capacity-iops", "volume", name)
	case l.BPSReservation > 0 && c.BPS == 0:
		m.log.Warn("bps reservation has no effect while the node bytes/s capacity is unlimited; set --qos-capacity-bps", "volume", name)
	case l.Weight > 0 && c.IOPS == 0 && c.BPS == 0:
		m.log.Warn("weight has no effect while the node capacity is unlimited; set --qos-capacity-iops or --qos-capacity-bps", "volume", name)
	}
}

// SetAttachment records (att != nil) or clears a volume's attachment.
func (m *Registry) SetAttachment(name string, att *api.Attachment) (api.Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, err := m.healthyLocked(name)
	if err != nil {
		return api.Spec{}, err
	}
	return m.saveSpec(v, func(s *api.Spec) error { s.Attachment = att; return nil })
}

// AttachedWith returns the open volumes recorded as attached with
// frontend.
func (m *Registry) AttachedWith(frontend string) []api.Spec {
	var out []api.Spec
	for _, v := range m.Volumes() {
		if _, failed := v.Failed(); failed {
			continue
		}
		if s := v.Spec(); s.Attachment != nil && s.Attachment.Frontend == frontend {
			out = append(out, s)
		}
	}
	return out
}

// Detached clears the record of a kernel device a frontend has removed.
func (m *Registry) Detached(name string, att *api.Attachment) (api.Spec, error) {
	s, err := m.SetAttachment(name, nil)
	if err != nil {
		return api.Spec{}, fmt.Errorf("detach %s: %w", name, err)
	}
	m.log.Info("volume detached", "volume", name, "device", att.Device)
	return s, nil
}

// Lookup returns an open volume by name; failed volumes are not found.
func (m *Registry) Lookup(name string) (*Volume, bool) {
	v, err := m.Get(name)
	return v, err == nil
}

// Names returns the sorted names of the open volumes (not the failed
// ones): what the NBD server exports.
func (m *Registry) Names() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]string, 0, len(m.vols))
	for n, v := range m.vols {
		if _, failed := v.Failed(); !failed && v.Role() != api.RoleReplica {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// Flush makes every volume's completed writes durable.
func (m *Registry) Flush() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var errs []error
	for _, v := range m.vols {
		if _, failed := v.Failed(); failed {
			continue
		}
		if err := v.flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", v.name, err))
		}
	}
	return errors.Join(errs...)
}

// Close flushes and closes every volume.
func (m *Registry) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closeAllLocked()
}

func (m *Registry) closeAll() { m.closeAllLocked() }

func (m *Registry) closeAllLocked() error {
	var errs []error
	for n, v := range m.vols {
		if err := v.close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", n, err))
		}
		delete(m.vols, n)
	}
	return errors.Join(errs...)
}
