# io_profile: `make bench-profile` runs the profile benchmark (fio's nbd
# engine against `blockd serve` on a state dir under BENCH_DIR, which must
# be on a real disk, not tmpfs) and prints every comparison in one run.
# Its correctness tests (engine suite through the stage, fio crc32c verify,
# kill -9 after FLUSH) are ordinary Go tests run by `make test`.
BENCH_DIR ?= /var/tmp
BENCH_RUNTIME ?= 8s
APT_PACKAGES += fio qemu-utils

.PHONY: bench-profile
bench-profile: build
	$(GO) run ./bench/profile -blockd $(BIN) -dir $(BENCH_DIR) -runtime $(BENCH_RUNTIME) -phase $(BENCH_RUNTIME)

# `make bench-memory`: RSS of one daemon with MEMORY_BENCH_VOLUMES sequential
# volumes read at once, against its --cache-memory budget (see bench/memory).
MEMORY_BENCH_VOLUMES ?= 200
MEMORY_BENCH_BUDGET ?= 256MiB
.PHONY: bench-memory
bench-memory: build
	$(GO) run ./bench/memory -blockd $(BIN) -dir $(BENCH_DIR) -volumes $(MEMORY_BENCH_VOLUMES) -budget $(MEMORY_BENCH_BUDGET)
