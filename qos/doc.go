// Package qos is the quality-of-service stage of the volume pipeline: per
// volume caps (IOPS and bytes/s, total and per direction, with burst
// credit), reservations and weights scheduled against the node's capacity,
// and the metrics that show how much each volume was held back.
//
// The decisions are made by Scheduler, a pure core with no clock and no
// goroutines, tested with scripted scenarios in testdata/. Node wraps it for
// the daemon: one mutex, one timer goroutine, pooled wait slots, and a
// pipeline.Stage per volume. Throttling only delays requests; a waiting
// request leaves with ctx.Err() when its context ends and with
// pipeline.ErrShutdown when its volume or the node closes.
package qos
