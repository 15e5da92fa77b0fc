package blockd

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

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/qos"
)

// Manager is the volume registry: it owns every open volume and its
// metadata under the state dir:
//
//	STATE/volumes/NAME.json   metadata (Spec), replaced atomically
//	STATE/data/NAME.img       backing file of file-engine volumes
//
// Metadata is the source of truth: a backing file without metadata is the
// leftover of an interrupted create or delete and is removed at start.
type Manager struct {
	dir     string
	log     *slog.Logger
	metrics *Metrics
	qos     *qos.Node // nil: QoS disabled

	bg sync.WaitGroup // kernel read-ahead updates in progress

	mu   sync.RWMutex // guards vols; held across metadata changes so they are ordered
	vols map[string]*Volume
}

func (m *Manager) metaDir() string { return filepath.Join(m.dir, "volumes") }
func (m *Manager) dataDir() string { return filepath.Join(m.dir, "data") }

// DataPath returns the backing file of a file-engine volume.
func (m *Manager) DataPath(name string) string {
	return filepath.Join(m.dataDir(), name+".img")
}

// OpenManager loads every volume recorded in dir, creating the layout if
// needed. metrics may be nil.
func OpenManager(dir string, log *slog.Logger, metrics *Metrics) (*Manager, error) {
	return openManager(dir, log, metrics, nil)
}

func openManager(dir string, log *slog.Logger, metrics *Metrics, qn *qos.Node) (*Manager, error) {
	m := &Manager{dir: dir, log: log, metrics: metrics, qos: qn, vols: map[string]*Volume{}}
	for _, d := range []string{dir, m.metaDir(), m.dataDir()} {
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
		if strings.HasPrefix(n, ".") {
			// a temp file of a write that never reached its rename
			os.Remove(filepath.Join(m.metaDir(), n))
			continue
		}
		if !strings.HasSuffix(n, ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.metaDir(), n))
		if err != nil {
			m.closeAll()
			return nil, fmt.Errorf("load volume %s: %w", n, err)
		}
		var s Spec
		if err := json.Unmarshal(b, &s); err != nil {
			m.closeAll()
			return nil, fmt.Errorf("load volume %s: corrupt metadata: %w", n, err)
		}
		if err := s.validate(); err != nil || s.Name+".json" != n {
			m.closeAll()
			return nil, fmt.Errorf("load volume %s: bad metadata: %v", n, err)
		}
		v, err := m.open(s)
		if err != nil {
			m.closeAll()
			return nil, fmt.Errorf("load volume %s: %w", s.Name, err)
		}
		m.vols[s.Name] = v
		log.Info("volume loaded", "volume", s.Name, "size", FormatSize(s.Size), "engine", s.Engine)
	}
	data, err := os.ReadDir(m.dataDir())
	if err != nil {
		m.closeAll()
		return nil, fmt.Errorf("state dir: %w", err)
	}
	for _, e := range data {
		name := strings.TrimSuffix(e.Name(), ".img")
		if _, ok := m.vols[name]; ok {
			continue
		}
		log.Warn("removing backing file without metadata (interrupted create or delete)", "file", e.Name())
		if err := removeFileDurable(m.dataDir(), e.Name()); err != nil {
			m.closeAll()
			return nil, fmt.Errorf("state dir: %w", err)
		}
	}
	return m, nil
}

// open opens the engine of s and builds its pipeline.
func (m *Manager) open(s Spec) (*Volume, error) {
	e, err := ioengine.Open(s.Engine, m.DataPath(s.Name), s.Size)
	if err != nil {
		return nil, err
	}
	v := &Volume{name: s.Name, engine: e, spec: s}
	v.readOnly.Store(s.ReadOnly)
	stages := []pipeline.Stage{}
	if m.metrics != nil {
		stages = append(stages, m.metrics.stage(s.Name, e))
	}
	stages = append(stages, readOnlyStage(v))
	if m.qos != nil {
		if v.qos, err = m.qos.Volume(s.Name, s.QoS); err != nil {
			e.Close()
			return nil, err
		}
		stages = append(stages, v.qos.Stage())
		m.warnIdleShares(s.Name, s.QoS)
	}
	v.prof = m.newProfileStage(v, s, e) // io_profile: last before the engine
	stages = append(stages, v.prof.Wrap)
	v.pipe = pipeline.Chain(ioengine.Handler(e), stages...)
	v.inMemory = s.Engine == ioengine.KindMemory
	return v, nil
}

