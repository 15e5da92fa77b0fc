#!/bin/bash
# Runs the probe's root tests inside QEMU (TCG) on a Debian kernel, with a
# pure cgroup v2 hierarchy and the io and memory controllers enabled: the
# paths the hybrid-cgroup build host cannot reach (bio blkcg attribution,
# writeback) and, on kernels before 6.5, the block_rq_issue/complete
# fallback picked by New.
#
# usage: probe/testdata/vm/run.sh KERNEL_DIR
#   KERNEL_DIR holds vmlinuz and modroot/lib/modules/*/.../loop.ko[.xz]
#   (an unpacked linux-image-*.deb). Run from the repository root.
set -euo pipefail
kdir=${1:?usage: run.sh KERNEL_DIR}
tests=${PROBE_VM_TESTS:-TestPickTracepoints|TestPodAttribution|TestDroppedCgroup|TestSetDevicesAll|TestDevOfPathAndRun|TestWritebackAttribution}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev,tmp}

CGO_ENABLED=0 go test -c -o "$root/probe.test" ./probe
cp /bin/busybox "$root/bin/busybox"
mod=$(find "$kdir/modroot" -name 'loop.ko*' | head -n1)
case $mod in
*.xz) xz -dc "$mod" >"$root/loop.ko" ;;
*) cp "$mod" "$root/loop.ko" ;;
esac

cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /sys/fs/cgroup
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+io +memory" >/sys/fs/cgroup/cgroup.subtree_control
insmod /loop.ko max_loop=8 || echo "loop built in?"
echo "kernel \$(uname -r), cgroup v2 controllers: \$(cat /sys/fs/cgroup/cgroup.subtree_control)"
/probe.test -test.v -test.count=1 -test.run '^($tests)\$'
echo "PROBE-VM-EXIT=\$?"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

# A kernel panic before init printed its "kernel ..." line means no test
# ran: under TCG an SMP guest now and then trips over its own boot-time
# code patching. Boot again then, at most twice; any later panic fails.
for attempt in 1 2 3; do
	timeout 900 qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 1024 -nographic -no-reboot -nic none \
		-kernel "$kdir/vmlinuz" -initrd "$work/initrd.gz" \
		-append "console=ttyS0 quiet panic=-1" </dev/null | tee "$work/log"
	if grep -q 'cgroup v2 controllers:' "$work/log" || ! grep -q 'Kernel panic' "$work/log"; then
		break
	fi
	echo "run.sh: the kernel panicked while booting, before any test ran (attempt $attempt of 3)" >&2
done
grep -q '^PROBE-VM-EXIT=0' "$work/log"
