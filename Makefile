# blockd — `make run` starts a demo daemon, `make test` runs the whole suite.
# Feature areas add their own targets and Debian packages in mk/*.mk:
#   APT_PACKAGES += pkg ...      packages `make deps` installs
#   TEST_TARGETS += target ...   targets `make test` runs after the Go tests
SHELL := /bin/bash
GO ?= go
export PATH := /usr/local/go/bin:$(PATH)
BIN := bin/blockd
STATE ?= $(CURDIR)/state
APT_PACKAGES := fio nbdkit libnbd-bin qemu-utils python3-libnbd nbd-client e2fsprogs
TEST_TARGETS :=

include $(wildcard mk/*.mk)

.PHONY: all build run test unit deps bench vet
all: build

build:
	$(GO) build -ldflags "-X github.com/blockd/blockd/cli.commit=$$(git rev-parse HEAD 2>/dev/null)$$(git diff --quiet HEAD 2>/dev/null || echo -dirty)" -o $(BIN) ./cmd/blockd

run: build
	@BIN=$(BIN) STATE=$(STATE) ./scripts/run.sh

deps:
	@./scripts/deps.sh $(sort $(APT_PACKAGES))

vet:
	$(GO) vet ./...

unit: deps
	$(GO) vet ./...
	CI=true $(GO) test -race -count=1 ./...
	@# Allocation tests again without the race detector, which makes
	@# sync.Pool drop items on purpose (pooled paths allocate under it).
	CI=true $(GO) test -count=1 -run 'Alloc' ./...

test: unit $(TEST_TARGETS)
	@echo "make test: all passed"
