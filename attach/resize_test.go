package attach

import (
	"fmt"
	"testing"

	"github.com/blockd/blockd/api"
)

// An attached nbd volume grows, and its device follows with the backend id
// it was connected with; shrinking stays refused and leaves the device
// alone; a detached volume grows without touching the kernel.
func TestResizeAttachedNBD(t *testing.T) {
	r := newRig(t)
	r.volume("v", "memory")
	d := r.devices()
	s, err := d.Attach("v", api.AttachRequest{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	s, err = d.Resize("v", 24<<20)
	if err != nil {
		t.Fatal(err)
	}
	if s.Size != 24<<20 {
		t.Errorf("size after resize: %d", s.Size)
	}
	want := fmt.Sprintf("nbd%d %s %d", s.Attachment.Index, s.Attachment.Backend, 24<<20)
	if len(r.nl.resizes) != 1 || r.nl.resizes[0] != want {
		t.Errorf("kernel resizes %q, want [%q]", r.nl.resizes, want)
	}
	if _, err := d.Resize("v", 8<<20); !api.IsCode(err, api.CodeInvalid) {
		t.Errorf("shrink: %v", err)
	}
	if len(r.nl.resizes) != 1 {
		t.Errorf("a refused shrink reached the kernel: %q", r.nl.resizes)
	}
	if _, err := d.Detach("v"); err != nil {
		t.Fatal(err)
	}
	if s, err = d.Resize("v", 32<<20); err != nil || s.Size != 32<<20 {
		t.Fatalf("detached resize: %v, size %d", err, s.Size)
	}
	if len(r.nl.resizes) != 1 {
		t.Errorf("a detached resize reached the kernel: %q", r.nl.resizes)
	}
}

// Without kernel devices an attached volume cannot grow: its device would
// not follow.
func TestResizeAttachedKernelOff(t *testing.T) {
	r := newRig(t)
	r.volume("v", "memory")
	if _, err := r.vols.SetAttachment("v", &api.Attachment{Frontend: api.FrontendNBD, Device: "/dev/nbd9", Index: 9}); err != nil {
		t.Fatal(err)
	}
	r.opts.Disabled = true
	d := r.devices()
	if _, err := d.Resize("v", 32<<20); !api.IsCode(err, api.CodeUnavailable) {
		t.Errorf("resize with kernel devices off: %v", err)
	}
	if v, _ := r.vols.Get("v"); v.Spec().Size != 16<<20 {
		t.Errorf("size changed to %d", v.Spec().Size)
	}
}
