# Kernel tests in QEMU (see vm/README.md): `make test-kernel`,
# `make test-kernel VM_KERNELS=6.12 VM_RUN=TestNBDExt4`.
# etcd-server: the cluster test runs etcd in the guest (a tool of vmrun's -tools).
APT_PACKAGES += qemu-system-x86 busybox-static e2fsprogs kmod util-linux etcd-server
TEST_TARGETS += test-kernel

VM_KERNELS ?= 6.12 6.1
VM_RUN ?=
VM_TIMEOUT ?= 10m
VM_DIR := bin/vm
# The daemon goes into the guest as /usr/bin/blockd once it exists.
VM_BLOCKD := $(if $(wildcard cmd/blockd),$(VM_DIR)/blockd)

.PHONY: test-kernel
test-kernel:
	@mkdir -p $(VM_DIR)
	$(GO) vet -tags vmtest ./vm/...
	CGO_ENABLED=0 $(GO) test -c -tags vmtest -o $(VM_DIR)/kerneltest.test ./vm/kerneltest
	$(if $(VM_BLOCKD),CGO_ENABLED=0 $(GO) build -o $(VM_BLOCKD) ./cmd/blockd)
	$(GO) build -o $(VM_DIR)/vmrun ./vm/cmd/vmrun
	time $(VM_DIR)/vmrun -kernels "$(VM_KERNELS)" -run "$(VM_RUN)" -timeout $(VM_TIMEOUT) -work $(VM_DIR) \
		-bin $(VM_DIR)/kerneltest.test $(addprefix -bin ,$(VM_BLOCKD)) \
		-- /usr/bin/kerneltest.test -test.v -test.timeout 8m
