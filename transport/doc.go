// Package transport carries request/response calls between blockd nodes:
// the replication layer's writes to replicas, its resync reads, its epoch
// messages. It knows nothing of what the messages mean; it moves a Header
// and a payload to a named peer and brings back the peer's answer.
//
// # Wire
//
// QUIC (quic-go v0.65) on one UDP socket per node, which both listens and
// dials. TLS 1.3 only, ALPN "blockd-repl/1", mutual TLS against the
// cluster CA only; a node's name is its certificate's CN or a DNS SAN, and
// a dialed peer must present the name it is configured under, a calling
// peer one of the configured names (or any, with Config.AcceptAnyNode). A
// refused handshake is logged by the refusing side with its reason and
// nothing reaches a Handler. There is no 0-RTT (writes must never be
// replayable) and no session resumption. Each node dials its own
// connection for its own calls, so two nodes that call each other share
// two connections, one per direction.
//
// A frame is a 16-byte prefix (header length, payload length, call id),
// the Header as a msgpack array of fixed layout, and the raw payload; see
// frame.go. Header lengths are bounded at 1 KiB and payloads at
// Config.MaxPayload (32 MiB by default); a malformed or oversized frame
// resets its stream with a log line, never more.
//
// # Calls
//
// Every outgoing connection carries Config.Streams (4) long-lived
// bidirectional streams, each with up to 64 calls in flight: one writer
// goroutine per stream writes requests in order, one reader goroutine per
// stream hands each response, in whatever order the peer answers, to the
// call whose id it carries. On the serving side a goroutine per stream
// reads requests and hands each to a worker (up to Config.MaxInFlight per
// connection), so that a slow request does not hold up those behind it.
//
// Ownership: Call's payload must stay unchanged until Call returns, and
// the response is read straight into respBuf when it fits. A Handler's
// request payload is valid until ServeMessage returns; its response
// payload is written after it returns and may alias the request payload
// (see Handler and ResponseReleaser). A caller whose context ends while
// its request is half written resets that stream (the peer never acts on
// half a frame), which fails the other calls on the stream; a stream or
// connection found dead before a request left is replaced and the request
// sent again, but a request that may have been delivered never is.
//
// # Streams versus a stream per call
//
// Both ways were built and measured (the commit before the one that
// removed the stream-per-call way has both, and BenchmarkCall). Loopback,
// both ends in one process on a 2-vCPU VM, go test -bench BenchmarkCall
// -benchtime 2s -count 5, medians; the CPU time is user + system of both
// ends per call, from getrusage; allocations count both ends, quic-go
// included:
//
//	                   multiplexed streams               a stream per call
//	4 KiB, 1 caller    18,100 calls/s   74 MB/s          11,400 calls/s   47 MB/s
//	                   57 µs CPU, 25 allocs (665 B)      94 µs CPU, 86 allocs (5.1 KB)
//	4 KiB, 32 callers  68,400 calls/s  280 MB/s          31,200 calls/s  128 MB/s
//	                   28 µs CPU, 19 allocs (578 B)      60 µs CPU, 75 allocs (5.1 KB)
//	1 MiB, 8 callers      417 calls/s  437 MB/s             264 calls/s  277 MB/s
//	                   4.4 ms CPU, 3,160 allocs          3.7 ms CPU, 3,248 allocs
//
// The machine is shared: wall-clock rates moved by up to 2x between runs
// with other jobs' load (the 1 MiB rates of both ways overlapped across
// runs, 250-470 MB/s); CPU per call moved by about 15%. For the small
// writes replication sends most, multiplexed streams take half the CPU
// and twice the rate; a new QUIC stream per call costs quic-go some 60
// allocations and a round of stream bookkeeping on both ends, and the
// per-call stream needs a goroutine and a context watcher of its own. At
// 1 MiB both are bound by quic-go's per-packet work (AES-GCM, a sendmsg
// per packet or GSO batch: a third of the CPU is system calls) and come
// out even. The stream-per-call way was removed rather than kept behind
// an option: it was a second client and server path to test for no case
// where it won.
//
// Allocations: in steady state the transport's own code allocates nothing
// per call on either side (TestCallAllocs checks every allocation site
// the memory profile reports): frame codecs belong to long-lived
// goroutines, requests and their payload buffers of up to 64 KiB live in
// per-connection free lists, larger payloads borrow from size-class
// pools, volume names are interned per stream, call slots are reused.
// What remains, about 12 allocations per call on each side, is quic-go's:
// the source address of every datagram received (x/net's ReadBatch), the
// socket address of every datagram sent, STREAM frames, and the sent
// packet history.
//
// # What the replication layer should know
//
//   - A dead or silent peer (crash without restart, SIGSTOP, partition)
//     surfaces only when a call's context ends (ErrTimeout) or after
//     Config.IdleTimeout without a packet (ErrConnLost wrapping
//     *quic.IdleTimeoutError; default 15 s, and a connection uses the
//     smaller of its two ends' settings; keep-alives every 3 s keep idle
//     connections open). Give every call a deadline: DRBD's 6 s is a
//     reasonable start.
//   - A peer that restarts on the same address with the same
//     ResetKeySecret answers the old connection's next packet with a
//     stateless reset: the call in flight fails at once with ErrConnLost
//     (wrapping *quic.StatelessResetError) and the next call reconnects.
//     A peer that closes cleanly sends CONNECTION_CLOSE (ErrConnLost
//     wrapping a *quic.ApplicationError with code 1).
//   - ErrTimeout and ErrConnLost leave it unknown whether the peer applied
//     the request. The transport never resends such a request; the Header's
//     Epoch and Seq are there for the replica to reject a stale or repeated
//     one.
//   - Limits per connection: 4 streams x 64 calls in flight to a peer (more
//     wait for a slot, within their context); MaxInFlight (256) Handler
//     calls at once from a peer, beyond which its streams stop being read
//     and QUIC flow control holds the caller. quic-go's flow-control
//     windows start at 512 KiB per stream and grow to 6 MiB per stream and
//     15 MiB per connection, so a peer that stops reading stalls writers
//     after about that much. The other way round, a calling peer can hold
//     up to MaxInFlight requests of MaxPayload bytes of this node's memory
//     (256 x 32 MiB by default): size MaxPayload to the largest message
//     replication really sends.
//   - One connection is one quic-go goroutine per side doing all packet
//     work: on this VM that is about 250-450 MB/s per peer pair. Resync
//     throughput beyond that needs the replication layer to spread work
//     over peers, not over more calls.
//   - A TLS 1.3 client finishes its handshake before the server has checked
//     the client's certificate, so each new connection is confirmed with a
//     ping (TypePing, answered by the transport) before calls use it: a
//     refused certificate is ErrRefused at dial, not a failure mid-write.
//   - quic-go wants 7 MiB UDP socket buffers. Here net.core.rmem_max and
//     wmem_max are 4 MiB, which the kernel doubles to 8 MiB, enough; with
//     the distribution default (208 KiB) an unprivileged daemon gets small
//     buffers and quic-go logs a warning through the standard log package,
//     so deployment should raise both sysctls to at least 7.5 MB.
package transport
