# ublk frontend. Host tests (ring, opcode encodings, descriptor decoding,
# queue logic against a fake driver) run in `go test -race ./...`; the
# kernel-facing tests (ublk/vm_test.go, tag vmtest) need ublk_drv and run in
# the QEMU guest of vm/ (vm/README.md) under Debian's 6.12 kernel only (6.1
# has no ublk). Images and console logs go to bin/vm/ublk/ (apart from
# test-kernel's, so the two can run in parallel).
#   make test-ublk-vm                    every in-VM ublk test
#   make test-ublk-vm UBLK_VM_RUN=Ext4   a subset (-test.run regexp)
.PHONY: test-ublk test-ublk-vm

UBLK_VM_KERNELS ?= 6.12
UBLK_VM_RUN ?= TestVM
UBLK_VM_TIMEOUT ?= 10m

APT_PACKAGES += qemu-system-x86 busybox-static e2fsprogs kmod util-linux
TEST_TARGETS += test-ublk-vm

test-ublk:
	$(GO) test -race -count=1 ./ublk/...

test-ublk-vm:
	@mkdir -p bin/vm/ublk
	$(GO) vet -tags vmtest ./ublk/...
	CGO_ENABLED=0 $(GO) test -c -tags vmtest -o bin/vm/ublk/ublk.test ./ublk
	$(GO) build -o bin/vm/ublk/vmrun ./vm/cmd/vmrun
	time bin/vm/ublk/vmrun -kernels "$(UBLK_VM_KERNELS)" -run "$(UBLK_VM_RUN)" -timeout $(UBLK_VM_TIMEOUT) -work bin/vm/ublk \
		-bin bin/vm/ublk/ublk.test -- /usr/bin/ublk.test -test.v -test.timeout 8m
