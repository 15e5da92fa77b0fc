# eBPF per-pod block I/O probes (package probe).
#   make ebpf-generate   rebuild probe/blockio_bpfel.{go,o} from probe/bpf/*.c
#   make ebpf-check      regenerate into a temp dir and fail if the committed files differ
#   make bench-probe     fio 4k randread QD32 on a tmpfs loop device, probes off vs on (root);
#                        prints a PROBE-OVERHEAD line: median on/off ratio of the rounds,
#                        BPF ns per request (kernel BPF stats) and the overhead they imply
#   make ebpf-vm-test    the root tests in QEMU on Debian 6.1 and 6.12 kernels
APT_PACKAGES += clang llvm libbpf-dev fio util-linux qemu-system-x86 busybox-static cpio xz-utils
TEST_TARGETS += ebpf-check

.PHONY: ebpf-generate ebpf-check bench-probe

ebpf-generate:
	cd probe && $(GO) generate ./

ebpf-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	(cd probe && BPF2GO_OUTPUT_DIR="$$tmp" $(GO) generate ./) && \
	for f in blockio_bpfel.go blockio_bpfel.o; do \
		cmp -s "probe/$$f" "$$tmp/$$f" || { echo "ebpf-check: probe/$$f is stale; run make ebpf-generate and commit" >&2; exit 1; }; \
	done && echo "ebpf-check: generated BPF files up to date"

# Not part of `make test`: it measures, it does not assert. Knobs (see
# BenchmarkProbeOverhead): PROBE_BENCH_ROUNDS, PROBE_BENCH_PHASE,
# PROBE_BENCH_SETTLE, PROBE_BENCH_STATS, PROBE_BENCH_TP=io|rq,
# PROBE_BENCH_CONTROL=empty.
PROBE_BENCH_ROUNDS ?= 60
bench-probe:
	PROBE_BENCH_ROUNDS=$(PROBE_BENCH_ROUNDS) $(GO) test -run '^$$' -bench '^BenchmarkProbeOverhead$$' -benchtime 1x -timeout 20m ./probe

# Root tests in QEMU on Debian kernels (pure cgroup v2 with io+memory: bio
# blkcg and writeback attribution; 6.1: the block_rq_issue fallback).
# Each directory holds vmlinuz and modroot/ of an unpacked linux-image .deb.
# The kernels are the ones test-kernel fetched (listed when the recipe runs,
# so a fresh machine finds them after test-kernel ran).
TEST_TARGETS += ebpf-vm-test
.PHONY: ebpf-vm-test
ebpf-vm-test: test-kernel
	@set -o pipefail; kernels="$${EBPF_VM_KERNELS:-$$(ls -d $(HOME)/.cache/blockd-vm/kernels/linux-image-* 2>/dev/null)}"; \
	test -n "$$kernels" || { echo "ebpf-vm-test: no kernels in ~/.cache/blockd-vm/kernels (make test-kernel fetches them)" >&2; exit 1; }; \
	for k in $$kernels; do echo "== $$k"; log=$$(mktemp); \
		if probe/testdata/vm/run.sh "$$k" >"$$log" 2>&1; then grep -E -- '^(--- |    |kernel |PROBE-VM-EXIT)' "$$log"; rm -f "$$log"; \
		else echo "ebpf-vm-test: failed on $$k; the run's last lines:" >&2; tail -n 60 "$$log" >&2; rm -f "$$log"; exit 1; fi; done
