// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-cgroup block I/O accounting.
 *
 * Completion adds the request's bytes, and once it is done its count and
 * latency, to per-CPU counters and a log2 histogram in `stats`. Nothing
 * is sent to user space per event: the Go side reads `stats` when it is
 * asked for a snapshot.
 *
 * The completion needs the owning cgroup and the start time. Where the
 * request carries both (a cgroup v2 blkcg on its bio whose cgroup has no
 * descendants, and the block layer's own start stamp) the completion
 * reads them off the request and the start program does nothing: the
 * common case on a kubelet node with the io controller enabled down to
 * the containers. Otherwise the start program records them in
 * `inflight`, keyed by the request's address, and the completion looks
 * them up there.
 *
 * Start: on 6.5+ kernels block_io_start, which fires in the submitter's
 * context when the block layer starts accounting the request; older
 * kernels get block_rq_issue (at dispatch, possibly from kblockd).
 * Completion: block_rq_complete on every kernel. block_io_done is not
 * used because by then the request's length is zero, and its length at
 * block_io_start misses bios merged into it later (buffered writeback
 * merges most of them): block_rq_complete reports the bytes completed.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Histogram slot i counts latencies in [2^i, 2^(i+1)) ns; the last slot
 * also takes everything longer (2^39 ns is about 9 minutes). */
#define NR_SLOTS 40

/* Op classes; keep in sync with the Op constants in probe.go. */
enum op_class {
	OP_READ = 0,
	OP_WRITE = 1,
	OP_FLUSH = 2,
	OP_DISCARD = 3,
	OP_OTHER = 4,
};

/* Indexes into `counters`. */
enum counter {
	CNT_STATS_FULL = 0, /* a completion found no room in `stats` */
	CNT_NO_START = 1,   /* a completion with no matching start */
	CNT_NO_SLOT = 2,    /* a start found no free in-flight slot */
	CNT_MAX = 3,
};

/* Kernel REQ_OP_* values (stable ABI since 4.10). */
#define REQ_OP_MASK 0xff
#define REQ_OP_READ 0
#define REQ_OP_WRITE 1
#define REQ_OP_FLUSH 2
#define REQ_OP_DISCARD 3
#define REQ_OP_SECURE_ERASE 5
#define REQ_OP_WRITE_ZEROES 9

#define MINORBITS 20

struct io_key {
	__u64 cgroup_id;
	__u32 dev; /* kernel dev_t: major << 20 | minor */
	__u32 op;
};

struct io_stats {
	__u64 ops;
	__u64 bytes;
	__u64 lat_sum_ns;
	__u64 lat_slots[NR_SLOTS];
};

/* Padded to 64 bytes so that slots do not share cache lines: start and
 * completion usually run on different CPUs and each moves the line.
 * Device, op and bytes are read at completion from the request itself. */
struct inflight_req {
	__u64 rq; /* owner; 0 when free */
	__u64 start_ns;
	__u64 cgroup_id;
	__u64 pad[5];
};

/* Set by the Go side before loading: whether the io controller lives on
 * the cgroup v2 hierarchy. Where it does not (hybrid hosts, v1 blkio), a
 * bio's blkcg never names a v2 cgroup, and with this 0 the verifier drops
 * the walk that would find that out on every request. */
const volatile __u32 blkcg_v2 = 1;

/* Non-zero accounts every device, zero only those in `devices`. A global
 * (a plain load) rather than a map lookup: it is read on every request. */
volatile __u32 all_devices = 0;

/*
 * Accounted devices (kernel dev_t, 0 = empty slot), open addressing laid
 * out by the Go side (SetDevices): a device sits in one of the
 * DEVTAB_PROBES slots after its hash. An ARRAY so that the test, made
 * twice per request, is a few inlined loads rather than hash-map calls.
 */
#define DEVTAB_SLOTS 1024 /* power of two; keep in sync with probe.go */
#define DEVTAB_PROBES 4

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEVTAB_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} devices SEC(".maps");

