package ublk_test

import (
	"context"
	"log"
	"log/slog"

	"github.com/blockd/blockd/ioengine"
	"github.com/blockd/blockd/kernel/module"
	"github.com/blockd/blockd/pipeline"
	"github.com/blockd/blockd/ublk"
)

// The daemon's use: at start, recover the devices its registry recorded,
// forget (and let Cleanup remove) the ones that cannot be recovered, then
// attach new volumes; on volume delete, Detach; on upgrade, Release.
func Example() {
	ctx := context.Background()
	eng, err := ioengine.NewMemory(1 << 30)
	if err != nil {
		log.Fatal(err)
	}
	h := pipeline.Chain(ioengine.Handler(eng) /* qos, profile, ... stages */)
	// Owner tags the devices as this daemon's (of several on the node).
	const owner = 0x2a
	cfg := ublk.Config{ID: -1, Size: eng.Size(), Handler: h, Logger: slog.Default(), LoadModule: module.Load, Owner: owner}

	recorded := map[int]bool{3: true} // ublk ids in the volume registry
	for id := range recorded {
		dev, err := ublk.Recover(ctx, id, cfg)
		if err != nil {
			// errors.Is(err, ublk.ErrNotRecoverable): not this daemon's,
			// never started, or another live server has it. The registry
			// forgets the id, Cleanup removes the device if it is this
			// daemon's, and the volume is attached afresh.
			log.Print(err)
			delete(recorded, id)
			continue
		}
		_ = dev // serve on
	}
	if _, err := ublk.Cleanup(owner, func(i ublk.DevInfo) bool { return recorded[int(i.DevID)] }, module.Load); err != nil {
		log.Print(err)
	}

	dev, err := ublk.Attach(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("volume at %s (ublk id %d)", dev.Path(), dev.ID())
	if err := dev.Detach(); err != nil {
		log.Print(err)
	}
}
