package transport

import (
	"context"
	"crypto/tls"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests listen on loopback only, dial-only transports included.
func init() { dialOnlyAddr = "127.0.0.1:0" }

// One CA and one certificate per node name for the whole test binary:
// key generation is the slow part of a test.
var (
	testCA    = sync.OnceValues(func() (*CA, error) { return GenerateCA("blockd test CA", time.Hour) })
	certsMu   sync.Mutex
	certCache = map[string]tls.Certificate{}
)

func mustCA(t testing.TB) *CA { return caOf(t, testCA) }

func caOf(t testing.TB, once func() (*CA, error)) *CA {
	t.Helper()
	ca, err := once()
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// call makes one call to peer "b" with a deadline of 10s.
func call(tr *Transport, req *Header, payload []byte) (resp Header, out []byte, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err = tr.Call(ctx, "b", req, payload, &resp, nil)
	return resp, out, err
}

func nodeCert(t testing.TB, name string) tls.Certificate {
	t.Helper()
	certsMu.Lock()
	defer certsMu.Unlock()
	if c, ok := certCache[name]; ok {
		return c
	}
	c, err := mustCA(t).Issue(name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certCache[name] = c
	return c
}

// logRecorder is a slog.Handler that keeps every record, so that tests can
// check what was logged; it also passes them to t.Log while the test runs.
type logRecorder struct {
	mu   sync.Mutex
	recs []string
	t    testing.TB
	done bool
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }

func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Level.String() + " " + r.Message)
	r.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.Key + "=" + a.Value.String())
		return true
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, b.String())
	if !l.done {
		l.t.Log(b.String())
	}
	return nil
}

// find returns the first record containing every one of parts.
func (l *logRecorder) find(parts ...string) (string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.recs {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(r, p) }) {
			return r, true
		}
	}
	return "", false
}

// waitLog waits (at most 5s) for a record containing every one of parts.
func (l *logRecorder) waitLog(t testing.TB, parts ...string) string {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if r, ok := l.find(parts...); ok {
			return r
		}
	}
	t.Fatalf("no log record with %q", parts)
	return ""
}

func newLog(t testing.TB) (*slog.Logger, *logRecorder) {
	l := &logRecorder{t: t}
	t.Cleanup(func() {
		l.mu.Lock()
		l.done = true
		l.mu.Unlock()
	})
	return slog.New(l), l
}

// testConfig is a node on 127.0.0.1 with its own certificate of the test
// CA; peers maps names to addresses ("" for a peer that only calls in).
func testConfig(t testing.TB, name string, peers map[string]string, h Handler) Config {
	t.Helper()
	logger, _ := newLog(t)
	return Config{
		Node:           name,
		Listen:         "127.0.0.1:0",
		Peers:          peers,
		CA:             mustCA(t).Pool(),
		Cert:           nodeCert(t, name),
		ResetKeySecret: []byte("key file hash of " + name),
		Handler:        h,
		Logger:         logger,
	}
}

func start(t testing.TB, cfg Config) *Transport {
	t.Helper()
	tr, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

// recorderOf returns the logRecorder behind a testConfig's logger.
func recorderOf(cfg Config) *logRecorder { return cfg.Logger.Handler().(*logRecorder) }

// echo answers every request with its own header (Status from Aux[3]) and
// payload, and counts the calls per peer.
type echo struct {
	mu    sync.Mutex
	calls map[string]int
}

func (e *echo) ServeMessage(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
	e.mu.Lock()
	if e.calls == nil {
		e.calls = map[string]int{}
	}
	e.calls[peer]++
	e.mu.Unlock()
	*resp = *req
	resp.Status = uint16(req.Aux[3])
	return payload, nil
}

func (e *echo) count() map[string]int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return maps.Clone(e.calls)
}

// pair starts node b serving h and node a that calls it; a is also a
// configured peer of b.
func pair(t testing.TB, h Handler) (a, b *Transport, acfg, bcfg Config) {
	t.Helper()
	bcfg = testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
	b = start(t, bcfg)
	acfg = testConfig(t, "a", map[string]string{"b": b.Addr().String()}, &echo{})
	a = start(t, acfg)
	return a, b, acfg, bcfg
}

func payloadOf(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7)
	}
	return p
}
