# nbd: NBD protocol server. Its interop tests drive real clients (libnbd's
# nbdinfo/nbdsh with the system python bindings, qemu-img/qemu-io, fio's nbd
# engine); with CI=true a missing client fails the tests instead of skipping.
APT_PACKAGES += fio nbdkit libnbd-bin qemu-utils python3-libnbd

.PHONY: nbd-test nbd-fuzz nbd-bench
# (go test runs the interop tests; `make unit` sets CI=true so a missing client fails them)

# go test -race ./... already ran the package; this run makes sure the
# interop tests ran rather than skipped.
nbd-test:
	CI=true $(GO) test -race -count=1 -run Interop ./nbd/

# Short fuzzing runs of the wire parsers (seeds run in every `go test`).
nbd-fuzz:
	$(GO) test -run XXX -fuzz FuzzHandshake -fuzztime 60s ./nbd/
	$(GO) test -run XXX -fuzz FuzzRequests -fuzztime 60s ./nbd/

nbd-bench:
	$(GO) test -run XXX -bench . -benchtime 2s ./nbd/
