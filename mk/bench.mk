# `make bench`: the fio nbd-engine job matrix against blockd (memory engine),
# nbdkit memory, qemu-nbd on /dev/shm and go-nbd's memory server. Not part of
# `make test`. Knobs (environment): BENCH_RUNTIME (s, default 10),
# BENCH_RAMP (s, 2), BENCH_ROWS, BENCH_SERVERS, BENCH_CONNS (2),
# BENCH_SIZE (1GiB), BENCH_NBDKIT_ALLOCATOR, BENCH_WORKDIR. Results:
# a markdown table on stdout, raw JSON in bench/results/<timestamp>.json.
APT_PACKAGES += fio nbdkit qemu-utils

.PHONY: bench bench-bins
bench: deps bench-bins
	./bin/nbdbench

# blockd is built when its main package exists; without it the driver skips
# the blockd column and says so.
bench-bins:
	@mkdir -p bin
	@if ls cmd/blockd/*.go >/dev/null 2>&1; then \
		echo "$(GO) build -o bin/blockd ./cmd/blockd"; $(GO) build -o bin/blockd ./cmd/blockd; \
	else echo "bench: ./cmd/blockd has no Go files yet; blockd will be skipped"; rm -f bin/blockd; fi
	$(GO) build -o bin/nbdbench ./bench/cmd/nbdbench
	$(GO) build -o bin/nbdbench-gonbd ./bench/gonbd
