package encryption

import (
	"crypto/rand"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/blockd/blockd/api"
)

// Keyring holds the KEKs a daemon unwraps data keys with: its own KEK
// files (`serve --kek-file`, the first current: new volumes are wrapped
// under it), KEK files named by volumes' metadata (read when a volume
// needs one the keyring lacks), and KEKs derived from the secrets handed
// in for volumes, in memory only. It is safe for concurrent use.
type Keyring struct {
	mu      sync.Mutex
	current *KEK
	files   map[string]*KEK // by id
	secrets map[string]*KEK // by volume name
}

// NewKeyring returns a keyring of KEKs read from files; the first is
// current.
func NewKeyring(keks ...*KEK) *Keyring {
	k := &Keyring{files: map[string]*KEK{}, secrets: map[string]*KEK{}}
	for i, kek := range keks {
		k.Add(kek, i == 0)
	}
	return k
}

// Add puts a KEK read from a file in the keyring; current makes it the
// KEK new volumes are wrapped under.
func (k *Keyring) Add(kek *KEK, current bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.files[kek.id] = kek
	if current {
		k.current = kek
	}
}

// Current returns the KEK new volumes are wrapped under (nil: none).
func (k *Keyring) Current() *KEK {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.current
}

// IDs returns the ids of the keyring's file KEKs, sorted.
func (k *Keyring) IDs() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var ids []string
	for id := range k.files {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Forget drops the secret-derived KEK of a volume (deleted, say).
func (k *Keyring) Forget(volume string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	delete(k.secrets, volume)
}

// Create makes a new volume's encryption metadata from what the create
// asked for (cipher, KEK source, KEK file or secret): a random data key
// wrapped under the KEK. The secret is not kept in the metadata; the KEK
// derived from it stays in the keyring.
func (k *Keyring) Create(volume string, req api.Encryption) (api.Encryption, error) {
	e := api.Encryption{Cipher: req.Cipher, KEK: req.KEK}
	if e.Cipher == "" {
		e.Cipher = Cipher
	}
	if e.KEK == "" && req.Secret != "" {
		e.KEK = api.KEKSecret
	}
	var kek *KEK
	var err error
	switch e.KEK {
	case api.KEKSecret:
		if req.KEKFile != "" {
			return api.Encryption{}, fmt.Errorf("%w: a volume's KEK comes from a file or from a secret, not both", ErrKey)
		}
		salt := make([]byte, 16)
		rand.Read(salt)
		if kek, err = SecretKEK(req.Secret, salt); err != nil {
			return api.Encryption{}, err
		}
		e.Salt = b64.EncodeToString(salt)
	case "", api.KEKFile:
		e.KEK = api.KEKFile
		if req.Secret != "" {
			return api.Encryption{}, fmt.Errorf("%w: a secret is for kek %q", ErrKey, api.KEKSecret)
		}
		if kek, err = k.fileKEK(req.KEKFile); err != nil {
			return api.Encryption{}, err
		}
		e.KEKFile = kek.Path
	default:
		return api.Encryption{}, fmt.Errorf("%w: unknown kek source %q (want %s or %s)", ErrKey, e.KEK, api.KEKFile, api.KEKSecret)
	}
	if e.Cipher != Cipher {
		return api.Encryption{}, fmt.Errorf("%w: unknown cipher %q (want %s)", ErrKey, e.Cipher, Cipher)
	}
	key := NewDataKey()
	e.KEKID, e.WrappedKey, e.KeyCheck = kek.id, b64.EncodeToString(kek.Wrap(volume, key)), KeyCheck(key)
	clear(key)
	if e.KEK == api.KEKSecret {
		k.mu.Lock()
		k.secrets[volume] = kek
		k.mu.Unlock()
	}
	return e, nil
}

// fileKEK returns the KEK of path (read now, and added to the keyring),
// or the current KEK for "".
func (k *Keyring) fileKEK(path string) (*KEK, error) {
	if path == "" {
		if cur := k.Current(); cur != nil {
			return cur, nil
		}
		return nil, fmt.Errorf("%w: this daemon has no KEK (start it with --kek-file, or name a KEK file or a secret for the volume)", ErrKey)
	}
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("%w: kek file %q: want an absolute path (the daemon reads it)", ErrKey, path)
	}
	kek, err := LoadKEKFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKey, err)
	}
	k.Add(kek, false)
	return kek, nil
}

// Open returns a volume's data key: the wrapped key unwrapped with the
// KEK the metadata names, checked against the key check value. Every
// error is an ErrKey that says what is missing or wrong.
func (k *Keyring) Open(volume string, e *api.Encryption) ([]byte, error) {
	if e.Cipher != Cipher {
		return nil, fmt.Errorf("%w: unknown cipher %q", ErrKey, e.Cipher)
	}
	if e.WrappedKey == "" {
		return nil, fmt.Errorf("%w: the volume's wrapped data key was destroyed (crypto-shredded by a delete); its data cannot be read", ErrKey)
	}
	wrapped, err := b64.DecodeString(e.WrappedKey)
	if err != nil {
		return nil, fmt.Errorf("%w: wrapped key: %v", ErrKey, err)
	}
	kek, err := k.kekOf(volume, e)
	if err != nil {
		return nil, err
	}
	key, err := kek.Unwrap(volume, wrapped)
	if err != nil {
		return nil, err
	}
	if KeyCheck(key) != e.KeyCheck {
		clear(key)
		return nil, fmt.Errorf("%w: the unwrapped data key does not match the volume's key check value (damaged metadata)", ErrKey)
	}
	return key, nil
}

