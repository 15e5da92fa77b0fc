// Package blockd is the daemon that wires the frontends (nbd, ublk) to the
// volume pipeline: the volume registry and its crash-safe metadata, the
// control API (HTTP+JSON on a unix socket) and its client, the command
// line, Prometheus metrics and the lifecycle (start in order, stop in
// reverse).
package blockd