/* Per-CPU scratch for rq_key: slot 0 for the start program, 1 for the
 * completion program, which may interrupt it on the same CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} scratch SEC(".maps");

/*
 * In-flight requests, open addressing keyed by the request's address.
 * An ARRAY rather than a hash map: its lookups are inlined by the
 * verifier, while a hash update and delete per request cost more than
 * the rest of the program. A slot is claimed by compare-and-swap of its
 * rq field and released by the completion. A slot whose completion was
 * missed is not lost for good: requests are preallocated per tag, so
 * the same address starts again soon and reclaims it.
 */
#define INFLIGHT_SLOTS 65536 /* power of two */
#define INFLIGHT_PROBES 8

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, INFLIGHT_SLOTS);
	__type(key, __u32);
	__type(value, struct inflight_req);
} inflight SEC(".maps");

/* Per-CPU so completions on different CPUs never share a cache line;
 * the same program cannot nest on one CPU, so plain += is safe. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct io_key);
	__type(value, struct io_stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* A zeroed io_stats to insert from: too big to build on the BPF stack
 * next to everything else. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct io_stats);
} zero_stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

/*
 * tp_btf arguments are typed kernel pointers, so fields are read with
 * plain (CO-RE relocated, fault-safe) loads instead of one
 * bpf_probe_read_kernel call per hop: this runs twice per request.
 */
static __always_inline __u32 rq_dev(struct request *rq)
{
	struct gendisk *disk;

	if (bpf_core_field_exists(rq->q->disk))
		disk = rq->q->disk;
	else
		disk = ((struct request___old *)rq)->rq_disk;
	if (!disk)
		return 0;
	return (__u32)disk->major << MINORBITS | (__u32)disk->first_minor;
}

static __always_inline bool dev_wanted(__u32 dev)
{
	if (all_devices)
		return true;
	__u32 h = (dev * 0x9E3779B1u) >> 22; /* keep in sync with devHash */
#pragma unroll
	for (int i = 0; i < DEVTAB_PROBES; i++) {
		__u32 idx = (h + i) & (DEVTAB_SLOTS - 1);
		__u32 *v = bpf_map_lookup_elem(&devices, &idx);
		if (v && *v == dev)
			return true;
	}
	return false;
}

static __always_inline __u32 op_class(__u32 cmd_flags)
{
	switch (cmd_flags & REQ_OP_MASK) {
	case REQ_OP_READ:
		return OP_READ;
	case REQ_OP_WRITE:
		return OP_WRITE;
	case REQ_OP_FLUSH:
		return OP_FLUSH;
	case REQ_OP_DISCARD:
	case REQ_OP_SECURE_ERASE:
	case REQ_OP_WRITE_ZEROES:
		return OP_DISCARD;
	default:
		return OP_OTHER;
	}
}

/*
 * The cgroup to charge. The bio's blkcg names the owner even when a
 * kworker submits (buffered writeback), so it wins when it lives on the
 * cgroup v2 hierarchy (hierarchy_id 0). If the io controller is not
 * enabled down to the task's own cgroup, the blkcg is only an ancestor of
 * it; then the submitting task's cgroup is the more precise answer. On
 * hybrid hosts the blkcg belongs to v1 blkio and means nothing in v2, so
 * the task's cgroup is used.
 *
 * rq_blkcg returns the blkcg's cgroup when it is on v2, else NULL.
 */
static __always_inline struct cgroup *rq_blkcg(struct request *rq)
{
	if (!blkcg_v2 || !bpf_core_field_exists(((struct bio *)0)->bi_blkg))
		return NULL;
	struct bio *bio = rq->bio;
	if (!bio)
		return NULL;
	struct blkcg_gq *blkg = bio->bi_blkg;
	if (!blkg)
		return NULL;
	struct cgroup *cg = blkg->blkcg->css.cgroup;
	if (!cg || cg->root->hierarchy_id != 0)
		return NULL;
	return cg;
}