// kekOf finds the KEK that wrapped a volume's key.
func (k *Keyring) kekOf(volume string, e *api.Encryption) (*KEK, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch e.KEK {
	case api.KEKSecret:
		kek := k.secrets[volume]
		if kek == nil {
			return nil, fmt.Errorf("%w: the volume's KEK is derived from a secret blockd never stores: it opens when an attach or unlock hands the secret in (blockd volume unlock %s)", ErrKey, volume)
		}
		return kek, nil
	case "", api.KEKFile:
	default:
		return nil, fmt.Errorf("%w: unknown kek source %q", ErrKey, e.KEK)
	}
	if kek := k.files[e.KEKID]; kek != nil {
		return kek, nil
	}
	have := "none"
	if len(k.files) > 0 {
		var ids []string
		for id := range k.files {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		have = strings.Join(ids, ", ")
	}
	if e.KEKFile == "" {
		return nil, fmt.Errorf("%w: the data key is wrapped under KEK %s, which this daemon does not have (its KEKs: %s); start it with the --kek-file of that KEK", ErrKey, e.KEKID, have)
	}
	kek, err := LoadKEKFile(e.KEKFile)
	if err != nil {
		return nil, fmt.Errorf("%w: the data key is wrapped under KEK %s, which this daemon does not have (its KEKs: %s), and its file cannot be used: %v", ErrKey, e.KEKID, have, err)
	}
	if kek.id != e.KEKID {
		return nil, fmt.Errorf("%w: the data key is wrapped under KEK %s, but %s holds KEK %s (the wrong key); the daemon's KEKs: %s", ErrKey, e.KEKID, e.KEKFile, kek.id, have)
	}
	k.files[kek.id] = kek
	return kek, nil
}

// Unlock derives a secret volume's KEK from secret and keeps it, once it
// opens the volume's wrapped key.
func (k *Keyring) Unlock(volume string, e *api.Encryption, secret string) error {
	if e.KEK != api.KEKSecret {
		return fmt.Errorf("%w: volume %s's KEK is not a secret (kek %q)", ErrKey, volume, e.KEK)
	}
	salt, err := b64.DecodeString(e.Salt)
	if err != nil {
		return fmt.Errorf("%w: salt: %v", ErrKey, err)
	}
	kek, err := SecretKEK(secret, salt)
	if err != nil {
		return err
	}
	if kek.id != e.KEKID {
		return fmt.Errorf("%w: wrong secret for volume %s (it derives KEK %s, the volume's is %s)", ErrKey, volume, kek.id, e.KEKID)
	}
	k.mu.Lock()
	k.secrets[volume] = kek
	k.mu.Unlock()
	if _, err := k.Open(volume, e); err != nil {
		k.Forget(volume)
		return err
	}
	return nil
}

// Rekey rewraps a volume's data key under a new KEK: the KEK in kekFile
// (or the current KEK) for a KEKFile volume, one derived from secret for
// a KEKSecret volume. It returns the new metadata and commit, to call
// once that is durable: then the new KEK is the keyring's (a new KEK file
// becomes current, so that new volumes are wrapped under it too).
func (k *Keyring) Rekey(volume string, e api.Encryption, kekFile, secret string) (api.Encryption, func(), error) {
	key, err := k.Open(volume, &e)
	if err != nil {
		return api.Encryption{}, nil, err
	}
	defer clear(key)
	var kek *KEK
	commit := func() {}
	switch e.KEK {
	case api.KEKSecret:
		if kekFile != "" || secret == "" {
			return api.Encryption{}, nil, fmt.Errorf("%w: volume %s's KEK is derived from a secret: rekey it with a new secret", ErrKey, volume)
		}
		salt := make([]byte, 16)
		rand.Read(salt)
		if kek, err = SecretKEK(secret, salt); err != nil {
			return api.Encryption{}, nil, err
		}
		e.Salt = b64.EncodeToString(salt)
		commit = func() {
			k.mu.Lock()
			k.secrets[volume] = kek
			k.mu.Unlock()
		}
	default:
		if secret != "" {
			return api.Encryption{}, nil, fmt.Errorf("%w: volume %s's KEK comes from a file: rekey it with a KEK file", ErrKey, volume)
		}
		if kekFile == "" {
			if kek = k.Current(); kek == nil {
				return api.Encryption{}, nil, fmt.Errorf("%w: this daemon has no KEK to rewrap under: name a KEK file", ErrKey)
			}
		} else {
			if !filepath.IsAbs(kekFile) {
				return api.Encryption{}, nil, fmt.Errorf("%w: kek file %q: want an absolute path", ErrKey, kekFile)
			}
			if kek, err = LoadKEKFile(kekFile); err != nil {
				return api.Encryption{}, nil, fmt.Errorf("%w: %v", ErrKey, err)
			}
			commit = func() { k.Add(kek, true) }
		}
		e.KEKFile = kek.Path
	}
	e.KEKID, e.WrappedKey = kek.id, b64.EncodeToString(kek.Wrap(volume, key))
	return e, commit, nil
}
