// Package netlab runs several blockd "nodes" on one Linux machine, each in
// its own network namespace behind a shared switch, and breaks the network
// between them on demand. It is a normal package (not a _test file) so that
// e2e tests and benchmarks can both build labs; it needs root.
//
// # Topology
//
// A lab has a prefix P ("nlab" and four hex digits, e.g. nlab3fa2) and the
// private subnet 10.X.Y.0/24, where X.Y are the prefix's two bytes. The
// prefix is claimed with an exclusive lock file (/run/netlab/P.lock, held
// with flock for the lab's life), so labs alive at the same time, in one
// process or several, never share names or addresses.
//
//	netns P-sw   bridge P-br (no address: a plain L2 switch; STP and
//	             multicast snooping off)
//	               ├── P-s0 ─┐ veth pair
//	               ├── P-s1 ─┼─┐
//	               └── …     │ │
//	netns P-0    P-n0 ───────┘ │  10.X.Y.1/24, lo up
//	netns P-1    P-n1 ─────────┘  10.X.Y.2/24, lo up
//	…            node i has 10.X.Y.(i+1)
//
// Every interface lives inside a lab namespace; the root namespace gets
// nothing (no link, no route, no firewall rule), and the nodes have no route
// out of their /24. IPv6 is off in the lab namespaces unless Options.IPv6
// asks for it, so only the test's IPv4 traffic and ARP cross the links and
// drop counters count the test's packets alone.
//
// # Fault model
//
// Every fault is a drop where the packet arrives: an nftables chain on the
// netdev ingress hook of the receiving node's veth, in a table "netdev
// netlab" inside that node's namespace. A drop at the receiver is silent to
// the sender, as on a real network; a drop in the sender's output path
// would make sendmsg fail with EPERM, which no real link does and which
// QUIC stacks treat differently from loss. Only IPv4 is dropped; ARP
// passes, so healing takes effect at once. Frames the bridge floods to a
// node that are not addressed to it pass its rules uncounted. Traffic that
// stays inside a node (loopback, its own address) never crosses its veth
// and is never affected.
//
//   - Partition(i, j): i's chain drops ip saddr j, j's drops ip saddr i.
//   - Isolate(i): i's chain drops all IPv4; every other chain drops ip saddr i.
//     Isolation is kept apart from partitions: Rejoin does not heal a
//     Partition, nor Heal an isolation.
//   - Loss(i, p): i's chain drops p% of all IPv4 (numgen random mod 10000 <
//     100·p) and every other chain drops p% of ip saddr i, so each packet
//     that crosses i's link meets the loss once. Losses of two nodes compound.
//   - DropOneWay(from, to, sel): to's chain drops ip saddr from, narrowed by
//     the selector (protocol, source port, destination port).
//
// The lab keeps the faults as state (sets of partitions, isolated nodes,
// loss rates, one-way selectors), renders each node's chain from it and
// replaces the chain in one nft transaction (`flush chain` and the new
// rules in one `nft -f -`), only for nodes whose rules changed. So every
// call is idempotent and undone exactly by its inverse, and HealAll
// returns to a clean network. Each kind of rule counts its drops in a named
// nftables counter ("partition_from_1", "loss", …); the counters are never
// reset while the lab lives, and Stats reads them.
//
// Latency: the build hosts' kernel has no sch_netem, so Relay runs a UDP
// relay inside a node's namespace that holds each datagram for a fixed
// delay in each direction (a round trip through it costs 2×delay). Each
// direction is one FIFO with a constant delay, so it never reorders a flow.
// Its sender threads sleep with clock_nanosleep and a 1 ns timer slack:
// Go timers overshoot sub-millisecond sleeps by about a millisecond.
// RelayStats reports how late it sent datagrams (its own overhead).
//
// # Cleanup
//
// New registers the lab's teardown with t.Cleanup, so it runs even when the
// test fails: relays stop, sockets made by the Node helpers close, processes
// still running in the lab's namespaces are killed, the namespaces (and with
// them the bridge and veths) are deleted and the lock file removed. A run
// killed before its cleanup leaves namespaces behind; the first New of a
// later process deletes every lab whose lock no live process holds and whose
// namespaces are older than that process.
//
// Fault methods, Stats and Relay report failures with t.Fatalf, so call them
// from the test's goroutine. The Node socket helpers return errors and may
// be called from any goroutine.
package netlab
