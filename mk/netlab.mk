# e2e/netlab: multi-node network labs in namespaces (root). nftables loads
# the fault rules (partitions, loss, one-way drops) inside the lab's
# namespaces; iproute2 builds them. With CI=true a missing tool fails the
# tests instead of skipping them.
APT_PACKAGES += nftables iproute2

# `make bench-repl`: replication benchmark (repl 1/2/3, a 200µs relay,
# resync rate), nodes in network namespaces; root. See e2e/bench_repl_test.go.
BENCH_REPL_RUNTIME ?= 5
.PHONY: bench-repl
bench-repl:
	cd e2e && BENCH_REPL_RUNTIME=$(BENCH_REPL_RUNTIME) BENCH_OUT=$(CURDIR)/bench/results $(GO) test -run '^$$' -bench '^BenchmarkRepl$$' -benchtime 1x -timeout 20m .
