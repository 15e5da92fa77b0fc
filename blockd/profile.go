package blockd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/profile"
)

// The io_profile wiring: each volume's pipeline ends with a profile.Stage
// (metrics -> read-only -> [qos] -> profile -> engine). The stage is built
// in Manager.open, told about profile changes by Manager.Update, closed
// (its write-back buffer drained) by Volume.close before the engine's
// final flush, and shown in `volume get` and in the
// blockd_volume_effective_profile gauge.

func (m *Manager) newProfileStage(v *Volume, s Spec, e ioengine.Engine) *profile.Stage {
	p, err := profile.Parse(s.Profile)
	if err != nil { // validate() admits only known profiles
		p = profile.Auto
	}
	// A memory engine is as fast as the stage's cache and buffer: they
	// would only add a copy per request.
	opts := profile.Options{Size: e.Size, InMemory: s.Engine == ioengine.KindMemory}
	if c, ok := e.(ioengine.CachedWriter); ok {
		opts.Cached = c // db writes through the page cache
	}
	opts.OnChange = func(eff profile.Profile) {
		if m.metrics != nil {
			m.metrics.setProfile(s.Name, eff)
		}
		if v.qos != nil {
			// journal: small synchronous writes that others wait on go
			// first in the QoS stage (after reservations).
			v.qos.SetPriority(eff == profile.Journal)
		}
		// auto learned a new behaviour: the kernel's read-ahead follows,
		// but only on a device this daemon serves. Writing the sysfs
		// attribute freezes the queue (6.12), which waits for requests
		// in flight: on a device whose sockets died with the previous
		// daemon that wait ends only after the device is reconnected, so
		// the write must never sit on the path that reconnects it. It
		// runs on its own goroutine, owned by the manager (Close waits).
		a := v.Spec().Attachment
		if a == nil || a.Frontend != FrontendNBD || !v.kernelLive.Load() {
			return
		}
		m.bg.Add(1)
		go func() {
			defer m.bg.Done()
			if err := setReadAhead(a.Index, eff); err != nil && !errors.Is(err, fs.ErrNotExist) {
				m.log.Warn("io_profile changed but read-ahead was not", "volume", s.Name, "err", err)
			}
		}()
	}
	return profile.New(p, opts)
}

// setProfile applies a changed io_profile to the live volume.
func (v *Volume) setProfile(name string) {
	p, err := profile.Parse(name)
	if err != nil {
		return
	}
	v.prof.SetProfile(p)
}

// flush makes the volume's completed writes durable, including those in
// the profile stage's write-back buffer.
func (v *Volume) flush() error {
	r := pipeline.Request{Op: pipeline.OpFlush}
	return v.Handle(context.Background(), &r)
}

// EffectiveProfile returns the io_profile in force for the volume.
func (v *Volume) EffectiveProfile() profile.Profile { return v.prof.Effective() }

func (v *Volume) profileInfo(vi *VolumeInfo) {
	st := v.prof.Stats()
	vi.EffectiveProfile = st.Effective
	vi.ProfileStats = &st
}

func newProfileGauge() *prometheus.GaugeVec {
	return prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "blockd_volume_effective_profile",
		Help: "1 for the io_profile in force on the volume (for auto, the one it learned), 0 for the others.",
	}, []string{"volume", "profile"})
}

func (m *Metrics) setProfile(vol string, eff profile.Profile) {
	for _, n := range profile.Names() {
		if n == "auto" {
			continue
		}
		v := 0.0
		if n == eff.String() {
			v = 1
		}
		m.profile.WithLabelValues(vol, n).Set(v)
	}
}

// setReadAhead sets the kernel read-ahead of /dev/nbdIDX to suit the
// volume's effective profile (sequential 4 MiB, random 16 KiB, others
// 128 KiB).
func setReadAhead(idx int, p profile.Profile) error {
	path := fmt.Sprintf("/sys/block/nbd%d/queue/read_ahead_kb", idx)
	if err := os.WriteFile(path, fmt.Appendf(nil, "%d\n", profile.ReadAheadKB(p)), 0o644); err != nil {
		return fmt.Errorf("set read-ahead: %w", err)
	}
	return nil
}