/*
 * Whether the request alone answers the completion: its v2 blkcg cgroup
 * has no descendants, so a submitter inside it can only sit in that very
 * cgroup (the owner is the blkcg either way, with no need for the task),
 * and the block layer stamped its start (the same clock as
 * bpf_ktime_get_ns; it does whenever it keeps I/O statistics, the
 * default). bios of different blkcgs are not merged, so rq->bio's blkcg
 * holds for the whole request. Start and completion both ask; if a
 * cgroup gains or loses a descendant in between, a skipped start shows
 * as an unmatched completion and a needless record is reclaimed when the
 * request (preallocated per tag) starts again.
 */
static __always_inline __u64 self_owned(struct request *rq, struct cgroup *cg)
{
	if (!cg || cg->nr_descendants != 0)
		return 0;
	return rq->start_time_ns;
}

/* The owner when the start program must record it, see rq_blkcg. */
static __always_inline __u64 task_owner(struct cgroup *cg)
{
	if (!cg)
		return bpf_get_current_cgroup_id();
	__u64 id = cg->kn->id;
	if (bpf_get_current_ancestor_cgroup_id(cg->level) == id)
		return bpf_get_current_cgroup_id();
	return id;
}

static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xFFFFFFFF) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	if (r >= NR_SLOTS)
		r = NR_SLOTS - 1;
	return r;
}

static __always_inline __u32 rq_hash(__u64 rq)
{
	/* Fibonacci hashing: the top bits of the product mix all of rq. */
	return (__u32)((rq * 0x9E3779B97F4A7C15ULL) >> 48);
}

/*
 * The request's address as a plain number. The verifier types rq as a
 * kernel pointer and refuses arithmetic on it; a round trip through map
 * memory (allowed to programs loaded with CAP_PERFMON) yields a scalar
 * for the cost of two inlined accesses, where bpf_probe_read_kernel
 * would be a helper call per request.
 */
static __always_inline __u64 rq_key(struct request *rq, __u32 who)
{
	__u64 *sc = bpf_map_lookup_elem(&scratch, &who);
	if (!sc)
		return 0;
	*(volatile __u64 *)sc = (__u64)(long)rq;
	return *(volatile __u64 *)sc;
}

static __always_inline int on_start(struct request *rq)
{
	if (!dev_wanted(rq_dev(rq)))
		return 0;
	struct cgroup *cg = rq_blkcg(rq);
	if (self_owned(rq, cg))
		return 0;

	__u64 key = rq_key(rq, 0);
	if (!key)
		return 0;
	/* The loops yield an index, not a pointer: clang would merge the
	 * pointers into one register the verifier can no longer type. The
	 * second lookup of an ARRAY is inlined and costs a few instructions. */
	__u32 h = rq_hash(key), found = INFLIGHT_SLOTS;
#pragma unroll
	for (int i = 0; i < INFLIGHT_PROBES; i++) {
		__u32 idx = (h + i) & (INFLIGHT_SLOTS - 1);
		struct inflight_req *s = bpf_map_lookup_elem(&inflight, &idx);
		if (!s)
			return 0;
		__u64 owner = s->rq;
		/* Ours already: the request is being issued again (requeue),
		 * or its completion took the fast path. */
		if (owner == key ||
		    (owner == 0 && __sync_val_compare_and_swap(&s->rq, 0, key) == 0)) {
			found = idx;
			break;
		}
	}
	if (found == INFLIGHT_SLOTS) {
		count(CNT_NO_SLOT);
		return 0;
	}
	struct inflight_req *slot = bpf_map_lookup_elem(&inflight, &found);
	if (!slot)
		return 0;
	/* The block layer's stamp saves a clock read where it has one. */
	__u64 start = rq->start_time_ns;
	slot->start_ns = start ? start : bpf_ktime_get_ns();
	slot->cgroup_id = task_owner(cg);
	return 0;
}

