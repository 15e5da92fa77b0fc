package attach

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
)

const (
	testID  = "aaaa111122223333"
	otherID = "bbbb444455556666"
)

// device makes /sys/block/nbdIDX/backend in the rig's sysfs tree and
// tells the fake driver that the device is connected.
func (r *testRig) device(idx int, backend string) {
	r.t.Helper()
	dir := filepath.Join(r.opts.sysBlock, fmt.Sprintf("nbd%d", idx))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "backend"), []byte(backend+"\n"), 0o644); err != nil {
		r.t.Fatal(err)
	}
	r.nl.mu.Lock()
	r.nl.connected[idx] = true
	r.nl.mu.Unlock()
}

// record stores an nbd attachment for volume name, as a daemon before
// this one left it.
func (r *testRig) record(name string, idx int, backend string) {
	r.t.Helper()
	att := &api.Attachment{Frontend: api.FrontendNBD, Device: fmt.Sprintf("/dev/nbd%d", idx), Index: idx, Connections: 1, Backend: backend}
	if _, err := r.vols.SetAttachment(name, att); err != nil {
		r.t.Fatal(err)
	}
}

func (r *testRig) attachment(name string) *api.Attachment {
	r.t.Helper()
	v, err := r.vols.Get(name)
	if err != nil {
		r.t.Fatal(err)
	}
	return v.Spec().Attachment
}

// A new attachment carries this daemon's backend id, in the kernel and in
// the record.
func TestAttachBackendID(t *testing.T) {
	r := newRig(t)
	r.opts.DaemonID = testID
	r.volume("n", "file")
	d := r.devices()
	s, err := d.Attach("n", api.AttachRequest{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	want := "blockd:" + testID + ":n"
	if s.Attachment == nil || s.Attachment.Backend != want || r.nl.backends[s.Attachment.Index] != want {
		t.Errorf("attachment %+v, kernel backend %q; want %s in both", s.Attachment, r.nl.backends[s.Attachment.Index], want)
	}
}

// Recovery reconfigures the devices the records name (with the backend id
// recorded, or blockd:NAME for records of daemons without an id) and
// disconnects only devices of this daemon that no record names: never
// another daemon's, nor an older daemon's, nor anyone else's.
func TestRecoverTouchesOnlyOwnDevices(t *testing.T) {
	r := newRig(t)
	r.opts.DaemonID = testID
	for _, v := range []string{"a", "old"} {
		r.volume(v, "file")
	}
	r.record("a", 0, "blockd:"+testID+":a")
	r.record("old", 4, "")
	r.device(0, "blockd:"+testID+":a")
	r.device(1, "blockd:"+testID+":gone") // ours, no record: an orphan
	r.device(2, "blockd:"+otherID+":x")   // another daemon's
	r.device(3, "blockd:legacy")          // an older daemon's, no record here
	r.device(4, "blockd:old")             // recorded by an older daemon of this state dir
	r.device(5, "not-blockd")
	d := r.devices()
	d.Recover()
	if !slices.Equal(r.nl.disconnects, []int{1}) {
		t.Errorf("disconnected %v, want only nbd1 (this daemon's orphan)", r.nl.disconnects)
	}
	slices.Sort(r.nl.reconfs)
	if want := []string{"nbd0 blockd:" + testID + ":a", "nbd4 blockd:old"}; !slices.Equal(r.nl.reconfs, want) {
		t.Errorf("reconfigured %q, want %q", r.nl.reconfs, want)
	}
	for _, v := range []string{"a", "old"} {
		if a := r.attachment(v); a == nil {
			t.Errorf("volume %s lost its attachment", v)
		}
	}
	if a := r.attachment("old"); a != nil && a.Backend != "" {
		t.Errorf("a live device kept by its old backend id got record %q", a.Backend)
	}
	if errs := r.log.errors(); len(errs) != 0 {
		t.Errorf("errors logged: %q", errs)
	}
}

// A recorded device the kernel no longer has (the node rebooted) is
// connected again at its index with this daemon's backend id, and the
// record follows.
func TestRecoverReconnectsWithOwnBackend(t *testing.T) {
	r := newRig(t)
	r.opts.DaemonID = testID
	r.volume("old", "file")
	r.record("old", 6, "")
	d := r.devices()
	d.Recover()
	want := "blockd:" + testID + ":old"
	if got := r.nl.backends[6]; got != want {
		t.Errorf("nbd6 connected with backend %q, want %q", got, want)
	}
	if a := r.attachment("old"); a == nil || a.Index != 6 || a.Backend != want {
		t.Errorf("record after reconnect: %+v, want nbd6 with backend %s", a, want)
	}
}

// A memory volume starts empty after a restart: its recorded device is
// disconnected (the kernel fails the I/O that waited, EIO) instead of
// being served zeroes, the attachment is dropped, and the volume says
// why. Devices that are gone, or another daemon's now, are not touched.
func TestRecoverFailsMemoryVolume(t *testing.T) {
	r := newRig(t)
	r.opts.DaemonID = testID
	for _, v := range []string{"m", "gone", "taken", "f"} {
		engine := "memory"
		if v == "f" {
			engine = "file"
		}
		r.volume(v, engine)
	}
	r.record("m", 2, "blockd:"+testID+":m")
	r.device(2, "blockd:"+testID+":m")
	r.record("gone", 3, "blockd:"+testID+":gone") // the node rebooted: no device
	r.record("taken", 5, "blockd:"+testID+":taken")
	r.device(5, "blockd:"+otherID+":x") // the index is another daemon's now
	r.record("f", 7, "blockd:"+testID+":f")
	r.device(7, "blockd:"+testID+":f")
	d := r.devices()
	d.Recover()

	if !slices.Equal(r.nl.disconnects, []int{2}) {
		t.Errorf("disconnected %v, want nbd2 only", r.nl.disconnects)
	}
	if !slices.Equal(r.nl.reconfs, []string{"nbd7 blockd:" + testID + ":f"}) {
		t.Errorf("reconfigured %q, want only the file volume's nbd7", r.nl.reconfs)
	}
	if _, ok := r.nl.backends[3]; ok {
		t.Error("the gone memory volume's device was connected again (empty)")
	}
	for name, want := range map[string]string{
		"m":    "kernel device /dev/nbd2 was detached at start: a memory volume's data does not survive a restart, so its I/O was failed (EIO) rather than served as zeroes",
		"gone": "kernel device /dev/nbd3 was detached at start: a memory volume's data does not survive a restart",
	} {
		v, err := r.vols.Get(name)
		if err != nil {
			t.Fatal(err)
		}
		state, reason := v.State()
		if a := v.Spec().Attachment; a != nil || state != api.StateOK || reason != want {
			t.Errorf("volume %s after recovery: attachment %+v, state %s, reason %q; want detached, ok, %q", name, a, state, reason, want)
		}
	}
	if a := r.attachment("taken"); a != nil {
		t.Errorf("memory volume taken kept attachment %+v", a)
	}
	if a := r.attachment("f"); a == nil {
		t.Error("the file volume lost its attachment")
	}
	errs := r.log.errors()
	if len(errs) != 1 || !strings.Contains(errs[0], "volume=m") || !strings.Contains(errs[0], "EIO") {
		t.Errorf("error log %q, want one line for volume m saying its I/O fails", errs)
	}
}
