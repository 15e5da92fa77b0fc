package cluster

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/blockd/blockd/internal/durable"
)

// DefaultPrefix is where a cluster keeps its keys in etcd.
const DefaultPrefix = "/blockd/"

// DefaultLeaseTTL is a node's lease: how long after a node dies or is cut
// off from etcd another node may take its volumes over, and how long an
// etcd outage the node's volumes ride through without stopping.
const DefaultLeaseTTL = 30 * time.Second

// Config joins a node to a cluster.
type Config struct {
	// Endpoints are etcd's client URLs.
	Endpoints []string
	// TLS, if set, is used to reach etcd (its CA, a client certificate).
	TLS *tls.Config
	// Prefix holds every key of the cluster (default DefaultPrefix).
	Prefix string
	// Node is this node's name.
	Node string
	// Dir is the node's state dir: Dir/cluster.json remembers the cluster
	// it joined and its lease, so a restarted daemon keeps both.
	Dir string
	// LeaseTTL is the node's lease (default DefaultLeaseTTL, at least
	// 2s; etcd counts whole seconds).
	LeaseTTL time.Duration
	// DialTimeout bounds reaching etcd at start (default 10s).
	DialTimeout time.Duration
	// Log receives the cluster's events (default slog.Default()).
	Log *slog.Logger
}

// Store is a node's handle on the cluster's keys.
type Store struct {
	cli  *clientv3.Client
	cfg  Config
	p    string
	id   string
	log  *slog.Logger
	file localFile
}

// localFile is Dir/cluster.json.
type localFile struct {
	Cluster string `json:"cluster"`
	Node    string `json:"node"`
	Lease   int64  `json:"lease,omitempty"`
}

// ErrUnreachable: etcd did not answer.
var ErrUnreachable = errors.New("cluster store (etcd) unreachable")

// Open connects to etcd and joins the cluster under cfg.Prefix, making it
// if this is its first node. It refuses a store that holds another
// cluster than the one this node's state dir belongs to, and an empty
// store when the node belonged to one: its volumes would look deleted.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("cluster: no etcd endpoints")
	}
	if cfg.Node == "" {
		return nil, errors.New("cluster: no node name")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		cfg.Prefix += "/"
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseTTL < 2*time.Second {
		return nil, fmt.Errorf("cluster: lease TTL %s is below 2s", cfg.LeaseTTL)
	}
	cfg.LeaseTTL = cfg.LeaseTTL.Round(time.Second)
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: cfg.Endpoints, TLS: cfg.TLS, DialTimeout: cfg.DialTimeout,
		DialKeepAliveTime: 5 * time.Second, DialKeepAliveTimeout: 3 * time.Second,
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: etcd client: %w", err)
	}
	s := &Store{cli: cli, cfg: cfg, p: cfg.Prefix, log: cfg.Log}
	if err := s.join(ctx); err != nil {
		cli.Close()
		return nil, err
	}
	return s, nil
}

// join reads or makes the cluster's id and checks it against the node's.
func (s *Store) join(ctx context.Context) error {
	path := filepath.Join(s.cfg.Dir, "cluster.json")
	switch b, err := os.ReadFile(path); {
	case err == nil:
		if err := json.Unmarshal(b, &s.file); err != nil {
			return fmt.Errorf("cluster: %s is corrupt: %v (move it away to join as a new node, which forgets the node's cluster volumes)", path, err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("cluster: %w", err)
	}
	if s.file.Node != "" && s.file.Node != s.cfg.Node {
		return fmt.Errorf("cluster: the state dir belongs to node %s, not %s", s.file.Node, s.cfg.Node)
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	key := s.p + "cluster"
	var id [16]byte
	rand.Read(id[:])
	mine := hex.EncodeToString(id[:])
	if s.file.Cluster != "" {
		mine = s.file.Cluster
	}
	resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, mine)).Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return fmt.Errorf("cluster: joining through etcd at %s: %w (%w)", strings.Join(s.cfg.Endpoints, ","), err, ErrUnreachable)
	}
	s.id = mine
	if resp.Succeeded {
		if s.file.Cluster != "" {
			// The node's cluster vanished from the store: refuse
			// rather than delete its volumes as unknown.
			s.cli.Delete(ctx, key)
			return fmt.Errorf("cluster: this node belongs to cluster %s, but etcd at %s holds no cluster under %s; "+
				"if etcd lost its data, restore it; to join a new cluster, move %s away (the node's cluster volumes are then forgotten)",
				s.file.Cluster, strings.Join(s.cfg.Endpoints, ","), s.p, path)
		}
		s.log.Info("made a new cluster", "cluster", s.id, "prefix", s.p)
	} else {
		s.id = string(resp.Responses[0].GetResponseRange().Kvs[0].Value)
		if s.file.Cluster != "" && s.file.Cluster != s.id {
			return fmt.Errorf("cluster: this node belongs to cluster %s; etcd at %s holds cluster %s under %s",
				s.file.Cluster, strings.Join(s.cfg.Endpoints, ","), s.id, s.p)
		}
	}
	s.file.Cluster, s.file.Node = s.id, s.cfg.Node
	return s.saveFile()
}

func (s *Store) saveFile() error {
	b, err := json.MarshalIndent(s.file, "", "  ")
	if err != nil {
		return err
	}
	if err := durable.WriteFile(s.cfg.Dir, "cluster.json", append(b, '\n')); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	return nil
}

// ID is the cluster's id.
func (s *Store) ID() string { return s.id }

// Node is this node's name.
func (s *Store) Node() string { return s.cfg.Node }

// LeaseTTL is the node's lease TTL.
func (s *Store) LeaseTTL() time.Duration { return s.cfg.LeaseTTL }

// Close closes the connection to etcd.
func (s *Store) Close() error { return s.cli.Close() }

func (s *Store) key(kind, name string) string { return s.p + kind + "/" + name }

// call bounds one etcd request: long enough for a healthy cluster, short
// enough that a caller learns of an outage and decides.
func (s *Store) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 5*time.Second)
}

// unreachable wraps an etcd error.
func unreachable(err error) error {
	if errors.Is(err, context.Canceled) {
		return err
	}
	return fmt.Errorf("%w: %v", ErrUnreachable, err)
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // the package's own types always marshal
	}
	return string(b)
}
