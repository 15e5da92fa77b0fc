# Deployment: the container image, the systemd unit, the Kubernetes
# manifests (deploy/). Their tests are ordinary Go tests in `make unit`:
# deploy (manifests decoded strictly, the unit verified by
# systemd-analyze), deploy/image (the image built, read back and run in a
# chroot), e2e TestSystemdNotify, csi (csi-sanity on the host); the CSI
# node tests run in the VM (vm/kerneltest TestCSI*, part of test-kernel).
#   make image      bin/blockd-image.tar: `docker load -i` or `ctr image import` it
#   make install    /usr/local/bin/blockd and the systemd unit
# The image holds these packages' mkfs/fsck/resize tools, blkid and
# mount; skopeo reads the image back in its test; systemd-analyze
# verifies the unit (it runs without systemd as PID 1).
APT_PACKAGES += e2fsprogs xfsprogs util-linux mount systemd skopeo coreutils

IMAGE ?= bin/blockd-image.tar
IMAGE_TAG ?= blockd/blockd:dev
PREFIX ?= /usr/local

.PHONY: image install
image:
	@mkdir -p bin/image
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X github.com/blockd/blockd/cli.commit=$$(git rev-parse HEAD 2>/dev/null)$$(git diff --quiet HEAD 2>/dev/null || echo -dirty)" -o bin/image/blockd ./cmd/blockd
	$(GO) run ./deploy/image -blockd bin/image/blockd -tag $(IMAGE_TAG) -o $(IMAGE)

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/blockd
	install -D -m 0644 deploy/systemd/blockd.service $(DESTDIR)/etc/systemd/system/blockd.service
	@echo "installed; start it with: systemctl daemon-reload && systemctl enable --now blockd"
