/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Minimal, hand-written subset of the kernel types blockio.c reads.
 *
 * Every struct carries preserve_access_index, so clang emits CO-RE
 * relocations and libbpf/cilium-ebpf fix the field offsets against the
 * running kernel's BTF at load time: the layouts below only need the
 * right field names and types, not the right offsets. Keeping the subset
 * small (instead of committing a 3 MB bpftool dump) keeps `go generate`
 * reproducible from any kernel.
 */
#ifndef __BLOCKD_VMLINUX_H__
#define __BLOCKD_VMLINUX_H__

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __le16;
typedef __u16 __be16;
typedef __u32 __le32;
typedef __u32 __be32;
typedef __u64 __le64;
typedef __u64 __be64;
typedef __u32 __wsum;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef _Bool bool;
typedef __u32 blk_opf_t;
typedef __u8 blk_status_t;

enum {
	false = 0,
	true = 1,
};

/* UAPI values from linux/bpf.h, fixed by ABI. */
enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct kernfs_node {
	u64 id;
};

struct cgroup_root {
	int hierarchy_id;
};

struct cgroup;

struct cgroup_subsys_state {
	struct cgroup *cgroup;
};

struct cgroup {
	struct cgroup_subsys_state self;
	int level;
	int nr_descendants;
	struct kernfs_node *kn;
	struct cgroup_root *root;
};

struct blkcg {
	struct cgroup_subsys_state css;
};

struct blkcg_gq {
	struct blkcg *blkcg;
};

struct bio {
	struct blkcg_gq *bi_blkg;
};

struct gendisk {
	int major;
	int first_minor;
};

struct request_queue {
	struct gendisk *disk;
};

struct request {
	struct request_queue *q;
	blk_opf_t cmd_flags;
	unsigned int __data_len;
	struct bio *bio;
	u64 start_time_ns;
};

/* Before 5.16 the disk hung off the request itself. */
struct request___old {
	struct gendisk *rq_disk;
};

#pragma clang attribute pop

#endif /* __BLOCKD_VMLINUX_H__ */