func (m *Manager) persist(s Spec) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(m.metaDir(), s.Name+".json", append(b, '\n'))
}

// Create makes a new volume. It returns once the volume's metadata is
// durable.
func (m *Manager) Create(s Spec) (Spec, error) {
	if err := s.validate(); err != nil {
		return Spec{}, err
	}
	s.CreatedAt = time.Now().UTC().Truncate(time.Second)
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.vols[s.Name]; ok {
		return Spec{}, fmt.Errorf("volume %q: %w", s.Name, ErrExists)
	}
	// A backing file without metadata is garbage from an interrupted
	// create or delete: never hand its old data to a new volume.
	if err := removeFileDurable(m.dataDir(), s.Name+".img"); err != nil {
		return Spec{}, fmt.Errorf("create %s: %w", s.Name, err)
	}
	v, err := m.open(s)
	if err != nil {
		return Spec{}, fmt.Errorf("create %s: %w", s.Name, err)
	}
	if s.Engine == ioengine.KindFile {
		if err := syncDir(m.dataDir()); err != nil {
			v.close()
			return Spec{}, fmt.Errorf("create %s: %w", s.Name, err)
		}
	}
	if err := m.persist(s); err != nil {
		v.close()
		removeFileDurable(m.dataDir(), s.Name+".img")
		return Spec{}, fmt.Errorf("create %s: %w", s.Name, err)
	}
	m.vols[s.Name] = v
	m.log.Info("volume created", "volume", s.Name, "size", FormatSize(s.Size), "engine", s.Engine, "profile", s.Profile)
	return s, nil
}

