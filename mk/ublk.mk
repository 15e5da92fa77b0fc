# ublk frontend. Host tests (ring, opcode encodings, descriptor decoding,
# queue logic against a fake driver) run in `go test -race ./...`; the
# kernel-facing tests need ublk_drv and run in the QEMU guest of vm/ under
# Debian's 6.12 kernel (6.1 has no ublk):
#   make test-ublk-vm                    all in-VM ublk tests
#   make test-ublk-vm UBLK_VM_RUN=Ext4   a subset (-test.run regexp)
.PHONY: test-ublk test-ublk-vm

UBLK_VM_KERNELS ?= 6.12
UBLK_VM_RUN ?= TestVM

APT_PACKAGES += qemu-system-x86 busybox-static e2fsprogs util-linux
TEST_TARGETS += test-ublk-vm

test-ublk:
	$(GO) test -race -count=1 ./ublk/...

test-ublk-vm:
	@mkdir -p bin/vm
	CGO_ENABLED=0 $(GO) test -c -tags vmtest -o bin/vm/ublk.test ./ublk
	$(GO) run ./vm/cmd/vmrun -kernels $(UBLK_VM_KERNELS) -timeout 10m \
		-bin bin/vm/ublk.test -run '$(UBLK_VM_RUN)' -- /usr/bin/ublk.test -test.v