/*
 * block_rq_complete fires at the top of blk_update_request, once per
 * (possibly partial) completion, with the bytes it completes; rq's
 * remaining length still includes them. The request is done when they
 * cover the rest. Bytes are added at every completion (bios merged into
 * the request after its start are in them); the request, its latency and
 * the release of its record only when it is done.
 */
static __always_inline int on_complete(struct request *rq, __u32 nr_bytes)
{
	/* Filter first: completions on devices we do not account (the
	 * node's own disks) then cost a lookup, not a probe of the table. */
	__u32 dev = rq_dev(rq);
	if (!dev_wanted(dev))
		return 0;
	bool done = nr_bytes >= rq->__data_len;
	struct cgroup *cg = rq_blkcg(rq);
	struct io_key k = {
		.dev = dev,
		.op = op_class(rq->cmd_flags),
	};
	__u64 start = self_owned(rq, cg);
	if (start) {
		k.cgroup_id = cg->kn->id;
	} else {
		__u64 key = rq_key(rq, 1);
		if (!key)
			return 0;
		__u32 h = rq_hash(key), found = INFLIGHT_SLOTS;
#pragma unroll
		for (int i = 0; i < INFLIGHT_PROBES; i++) {
			__u32 idx = (h + i) & (INFLIGHT_SLOTS - 1);
			struct inflight_req *s = bpf_map_lookup_elem(&inflight, &idx);
			if (!s)
				return 0;
			if (s->rq == key) {
				found = idx;
				break;
			}
		}
		if (found == INFLIGHT_SLOTS) {
			/* Started before we attached or before the device was
			 * added, or its start found no slot. */
			count(CNT_NO_START);
			return 0;
		}
		struct inflight_req *in = bpf_map_lookup_elem(&inflight, &found);
		if (!in)
			return 0;
		k.cgroup_id = in->cgroup_id;
		start = in->start_ns;
		/* Release the slot only after copying it out; completions of
		 * one request do not race each other, and a start only ever
		 * claims a free slot, so a plain store releases it. */
		if (done)
			*(volatile __u64 *)&in->rq = 0;
	}
	/* A cache flush reaches the block layer as an empty write with
	 * REQ_PREFLUSH (REQ_OP_FLUSH is only the flush machinery's own
	 * request): a write that moved no data is a flush. Only a request's
	 * last completion can be empty, and only if it moved no data before. */
	if (done && k.op == OP_WRITE && nr_bytes == 0)
		k.op = OP_FLUSH;

	struct io_stats *st = bpf_map_lookup_elem(&stats, &k);
	if (!st) {
		__u32 zero = 0;
		struct io_stats *z = bpf_map_lookup_elem(&zero_stats, &zero);
		if (!z)
			return 0;
		/* NOEXIST: a racing CPU may have inserted it; either way
		 * the lookup below finds our CPU's slot. */
		bpf_map_update_elem(&stats, &k, z, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&stats, &k);
		if (!st) {
			count(CNT_STATS_FULL);
			return 0;
		}
	}
	st->bytes += nr_bytes;
	if (!done)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 lat = now > start ? now - start : 0;
	st->ops += 1;
	st->lat_sum_ns += lat;
	/* The empty asm hides slot's origin from clang, so the bound check
	 * stays right before the access where older verifiers (6.1) need it
	 * to prove the index in range. */
	__u64 slot = log2_slot(lat);
	asm volatile("" : "+r"(slot));
	if (slot < NR_SLOTS)
		st->lat_slots[slot] += 1;
	return 0;
}

SEC("tp_btf/block_io_start")
int BPF_PROG(io_start, struct request *rq)
{
	return on_start(rq);
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(rq_issue, struct request *rq)
{
	return on_start(rq);
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	return on_complete(rq, nr_bytes);
}
