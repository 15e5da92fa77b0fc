// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-cgroup block I/O accounting.
 *
 * Request start stamps a request in `inflight` (keyed by its address) with
 * the submitting cgroup, device, op class and size; completion moves the
 * numbers into per-CPU counters and a log2 latency histogram in `stats`.
 * Nothing is sent to user space per event: the Go side reads `stats` when
 * it is asked for a snapshot.
 *
 * Two program pairs carry the same body. On 6.5+ kernels the Go loader
 * attaches block_io_start/block_io_done (fired in the submitter's context
 * when the request is accounted); older kernels get block_rq_issue and
 * block_rq_complete.
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
	CNT_MAX = 2,
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

struct inflight_req {
	__u64 start_ns;
	__u64 cgroup_id;
	__u64 bytes;
	__u32 dev;
	__u32 op;
};

/* Config slot 0: non-zero accounts every device, zero only `devices`. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} devices SEC(".maps");

/* LRU so that a start whose completion we never see (a missed event)
 * cannot fill the map for good. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
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

static __always_inline __u32 rq_dev(struct request *rq)
{
	struct gendisk *disk = NULL;

	if (bpf_core_field_exists(rq->q->disk)) {
		disk = BPF_CORE_READ(rq, q, disk);
	} else {
		struct request___old *old = (void *)rq;
		disk = BPF_CORE_READ(old, rq_disk);
	}
	if (!disk)
		return 0;
	__u32 major = BPF_CORE_READ(disk, major);
	__u32 minor = BPF_CORE_READ(disk, first_minor);
	return major << MINORBITS | minor;
}

static __always_inline bool dev_wanted(__u32 dev)
{
	__u32 zero = 0;
	__u32 *all = bpf_map_lookup_elem(&config, &zero);
	if (all && *all)
		return true;
	return bpf_map_lookup_elem(&devices, &dev) != NULL;
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
 */
static __always_inline __u64 rq_cgroup(struct request *rq)
{
	__u64 cur = bpf_get_current_cgroup_id();

	if (!bpf_core_field_exists(((struct bio *)0)->bi_blkg))
		return cur;
	struct bio *bio = BPF_CORE_READ(rq, bio);
	if (!bio)
		return cur;
	struct cgroup *cg = BPF_CORE_READ(bio, bi_blkg, blkcg, css.cgroup);
	if (!cg)
		return cur;
	if (BPF_CORE_READ(cg, root, hierarchy_id) != 0)
		return cur;
	__u64 id = BPF_CORE_READ(cg, kn, id);
	int level = BPF_CORE_READ(cg, level);
	if (bpf_get_current_ancestor_cgroup_id(level) == id)
		return cur;
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

static __always_inline int on_start(struct request *rq)
{
	__u32 dev = rq_dev(rq);
	if (!dev_wanted(dev))
		return 0;

	struct inflight_req in = {
		.start_ns = bpf_ktime_get_ns(),
		.cgroup_id = rq_cgroup(rq),
		.bytes = BPF_CORE_READ(rq, __data_len),
		.dev = dev,
		.op = op_class(BPF_CORE_READ(rq, cmd_flags)),
	};
	__u64 key = (__u64)rq;
	bpf_map_update_elem(&inflight, &key, &in, BPF_ANY);
	return 0;
}

static __always_inline int on_done(struct request *rq)
{
	__u64 key = (__u64)rq;
	struct inflight_req *in = bpf_map_lookup_elem(&inflight, &key);
	if (!in) {
		/* Not a device we account, or started before we attached. */
		if (dev_wanted(rq_dev(rq)))
			count(CNT_NO_START);
		return 0;
	}
	__u64 now = bpf_ktime_get_ns();
	__u64 lat = now > in->start_ns ? now - in->start_ns : 0;
	struct io_key k = {
		.cgroup_id = in->cgroup_id,
		.dev = in->dev,
		.op = in->op,
	};
	__u64 bytes = in->bytes;
	bpf_map_delete_elem(&inflight, &key);

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
	st->ops += 1;
	st->bytes += bytes;
	st->lat_sum_ns += lat;
	__u32 slot = log2_slot(lat);
	if (slot < NR_SLOTS)
		st->lat_slots[slot] += 1;
	return 0;
}

SEC("tp_btf/block_io_start")
int BPF_PROG(io_start, struct request *rq)
{
	return on_start(rq);
}

SEC("tp_btf/block_io_done")
int BPF_PROG(io_done, struct request *rq)
{
	return on_done(rq);
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(rq_issue, struct request *rq)
{
	return on_start(rq);
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	return on_done(rq);
}
