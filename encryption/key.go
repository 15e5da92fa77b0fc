package encryption

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
)

// KEKSize is the size of a key-encryption key: an AES-256 key.
const KEKSize = 32

// MinSecretSize is the shortest secret a volume's KEK may be derived
// from. The derivation (HKDF-SHA256) does not stretch: the secret must be
// random, like the output of `openssl rand -base64 32`, not a passphrase.
const MinSecretSize = 32

// ErrKey classifies every failure to get at a volume's data key: no KEK,
// the wrong KEK, a damaged or destroyed wrapped key. The volume refuses
// to open, and nothing is written.
var ErrKey = errors.New("encryption key")

// KEK is a key-encryption key: it wraps volumes' data keys and never
// touches data.
type KEK struct {
	key []byte
	id  string
	// Path is the file the KEK was read from ("" for one derived from a
	// secret).
	Path string
}

// ID is the KEK's public name: the first 8 bytes of a SHA-256 of the key,
// in hex. It tells which KEK wrapped a data key without revealing it.
func (k *KEK) ID() string { return k.id }

func newKEK(key []byte, path string) *KEK {
	h := sha256.New()
	h.Write([]byte("blockd kek id\x00"))
	h.Write(key)
	return &KEK{key: key, id: hex.EncodeToString(h.Sum(nil)[:8]), Path: path}
}

// NewKEK returns the KEK of a 32-byte key.
func NewKEK(key []byte) (*KEK, error) {
	if len(key) != KEKSize {
		return nil, fmt.Errorf("%w: a KEK has %d bytes, not %d", ErrKey, KEKSize, len(key))
	}
	return newKEK(bytes.Clone(key), ""), nil
}

// LoadKEKFile reads a KEK file: 32 bytes, raw or as 64 hex digits (a
// trailing newline allowed). The file must be a regular file owned by
// the user the daemon runs as and readable by nobody else (mode 0600 or
// stricter): a KEK anyone else can read protects nothing.
func LoadKEKFile(path string) (*KEK, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kek file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("kek file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("kek file %s: not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("kek file %s has mode %04o: it must be readable by its owner only (chmod 600 %s)", path, perm, path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("kek file %s is owned by uid %d, but blockd runs as uid %d: it must be the daemon's own (chown %d %s)",
			path, st.Uid, os.Geteuid(), os.Geteuid(), path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 2*KEKSize+3))
	if err != nil {
		return nil, fmt.Errorf("kek file %s: %w", path, err)
	}
	switch {
	case len(b) > 2*KEKSize+2:
		return nil, fmt.Errorf("kek file %s: longer than a key (want %d raw bytes or %d hex digits)", path, KEKSize, 2*KEKSize)
	case len(b) != KEKSize:
		raw, err := hex.DecodeString(strings.TrimRight(string(b), "\r\n"))
		if err != nil || len(raw) != KEKSize {
			return nil, fmt.Errorf("kek file %s: want %d raw bytes or %d hex digits (e.g. `head -c 32 /dev/urandom`)", path, KEKSize, 2*KEKSize)
		}
		b = raw
	}
	return newKEK(bytes.Clone(b), path), nil
}

// SecretKEK derives a volume's KEK from a secret handed in with a request
// (a CSI node-stage secret, say) and the volume's salt: HKDF-SHA256.
func SecretKEK(secret string, salt []byte) (*KEK, error) {
	if len(secret) < MinSecretSize {
		return nil, fmt.Errorf("%w: a secret has at least %d bytes (use a random one: openssl rand -base64 32)", ErrKey, MinSecretSize)
	}
	k, err := hkdf.Key(sha256.New, []byte(secret), salt, "blockd volume kek", KEKSize)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKey, err)
	}
	return newKEK(k, ""), nil
}

// NewDataKey returns a random data key.
func NewDataKey() []byte {
	for {
		k := make([]byte, DataKeySize)
		rand.Read(k)
		if !bytes.Equal(k[:DataKeySize/2], k[DataKeySize/2:]) {
			return k
		}
	}
}

// aad binds a wrapped key to its volume and cipher: a wrapped key copied
// into another volume's metadata does not unwrap there.
func aad(volume string) []byte { return []byte("blockd data key\x00" + Cipher + "\x00" + volume) }

func (k *KEK) gcm() cipher.AEAD {
	b, err := aes.NewCipher(k.key)
	if err != nil {
		panic(err) // a KEK always has 32 bytes
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

// Wrap encrypts a data key with the KEK (AES-256-GCM, random nonce, the
// volume's name as additional data): nonce || ciphertext || tag.
func (k *KEK) Wrap(volume string, dataKey []byte) []byte {
	g := k.gcm()
	nonce := make([]byte, g.NonceSize())
	rand.Read(nonce)
	return g.Seal(nonce, nonce, dataKey, aad(volume))
}

// Unwrap decrypts a wrapped data key; it fails for the wrong KEK, the
// wrong volume or a damaged wrapped key.
func (k *KEK) Unwrap(volume string, wrapped []byte) ([]byte, error) {
	g := k.gcm()
	if len(wrapped) < g.NonceSize()+g.Overhead()+DataKeySize {
		return nil, fmt.Errorf("%w: wrapped key of %d bytes is too short", ErrKey, len(wrapped))
	}
	key, err := g.Open(nil, wrapped[:g.NonceSize()], wrapped[g.NonceSize():], aad(volume))
	if err != nil || len(key) != DataKeySize {
		return nil, fmt.Errorf("%w: the wrapped data key does not open with KEK %s (a different KEK, or damaged metadata)", ErrKey, k.id)
	}
	return key, nil
}

// KeyCheck is a data key's check value: the first 8 bytes of
// HMAC-SHA256(key, "blockd key check"), in hex. It confirms an unwrapped
// key is the volume's without revealing anything about it.
func KeyCheck(dataKey []byte) string {
	m := hmac.New(sha256.New, dataKey)
	m.Write([]byte("blockd key check"))
	return hex.EncodeToString(m.Sum(nil)[:8])
}

var b64 = base64.StdEncoding
