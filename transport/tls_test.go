package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// otherCA is a CA the cluster does not trust.
var otherCAOnce = sync.OnceValues(func() (*CA, error) { return GenerateCA("someone else's CA", time.Hour) })

func otherCA(t testing.TB) *CA { return caOf(t, otherCAOnce) }

func issue(t testing.TB, ca *CA, name string) tls.Certificate {
	t.Helper()
	c, err := ca.Issue(name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRefused: every way of failing mutual TLS fails the call with
// ErrRefused, delivers nothing, and the refusing side says why.
func TestRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		// setup changes the configurations of the caller a and the callee
		// b; b's address is filled in after.
		setup func(t *testing.T, a, b *Config)
		// the refusing side's log (serverLog: b's) or the call error
		serverLog string
		callErr   string
	}{{
		name:      "client cert of another CA",
		setup:     func(t *testing.T, a, b *Config) { a.Cert = issue(t, otherCA(t), "a") },
		serverLog: "certificate signed by unknown authority",
	}, {
		name:    "server cert of another CA",
		setup:   func(t *testing.T, a, b *Config) { b.Cert = issue(t, otherCA(t), "b") },
		callErr: "certificate signed by unknown authority",
	}, {
		name: "client names a node that is not a peer",
		setup: func(t *testing.T, a, b *Config) {
			a.Node, a.Cert = "c", nodeCert(t, "c")
		},
		serverLog: `client certificate names "c": not a configured peer`,
	}, {
		name: "server names another node",
		setup: func(t *testing.T, a, b *Config) {
			b.Node, b.Cert = "c", nodeCert(t, "c")
		},
		callErr: `server certificate names "c", not "b"`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			h := &echo{}
			bcfg := testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
			acfg := testConfig(t, "a", nil, nil)
			acfg.Listen = ""
			tc.setup(t, &acfg, &bcfg)
			b := start(t, bcfg)
			acfg.Peers = map[string]string{"b": b.Addr().String()}
			a := start(t, acfg)

			_, _, err := call(a, &Header{Type: 1}, []byte("write"))
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("call: %v, want ErrRefused", err)
			}
			if tc.callErr != "" && !strings.Contains(err.Error(), tc.callErr) {
				t.Errorf("call error %q does not say %q", err, tc.callErr)
			}
			if tc.serverLog != "" {
				recorderOf(bcfg).waitLog(t, "refused connection", tc.serverLog)
			}
			if n := h.count(); len(n) != 0 {
				t.Errorf("handler saw %v", n)
			}
		})
	}
}

// TestRefusedRawClients: clients that are not blockd nodes (no client
// certificate, another ALPN) are refused with the reason logged.
func TestRefusedRawClients(t *testing.T) {
	h := &echo{}
	bcfg := testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
	b := start(t, bcfg)
	for _, tc := range []struct {
		name   string
		tls    *tls.Config
		reason string
	}{{
		name:   "no client certificate",
		tls:    &tls.Config{RootCAs: mustCA(t).Pool(), ServerName: "b", NextProtos: []string{ALPN}},
		reason: "certificate",
	}, {
		name: "another application protocol",
		tls: &tls.Config{RootCAs: mustCA(t).Pool(), ServerName: "b", NextProtos: []string{"h3"},
			Certificates: []tls.Certificate{nodeCert(t, "a")}},
		reason: "application protocol",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := rawCall(ctx, t, b.Addr(), tc.tls)
			var te *quic.TransportError
			if !errors.As(err, &te) || !te.ErrorCode.IsCryptoError() {
				t.Fatalf("raw client: %v, want a TLS alert", err)
			}
			recorderOf(bcfg).waitLog(t, "refused connection", tc.reason)
		})
	}
	if n := h.count(); len(n) != 0 {
		t.Errorf("handler saw %v", n)
	}
}

// rawCall dials addr with tlsConf and sends one well-formed request.
func rawCall(ctx context.Context, t *testing.T, addr net.Addr, tlsConf *tls.Config) error {
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: udp}
	defer udp.Close()
	defer tr.Close()
	qc, err := tr.Dial(ctx, addr, tlsConf, &quic.Config{})
	if err != nil {
		return err
	}
	defer qc.CloseWithError(0, "")
	s, err := qc.OpenStreamSync(ctx)
	if err != nil {
		return err
	}
	codec := newFrameCodec()
	if err := writeFrame(s, codec, 1, &Header{Type: 1}, []byte("x")); err != nil {
		return err
	}
	s.Close()
	var h Header
	_, _, err = codec.readHeader(s, &h, 1<<20)
	return err
}

