# QoS: the scheduler and its scenario tests run with `go test ./qos`
# (part of `make unit`); `make bench-qos` drives a built daemon with fio.
APT_PACKAGES += fio

.PHONY: bench-qos qos-scenarios
bench-qos: build
	$(GO) run ./bench/qos -blockd $(BIN) $(QOSBENCH_FLAGS)

# Regenerate qos/testdata/*.txt after a deliberate policy change; review
# the diff before committing.
qos-scenarios:
	$(GO) test ./qos -run Scenarios -rewrite
