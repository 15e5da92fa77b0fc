# Daemon-level ublk tests (vm/kerneltest/blockd_ublk_test.go) with fio in
# the guest, for the ublk-vs-NBD read comparison of TestBlockdUblkVsNBDLoad.
# `make test-kernel` runs the same tests without fio (the test then logs
# only its Go load generator's numbers). fio is a dynamic binary: vmrun
# copies it with the libraries ldd names (about 90 MB, hence not the
# default). Images and logs go to bin/vm/vmublk/, apart from test-kernel's.
#   make test-kernel-ublk                       6.12, every TestBlockdUblk* test
#   make test-kernel-ublk UBLK_KT_RUN=VsNBD     a subset (-test.run regexp)
.PHONY: test-kernel-ublk

APT_PACKAGES += fio

UBLK_KT_KERNELS ?= 6.12
UBLK_KT_RUN ?= TestBlockdUblk
UBLK_KT_TIMEOUT ?= 10m
UBLK_KT_DIR := bin/vm/vmublk

test-kernel-ublk:
	@mkdir -p $(UBLK_KT_DIR)
	$(GO) vet -tags vmtest ./vm/...
	CGO_ENABLED=0 $(GO) test -c -tags vmtest -o $(UBLK_KT_DIR)/kerneltest.test ./vm/kerneltest
	CGO_ENABLED=0 $(GO) build -o $(UBLK_KT_DIR)/blockd ./cmd/blockd
	$(GO) build -o $(UBLK_KT_DIR)/vmrun ./vm/cmd/vmrun
	time $(UBLK_KT_DIR)/vmrun -kernels "$(UBLK_KT_KERNELS)" -run "$(UBLK_KT_RUN)" -timeout $(UBLK_KT_TIMEOUT) -work $(UBLK_KT_DIR) \
		-tools /sbin/mke2fs,/sbin/e2fsck,/usr/sbin/blkdiscard,/usr/bin/fio \
		-bin $(UBLK_KT_DIR)/kerneltest.test -bin $(UBLK_KT_DIR)/blockd \
		-- /usr/bin/kerneltest.test -test.v -test.timeout 8m
