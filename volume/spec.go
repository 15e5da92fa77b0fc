package volume

import (
	"regexp"
	"slices"
	"strings"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/profile"
	"github.com/blockd/blockd/units"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidName reports whether name may name a volume: 1-63 characters of
// a-z, 0-9, '.', '_' and '-', starting with a letter or digit. Names
// become file names in the state dir and NBD export names.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// Validate checks a spec and fills in its defaults (block size, engine,
// profile). Its errors carry api.CodeInvalid.
func Validate(s *api.Spec) error {
	if !ValidName(s.Name) {
		return api.Errorf(api.CodeInvalid, "volume name %q: want 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit", s.Name)
	}
	if s.BlockSize == 0 {
		s.BlockSize = api.DefaultBlockSize
	}
	if s.BlockSize != api.DefaultBlockSize {
		return api.Errorf(api.CodeInvalid, "block size %d: only %d is supported", s.BlockSize, api.DefaultBlockSize)
	}
	if s.Size <= 0 {
		return api.Errorf(api.CodeInvalid, "size %d: must be positive (e.g. --size 10GiB)", s.Size)
	}
	if int64(s.Size)%int64(s.BlockSize) != 0 {
		return api.Errorf(api.CodeInvalid, "size %s is not a multiple of the block size %d", units.FormatSize(int64(s.Size)), s.BlockSize)
	}
	if s.Engine == "" {
		s.Engine = ioengine.KindFile
	}
	if !slices.Contains(ioengine.Kinds, s.Engine) {
		return api.Errorf(api.CodeInvalid, "unknown engine %q (want %s)", s.Engine, strings.Join(ioengine.Kinds, " or "))
	}
	if err := s.QoS.Validate(); err != nil {
		return api.Errorf(api.CodeInvalid, "qos: %w", err)
	}
	if s.Profile == "" {
		s.Profile = profile.Auto.String()
	}
	if _, err := profile.Parse(s.Profile); err != nil {
		return api.Errorf(api.CodeInvalid, "unknown io_profile %q (want one of %s)", s.Profile, strings.Join(profile.Names(), ", "))
	}
	return validateEncryption(s.Encryption)
}
