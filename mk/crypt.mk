# `make bench-crypt`: encryption at rest, encrypted against plain memory
# volumes in one daemon, alternating runs, medians, and the AES-256-XTS
# ceiling of this CPU (see e2e/bench_crypt_test.go). Its correctness tests
# (IEEE 1619 vectors, engine suite, fio verify, kill -9) run in `make test`.
BENCH_CRYPT_RUNTIME ?= 5
BENCH_CRYPT_ROUNDS ?= 5
.PHONY: bench-crypt
bench-crypt:
	cd e2e && BENCH_CRYPT_RUNTIME=$(BENCH_CRYPT_RUNTIME) BENCH_CRYPT_ROUNDS=$(BENCH_CRYPT_ROUNDS) BENCH_OUT=$(CURDIR)/bench/results \
		$(GO) test -run '^$$' -bench '^BenchmarkCrypt$$' -benchtime 1x -timeout 30m .
