package daemon

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/blockd/blockd/internal/durable"
)

// idFile holds the daemon's id in the state dir. The id tells this
// daemon's kernel devices from those of other daemons on the node (other
// state dirs): nbd devices carry the backend id blockd:ID:VOLUME, ublk
// devices a tag made from it, and the clean-up at start touches only
// devices that carry it.
const idFile = "daemon-id"

// daemonID returns the id kept in dir/daemon-id, creating a random one the
// first time. The file is written crash-safely (temp file, fsync, rename,
// fsync of the dir), so a crash leaves no file or a whole one; a temp file
// left by a crash is removed. The caller holds the state dir lock.
func daemonID(dir string) (string, error) {
	path := filepath.Join(dir, idFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		id := strings.TrimSpace(string(b))
		if !validID(id) {
			return "", fmt.Errorf("state dir: %s holds %q, not a daemon id (16 hex digits); "+
				"restore it, or remove it to make a new one (kernel devices attached under the old id are then another daemon's to this one)", path, b)
		}
		return id, nil
	case !errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("state dir: %w", err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "."+idFile+".tmp-*"))
	for _, p := range left {
		os.Remove(p) // an id write a crash interrupted before its rename
	}
	var r [8]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", fmt.Errorf("daemon id: %w", err)
	}
	id := hex.EncodeToString(r[:])
	if err := durable.WriteFile(dir, idFile, []byte(id+"\n")); err != nil {
		return "", fmt.Errorf("state dir: write %s: %w", path, err)
	}
	return id, nil
}

// validID reports whether id is 16 lower-case hex digits, as daemonID
// makes them: nothing that could break the backend id blockd:ID:VOLUME.
func validID(id string) bool {
	if len(id) != 16 {
		return false
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}