func TestAcceptAnyNode(t *testing.T) {
	seen := make(chan string, 10)
	h := HandlerFunc(func(ctx context.Context, peer string, req *Header, payload []byte, resp *Header) ([]byte, error) {
		seen <- peer
		return nil, nil
	})
	bcfg := testConfig(t, "b", nil, h)
	bcfg.AcceptAnyNode = true
	b := start(t, bcfg)
	ccfg := testConfig(t, "c", map[string]string{"b": b.Addr().String()}, nil)
	ccfg.Listen = ""
	c := start(t, ccfg)
	if _, _, err := call(c, &Header{Type: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 1 || <-seen != "c" {
		t.Errorf("handler saw %d calls or not from c", len(seen)+1)
	}
}

// TestCommonNameOnly: a certificate that names its node only in the
// subject CN (no SAN) is accepted in both directions.
func TestCommonNameOnly(t *testing.T) {
	cnOnly := func(name string) tls.Certificate {
		ca := mustCA(t)
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(time.Now().UnixNano()),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    time.Now().Add(-time.Minute),
			NotAfter:     time.Now().Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	}
	h := &echo{}
	bcfg := testConfig(t, "b", map[string]string{"a": "127.0.0.1:1"}, h)
	bcfg.Cert = cnOnly("b")
	b := start(t, bcfg)
	acfg := testConfig(t, "a", map[string]string{"b": b.Addr().String()}, nil)
	acfg.Listen, acfg.Cert = "", cnOnly("a")
	a := start(t, acfg)
	if _, _, err := call(a, &Header{Type: 1}, nil); err != nil {
		t.Fatal(err)
	}
	if n := h.count(); n["a"] != 1 {
		t.Errorf("handler saw %v", n)
	}
}

func TestConfigChecks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(c *Config)
		want   string
	}{
		{"certificate of another node", func(c *Config) { c.Cert = nodeCert(t, "c") }, `certificate names "c", not node "b"`},
		{"no handler", func(c *Config) { c.Handler = nil }, "Listen without a Handler"},
		{"no reset key secret", func(c *Config) { c.ResetKeySecret = nil }, "ResetKeySecret"},
		{"no CA", func(c *Config) { c.CA = nil }, "no cluster CA"},
		{"bad peer address", func(c *Config) { c.Peers = map[string]string{"a": "nowhere"} }, "peer a"},
		{"payload limit", func(c *Config) { c.MaxPayload = 1 << 30 }, "MaxPayload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, "b", nil, &echo{})
			tc.change(&cfg)
			tr, err := New(cfg)
			if err == nil {
				tr.Close()
				t.Fatal("New accepted the configuration")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

func TestLoadTLS(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ca := mustCA(t)
	caPEM, _, err := ca.PEM()
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := CertPEM(nodeCert(t, "a"))
	if err != nil {
		t.Fatal(err)
	}
	_, otherKeyPEM, err := CertPEM(nodeCert(t, "b"))
	if err != nil {
		t.Fatal(err)
	}
	otherCertPEM, otherCertKeyPEM, err := CertPEM(issue(t, otherCA(t), "a"))
	if err != nil {
		t.Fatal(err)
	}
	caFile := write("ca.pem", caPEM)
	certFile := write("a.pem", certPEM)
	keyFile := write("a.key", keyPEM)

	pool, cert, err := LoadTLS(caFile, certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("loaded certificate does not verify against the loaded CA: %v", err)
	}

	for _, tc := range []struct {
		name          string
		ca, cert, key string
		is            error
		mentions      string
	}{
		{"missing CA file", filepath.Join(dir, "nope.pem"), certFile, keyFile, fs.ErrNotExist, "nope.pem"},
		{"missing key file", caFile, certFile, filepath.Join(dir, "nope.key"), fs.ErrNotExist, "nope.key"},
		{"CA not PEM", write("junk.pem", []byte("hello")), certFile, keyFile, ErrNotPEM, "junk.pem"},
		{"key in the cert file", caFile, keyFile, keyFile, ErrNotPEM, "a.key"},
		{"key of another cert", caFile, certFile, write("b.key", otherKeyPEM), ErrKeyMismatch, "b.key"},
		{"cert of another CA", caFile, write("x.pem", otherCertPEM), write("x.key", otherCertKeyPEM), ErrNotSignedByCA, "x.pem"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := LoadTLS(tc.ca, tc.cert, tc.key)
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.mentions) {
				t.Errorf("LoadTLS: %v, want %v naming %s", err, tc.is, tc.mentions)
			}
		})
	}
}
