package transport

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
)

// ALPN is the TLS application protocol of blockd replication, version 1.
// Any change to the frame or Header layout is a new version.
const ALPN = "blockd-repl/1"

// certNames returns the node names a certificate carries: its subject CN
// and its DNS SANs.
func certNames(c *x509.Certificate) []string {
	names := make([]string, 0, 1+len(c.DNSNames))
	if c.Subject.CommonName != "" {
		names = append(names, c.Subject.CommonName)
	}
	for _, n := range c.DNSNames {
		if n != c.Subject.CommonName {
			names = append(names, n)
		}
	}
	return names
}

// serverTLS is the listener's TLS configuration: TLS 1.3, mutual TLS
// against the cluster CA (crypto/tls checks the chain and the client-auth
// key usage), and a client certificate that names a configured peer.
func (t *Transport) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{t.cfg.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    t.cfg.CA,
		RootCAs:      t.cfg.CA,
		NextProtos:   []string{ALPN},
		// Connections live long; resumption would buy little, and without
		// tickets there is no 0-RTT to refuse.
		SessionTicketsDisabled: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no client certificate")
			}
			if _, ok := t.peerName(cs.PeerCertificates[0]); !ok {
				return fmt.Errorf("client certificate names %s: not a configured peer", quoteNames(cs.PeerCertificates[0]))
			}
			return nil
		},
	}
}

// peerName returns the name under which an authenticated client is
// served: the first of the certificate's names that is a configured peer,
// or with AcceptAnyNode its first name.
func (t *Transport) peerName(c *x509.Certificate) (string, bool) {
	names := certNames(c)
	for _, n := range names {
		if t.peer(n) != nil {
			return n, true
		}
	}
	if t.cfg.AcceptAnyNode && len(names) > 0 {
		return names[0], true
	}
	return "", false
}

// clientTLS is the configuration for dialing peer: the server must present
// a certificate of the cluster CA, usable for server auth, that names
// peer in its CN or a DNS SAN. crypto/tls's own check would accept only a
// DNS SAN, so the chain and the name are verified here, in
// VerifyConnection; InsecureSkipVerify only turns the built-in check off.
func (t *Transport) clientTLS(peer string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Present the node certificate even when the server's list of
		// acceptable CAs does not name its issuer (crypto/tls would then
		// send none), so that the server logs the true reason of a refusal.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &t.cfg.Cert, nil
		},
		RootCAs:            t.cfg.CA,
		NextProtos:         []string{ALPN},
		ServerName:         peer,
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			leaf := cs.PeerCertificates[0]
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := leaf.Verify(x509.VerifyOptions{
				Roots:         t.cfg.CA,
				Intermediates: inter,
				KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			})
			if err != nil {
				return fmt.Errorf("server certificate of %s: %w", peer, err)
			}
			if !slices.Contains(certNames(leaf), peer) {
				return fmt.Errorf("server certificate names %s, not %q", quoteNames(leaf), peer)
			}
			return nil
		},
	}
}

func quoteNames(c *x509.Certificate) string {
	names := certNames(c)
	if len(names) == 0 {
		return "no name"
	}
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q, ", ")
}

// Errors of LoadTLS, besides those of reading a file (errors.Is(err,
// fs.ErrNotExist) for a missing one).
var (
	ErrNotPEM        = errors.New("not PEM")
	ErrKeyMismatch   = errors.New("private key does not match the certificate")
	ErrNotSignedByCA = errors.New("certificate not signed by the cluster CA")
)

// LoadTLS reads the cluster CA certificate(s), this node's certificate
// (chain) and its private key from PEM files, and checks that the key
// belongs to the certificate and that the CA signed the certificate.
func LoadTLS(caFile, certFile, keyFile string) (*x509.CertPool, tls.Certificate, error) {
	read := func(what, file, blockType string) ([]byte, error) {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", what, err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s %s: %w", what, file, ErrNotPEM)
		}
		if blockType != "" && blk.Type != blockType {
			return nil, fmt.Errorf("%s %s: PEM block %q, want %q: %w", what, file, blk.Type, blockType, ErrNotPEM)
		}
		return b, nil
	}
	caPEM, err := read("CA file", caFile, "CERTIFICATE")
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	certPEM, err := read("certificate file", certFile, "CERTIFICATE")
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	keyPEM, err := read("key file", keyFile, "")
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, tls.Certificate{}, fmt.Errorf("CA file %s: no parsable certificate: %w", caFile, ErrNotPEM)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		if keyMismatch(certPEM, keyPEM) {
			return nil, tls.Certificate{}, fmt.Errorf("certificate %s and key %s: %w", certFile, keyFile, ErrKeyMismatch)
		}
		return nil, tls.Certificate{}, fmt.Errorf("certificate %s and key %s: %w", certFile, keyFile, err)
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, tls.Certificate{}, fmt.Errorf("certificate file %s: %w", certFile, err)
		}
		inter.AddCert(c)
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("certificate %s, CA %s: %w: %w", certFile, caFile, ErrNotSignedByCA, err)
	}
	return pool, cert, nil
}

// keyMismatch reports whether the first certificate and the key in these
// PEM blocks both parse and the key is not the certificate's (crypto/tls
// says so only in an error message).
func keyMismatch(certPEM, keyPEM []byte) bool {
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return false
	}
	leaf, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return false
	}
	var key any
	if key, err = x509.ParsePKCS8PrivateKey(kb.Bytes); err != nil {
		if key, err = x509.ParseECPrivateKey(kb.Bytes); err != nil {
			if key, err = x509.ParsePKCS1PrivateKey(kb.Bytes); err != nil {
				return false
			}
		}
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return false
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && !pub.Equal(leaf.PublicKey)
}
