package ublk

import (
	"errors"
	"os"
	"testing"
)

// Which devices a daemon may recover and which its start-up cleanup
// removes, by the mark in ServerFlags: its own tag, another daemon's, the
// untagged mark of older blockd, or none.
func TestOwnerMarks(t *testing.T) {
	const us, them = 0x1234abcd, 0x99
	keepNone := func(DevInfo) bool { return false }
	for _, tc := range []struct {
		name                        string
		flags                       uint64
		blockd, takeOver, cleanedUp bool
	}{
		{"ours", serverFlags(us), true, true, true},
		{"another daemon's", serverFlags(them), true, false, false},
		{"older blockd, untagged", serverMagicV1, true, true, false},
		{"not blockd's", 0, false, false, false},
		{"not blockd's, magic-like", 0x626c6b0300000000 | us, false, false, false},
	} {
		info := DevInfo{DevID: 4, ServerFlags: tc.flags, State: StateQuiesced}
		if got := IsBlockd(info); got != tc.blockd {
			t.Errorf("%s: IsBlockd = %v, want %v", tc.name, got, tc.blockd)
		}
		err := checkTakeOver(info, us)
		if (err == nil) != tc.takeOver || (err != nil && !errors.Is(err, ErrNotRecoverable)) {
			t.Errorf("%s: checkTakeOver = %v, want allowed %v", tc.name, err, tc.takeOver)
		}
		if got := cleanupWants(info, us, keepNone); got != tc.cleanedUp {
			t.Errorf("%s: cleanupWants = %v, want %v", tc.name, got, tc.cleanedUp)
		}
	}
	ours := DevInfo{DevID: 5, ServerFlags: serverFlags(us), State: StateQuiesced}
	if cleanupWants(ours, us, func(i DevInfo) bool { return i.DevID == 5 }) {
		t.Error("cleanupWants removes a device keep wants")
	}
	// A device of ours still served by a live process (here: our parent,
	// which is alive and not us) is left to it; one served by this process
	// is ours to remove.
	live := DevInfo{DevID: 6, ServerFlags: serverFlags(us), State: StateLive, DaemonPID: int32(os.Getppid())}
	if cleanupWants(live, us, keepNone) {
		t.Error("cleanupWants removes a device a live process serves")
	}
	live.DaemonPID = int32(os.Getpid())
	if !cleanupWants(live, us, keepNone) {
		t.Error("cleanupWants keeps a device only this process served")
	}
}

func TestServerFlagsKeepTheTag(t *testing.T) {
	for _, owner := range []uint32{0, 1, 0xffffffff} {
		f := serverFlags(owner)
		if f&magicMask != serverMagicV2 || uint32(f) != owner || f == serverMagicV1 {
			t.Errorf("serverFlags(%#x) = %#x", owner, f)
		}
	}
}
