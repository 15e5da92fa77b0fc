package volume

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/blockd/blockd/api"
)

// Encryption at rest (package encryption does the work): the registry
// creates a volume's wrapped data key, unwraps it to open the volume,
// rewraps it (Rekey), and destroys it first when the volume is deleted.

// validateEncryption checks what a spec asks of encryption.
func validateEncryption(e *api.Encryption) error {
	if e == nil {
		return nil
	}
	if e.Cipher != "" && e.Cipher != api.CipherAES256XTS {
		return api.Errorf(api.CodeInvalid, "encryption: unknown cipher %q (want %s)", e.Cipher, api.CipherAES256XTS)
	}
	switch e.KEK {
	case "", api.KEKFile, api.KEKSecret:
	default:
		return api.Errorf(api.CodeInvalid, "encryption: unknown kek %q (want %s or %s)", e.KEK, api.KEKFile, api.KEKSecret)
	}
	return nil
}

// shredKey destroys a volume's wrapped data key for good before it is
// deleted: the metadata file is overwritten in place (not replaced by a
// new file, which would leave the old blocks, key and all, on the disk)
// with the same metadata less the key, padded to its old length, and
// fsynced. A crash before the delete finishes leaves metadata that loads
// as a failed volume ("wrapped key destroyed"), which a delete removes.
func (m *Registry) shredKey(v *Volume) error {
	s := v.Spec()
	e := *s.Encryption
	e.WrappedKey, e.KeyCheck, e.Salt = "", "", ""
	s.Encryption = &e
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(m.metaDir(), v.name+".json")
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if pad := int(fi.Size()) - len(b) - 1; pad > 0 {
		// Trailing white space is valid JSON.
		b = append(b, bytes.Repeat([]byte{' '}, pad)...)
	}
	b = append(b, '\n')
	if _, err := f.WriteAt(b, 0); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	v.setSpec(s)
	return nil
}

// Unlock opens an encrypted volume whose KEK is derived from a secret and
// which the daemon could not open at start for want of it (a failed
// volume). An open volume only checks the secret.
func (m *Registry) Unlock(name, secret string) (api.Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[name]
	if !ok {
		return api.Spec{}, notFound(name)
	}
	s := v.Spec()
	if s.Encryption == nil || s.Encryption.KEK != api.KEKSecret {
		return api.Spec{}, api.Errorf(api.CodeInvalid, "volume %s is not encrypted under a secret; nothing to unlock", name)
	}
	if err := m.opts.Keys.Unlock(name, s.Encryption, secret); err != nil {
		return api.Spec{}, api.Errorf(api.CodeInvalid, "unlock %s: %w", name, err)
	}
	if _, failed := v.Failed(); !failed {
		return s, nil
	}
	nv := m.load(name)
	m.vols[name] = nv
	m.setFailedMetric(name, nv)
	if why, failed := nv.Failed(); failed {
		return api.Spec{}, api.Errorf(api.CodeConflict, "unlock %s: %s", name, why)
	}
	m.log.Info("volume unlocked", "volume", name)
	return nv.Spec(), nil
}

// Rekey rewraps an encrypted volume's data key under a new KEK (the one
// in kekFile, or the daemon's current one; or one derived from a new
// secret) without touching its data. A new KEK file becomes the daemon's
// current KEK, under which new volumes are created.
func (m *Registry) Rekey(name, kekFile, secret string) (api.Spec, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, err := m.healthyLocked(name)
	if err != nil {
		return api.Spec{}, err
	}
	s := v.Spec()
	if s.Encryption == nil {
		return api.Spec{}, api.Errorf(api.CodeInvalid, "volume %s is not encrypted", name)
	}
	if s.Replication != nil {
		return api.Spec{}, api.Errorf(api.CodeConflict, "rekey %s: not supported for replicated volumes yet (the replicas' metadata would keep the old wrapped key)", name)
	}
	e, commit, err := m.opts.Keys.Rekey(name, *s.Encryption, kekFile, secret)
	if err != nil {
		return api.Spec{}, api.Errorf(api.CodeInvalid, "rekey %s: %w", name, err)
	}
	saved, err := m.saveSpec(v, func(cur *api.Spec) error { cur.Encryption = &e; return nil })
	if err != nil {
		return api.Spec{}, fmt.Errorf("rekey %s: %w", name, err)
	}
	commit()
	m.log.Info("volume rekeyed", "volume", name, "kek_id", e.KEKID, "old_kek_id", s.Encryption.KEKID)
	return saved, nil
}

// NewEncryption makes the encryption metadata of a new cluster volume
// named name from what its create asked for: a random data key wrapped
// under the KEK the request names (this node's current KEK file by
// default, or one derived from a secret). The cluster keeps it with the
// volume's spec, so that every copy carries the same wrapped key; each
// node that serves the volume unwraps it with its own copy of the KEK.
// ForgetKey drops a secret-derived KEK this leaves in the keyring when
// the create fails.
func (m *Registry) NewEncryption(name string, req api.Encryption) (api.Encryption, error) {
	e, err := m.opts.Keys.Create(name, req)
	if err != nil {
		return api.Encryption{}, api.Errorf(api.CodeInvalid, "create %s: %w", name, err)
	}
	return e, nil
}

// ForgetKey drops what the keyring holds for volume name.
func (m *Registry) ForgetKey(name string) { m.opts.Keys.Forget(name) }

// Encrypted reports whether the volume is encrypted at rest.
func (v *Volume) Encrypted() bool { return v.Spec().Encryption != nil }
