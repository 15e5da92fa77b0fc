# Daemon-level ublk tests (vm/kerneltest/blockd_ublk_test.go) with fio in
# the guest, for the ublk-vs-NBD read comparison of TestBlockdUblkVsNBDLoad.
# `make test-kernel` runs the same tests without fio (the test then logs
# only its Go load generator's numbers). fio is a dynamic binary: vmrun
# copies it with the libraries ldd names (about 90 MB, hence not the
# default). Images and logs go to bin/vm/vmublk/, apart from test-kernel's.
#   make test-kernel-ublk                       6.12, every TestBlockdUblk* test
#   make test-kernel-ublk UBLK_KT_RUN=VsNBD     a subset (-test.run regexp)
#   make bench-kernel-ublk                      ublk vs NBD with fio, 3 rounds
#   make bench-kernel-ublk UBLK_FIO_ROUNDS=5 UBLK_FIO_RUNTIME=8s
# TestBlockdUblkVsNBDFio runs the same fio jobs (4k random read and write
# at QD1 and QD32, 128k sequential read and write) on one memory volume
# attached as /dev/ublkbN and as /dev/nbdN in turn, and prints the ratios
# and blockd's context switches and CPU per I/O (vm/README.md).
.PHONY: test-kernel-ublk bench-kernel-ublk

APT_PACKAGES += fio

UBLK_KT_KERNELS ?= 6.12
UBLK_KT_RUN ?= TestBlockdUblk
UBLK_KT_TIMEOUT ?= 10m
UBLK_KT_GUEST_TIMEOUT ?= 8m
UBLK_KT_ARGS ?=
UBLK_KT_DIR := bin/vm/vmublk
UBLK_FIO_ROUNDS ?= 3
UBLK_FIO_RUNTIME ?= 4s

test-kernel-ublk:
	@mkdir -p $(UBLK_KT_DIR)
	$(GO) vet -tags vmtest ./vm/...
	CGO_ENABLED=0 $(GO) test -c -tags vmtest -o $(UBLK_KT_DIR)/kerneltest.test ./vm/kerneltest
	CGO_ENABLED=0 $(GO) build -o $(UBLK_KT_DIR)/blockd ./cmd/blockd
	$(GO) build -o $(UBLK_KT_DIR)/vmrun ./vm/cmd/vmrun
	time $(UBLK_KT_DIR)/vmrun -kernels "$(UBLK_KT_KERNELS)" -run "$(UBLK_KT_RUN)" -timeout $(UBLK_KT_TIMEOUT) -work $(UBLK_KT_DIR) \
		-tools /sbin/mke2fs,/sbin/e2fsck,/usr/sbin/blkdiscard,/usr/bin/fio \
		-bin $(UBLK_KT_DIR)/kerneltest.test -bin $(UBLK_KT_DIR)/blockd \
		-- /usr/bin/kerneltest.test -test.v -test.timeout $(UBLK_KT_GUEST_TIMEOUT) $(UBLK_KT_ARGS)

bench-kernel-ublk:
	$(MAKE) test-kernel-ublk UBLK_KT_RUN=TestBlockdUblkVsNBDFio UBLK_KT_TIMEOUT=30m UBLK_KT_GUEST_TIMEOUT=25m \
		UBLK_KT_ARGS="-fio-rounds=$(UBLK_FIO_ROUNDS) -fio-runtime=$(UBLK_FIO_RUNTIME)"
