#!/usr/bin/env bash
# Installs what lifeboat and its tests drive, from Debian's packages, when missing.
# Safe to run again: it installs nothing that is already there.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img              || need+=(qemu-utils)
have qemu-storage-daemon   || need+=(qemu-system-common)
have qemu-system-x86_64    || need+=(qemu-system-x86)
[ -x /usr/sbin/qemu-ga ]   || need+=(qemu-guest-agent)
have nbdinfo               || need+=(libnbd-bin)
have nbdkit                || need+=(nbdkit)
have rsync                 || need+=(rsync)
# libvirt: the system libvirtd (QEMU as libvirt-qemu) for protecting libvirt
# domains, and virtnbdbackup, the peer the libvirt tests and bench run beside.
have libvirtd              || need+=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
have virtnbdbackup         || need+=(virtnbdbackup)
have e2fsck                || need+=(e2fsprogs)
have cpio                  || need+=(cpio)
[ -x /bin/busybox ]        || need+=(busybox-static)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
# test/guest/build.sh: flock, and zstd where the kernel's modules are .ko.zst.
have flock                 || need+=(util-linux)
if ls /lib/modules/*/kernel/fs/ext4/ext4.ko.zst >/dev/null 2>&1; then have zstd || need+=(zstd); fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "deps: installing ${need[*]}" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