// Get returns an open volume.
func (m *Manager) Get(name string) (*Volume, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	v, ok := m.vols[name]
	if !ok {
		return nil, fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	return v, nil
}

// List returns every volume's metadata, sorted by name.
func (m *Manager) List() []Spec {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]Spec, 0, len(m.vols))
	for _, v := range m.vols {
		out = append(out, v.Spec())
	}
	slices.SortFunc(out, func(a, b Spec) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Delete removes a volume and its data. Requests still in flight finish
// first; later ones fail.
func (m *Manager) Delete(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[name]
	if !ok {
		return fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	if a := v.Spec().Attachment; a != nil {
		return fmt.Errorf("delete %s: %w: volume is attached as %s; detach it first", name, ErrConflict, a.Device)
	}
	// Metadata goes first: a crash after this leaves an orphan backing
	// file, which the next start removes, never a volume without data.
	if err := removeFileDurable(m.metaDir(), name+".json"); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	delete(m.vols, name)
	if err := v.close(); err != nil {
		m.log.Warn("closing deleted volume", "volume", name, "err", err)
	}
	if m.metrics != nil {
		m.metrics.forget(name)
	}
	if err := removeFileDurable(m.dataDir(), name+".img"); err != nil {
		return fmt.Errorf("delete %s: remove data: %w", name, err)
	}
	m.log.Info("volume deleted", "volume", name)
	return nil
}

// Resize grows a volume. Shrinking is refused: it would destroy data that a
// filesystem on the volume may still reference.
func (m *Manager) Resize(name string, size int64) (Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[name]
	if !ok {
		return Spec{}, fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	s := v.Spec()
	if s.Attachment != nil && size != s.Size {
		return Spec{}, fmt.Errorf("resize %s: %w: volume is attached as %s; detach it first (the kernel device cannot change size while attached)", name, ErrConflict, s.Attachment.Device)
	}
	switch {
	case size < s.Size:
		return Spec{}, fmt.Errorf("%w: resize %s to %s: shrinking is not supported (current size %s); create a new volume and copy the data",
			ErrInvalid, name, FormatSize(size), FormatSize(s.Size))
	case size == s.Size:
		return s, nil
	}
	s.Size = size
	if err := s.validate(); err != nil {
		return Spec{}, err
	}
	// Grow the engine first: metadata that claims more than the engine
	// holds must never exist. A crash in between leaves a larger file
	// that the next open reads at the old size.
	if err := v.engine.Resize(size); err != nil {
		return Spec{}, fmt.Errorf("resize %s: %w", name, err)
	}
	if err := m.persist(s); err != nil {
		return Spec{}, fmt.Errorf("resize %s: %w", name, err)
	}
	v.mu.Lock()
	v.spec = s
	v.mu.Unlock()
	if m.metrics != nil {
		m.metrics.setSize(name, size)
	}
	m.log.Info("volume resized", "volume", name, "size", FormatSize(size))
	return s, nil
}

// Update applies fn to a volume's metadata and persists the result.
func (m *Manager) Update(name string, fn func(*Spec) error) (Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[name]
	if !ok {
		return Spec{}, fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	s := v.Spec()
	if err := fn(&s); err != nil {
		return Spec{}, err
	}
	if err := s.validate(); err != nil {
		return Spec{}, err
	}
	old := v.Spec()
	if s.Size != old.Size || s.Name != name || s.Engine != old.Engine || s.Attachment != old.Attachment {
		return Spec{}, fmt.Errorf("%w: name, size and engine cannot be changed by update", ErrInvalid)
	}
	if v.qos != nil && s.QoS != old.QoS {
		if err := v.qos.Set(s.QoS); err != nil {
			return Spec{}, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		m.warnIdleShares(name, s.QoS)
	}
	if err := m.persist(s); err != nil {
		if v.qos != nil {
			v.qos.Set(old.QoS)
		}
		return Spec{}, fmt.Errorf("update %s: %w", name, err)
	}
	v.mu.Lock()
	v.spec = s
	v.mu.Unlock()
	v.readOnly.Store(s.ReadOnly)
	if s.Profile != old.Profile {
		v.setProfile(s.Profile)
	}
	return s, nil
}

// warnIdleShares logs when a volume's reservation or weight cannot act:
// they divide the node capacity, and a capacity left unlimited
// (--qos-capacity-iops/--qos-capacity-bps 0) leaves nothing to divide.
// Caps work either way.
func (m *Manager) warnIdleShares(name string, l qos.Limits) {
	c := m.qos.Capacity()
	switch {
	case l.IOPSReservation > 0 && c.IOPS == 0:
		m.log.Warn("iops reservation has no effect while the node IOPS capacity is unlimited; set --qos-capacity-iops", "volume", name)
	case l.BPSReservation > 0 && c.BPS == 0:
		m.log.Warn("bps reservation has no effect while the node bytes/s capacity is unlimited; set --qos-capacity-bps", "volume", name)
	case l.Weight > 0 && c.IOPS == 0 && c.BPS == 0:
		m.log.Warn("weight has no effect while the node capacity is unlimited; set --qos-capacity-iops or --qos-capacity-bps", "volume", name)
	}
}

// setAttachment records (att != nil) or clears a volume's attachment.
func (m *Manager) setAttachment(name string, att *Attachment) (Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[name]
	if !ok {
		return Spec{}, fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	s := v.Spec()
	s.Attachment = att
	if err := m.persist(s); err != nil {
		return Spec{}, err
	}
	v.mu.Lock()
	v.spec = s
	v.mu.Unlock()
	return s, nil
}

// attachedWith returns the volumes recorded as attached with frontend.
func (m *Manager) attachedWith(frontend string) []Spec {
	var out []Spec
	for _, s := range m.List() {
		if s.Attachment != nil && s.Attachment.Frontend == frontend {
			out = append(out, s)
		}
	}
	return out
}

// detached clears the record of a kernel device a frontend has removed.
func (m *Manager) detached(name string, att *Attachment) (Spec, error) {
	s, err := m.setAttachment(name, nil)
	if err != nil {
		return Spec{}, fmt.Errorf("detach %s: %w", name, err)
	}
	m.log.Info("volume detached", "volume", name, "device", att.Device)
	return s, nil
}

// lookup returns an open volume by name.
func (m *Manager) lookup(name string) (*Volume, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	v, ok := m.vols[name]
	return v, ok
}

// Names returns the sorted volume names.
func (m *Manager) Names() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]string, 0, len(m.vols))
	for n := range m.vols {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Flush makes every volume's completed writes durable.
func (m *Manager) Flush() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	var errs []error
	for _, v := range m.vols {
		if err := v.flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", v.name, err))
		}
	}
	return errors.Join(errs...)
}

// Close flushes and closes every volume.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closeAllLocked()
}

func (m *Manager) closeAll() { m.closeAllLocked() }

func (m *Manager) closeAllLocked() error {
	// A read-ahead write waits for the device's queue to drain; do not
	// let one stuck behind a dead device hold up shutdown for long.
	done := make(chan struct{})
	go func() { m.bg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		m.log.Warn("a kernel read-ahead update is still blocked; closing anyway")
	}
	var errs []error
	for n, v := range m.vols {
		if err := v.close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", n, err))
		}
		delete(m.vols, n)
	}
	return errors.Join(errs...)
}
