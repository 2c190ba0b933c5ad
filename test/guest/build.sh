#!/usr/bin/env bash
# Builds lifeboat's tiny test guest: OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz,
# made from this host's Debian kernel, busybox-static and qemu-guest-agent.
#
#   test/guest/build.sh OUTDIR
#
# Cheap to run again: it does nothing when the outputs are newer than every
# input (this directory, the kernel, its modules, busybox, qemu-ga). Several
# builds into the same OUTDIR at once are serialised by a lock.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR   (e.g. $0 /tmp/lifeboat-guest-cache)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The modules the guest needs, in load order (each after what it depends on).
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
virtio_console virtio_blk crc16 crc32c_generic mbcache jbd2 ext4"

exec 9>"$out/.lock"
flock -w 300 9 || { echo "build.sh: another build holds $out/.lock for 5 minutes; remove it if no build runs" >&2; exit 1; }

# The newest kernel that has its modules installed.
find_kernel() {
  kver=""
  for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V); do
    v=${k#/boot/vmlinuz-}
    [ -d "/lib/modules/$v/kernel" ] && kver=$v
  done
  kernel=/boot/vmlinuz-$kver
  moddir=/lib/modules/$kver/kernel
}

find_kernel
if [ -n "$kver" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] &&
   [ "$(cat "$out/kernel-version" 2>/dev/null)" = "$kver" ] &&
   [ -z "$(find "$here" "$kernel" /usr/sbin/qemu-ga /bin/busybox -newer "$out/initramfs.cpio.gz" -print -quit)" ]; then
  exit 0
fi

# Only a build needs the packages (installing may need sudo): check them now.
"$root/scripts/deps.sh"
find_kernel
if [ -z "$kver" ]; then
  echo "build.sh: no /boot/vmlinuz-* with modules under /lib/modules: install linux-image-amd64" >&2
  exit 1
fi

rm -rf "$out"/.stage.*   # left by a build that was killed
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
r=$stage/root
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,proc,sys,dev,tmp,run,data,etc/qemu,var}
ln -s ../run "$r/var/run"

cp /bin/busybox "$r/bin/busybox"
cp /usr/sbin/qemu-ga "$r/usr/sbin/qemu-ga"
# The agent's shared libraries, at the paths its loader looks for them.
ldd /usr/sbin/qemu-ga | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
  mkdir -p "$r$(dirname "$lib")"
  cp -L "$lib" "$r$lib"
done

order=""
for m in $modules; do
  f=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)
  if [ -z "$f" ]; then
    if grep -q "/$m\.ko\$" "/lib/modules/$kver/modules.builtin" 2>/dev/null; then
      continue # built into this kernel
    fi
    echo "build.sh: module $m is neither under $moddir nor built into kernel $kver" >&2
    exit 1
  fi
  order="$order $m"
  case $f in
    *.xz)  /bin/busybox xzcat "$f" > "$r/lib/modules/$m.ko" ;;
    *.gz)  gzip -dc "$f" > "$r/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$r/lib/modules/$m.ko" ;;
    *)     cp "$f" "$r/lib/modules/$m.ko" ;;
  esac
done
echo "$order" > "$r/lib/modules/order"

cp -R "$here/rootfs/." "$r/"
chmod 0755 "$r/init" "$r"/bin/lb-* "$r/sbin/shutdown" "$r/etc/qemu/fsfreeze-hook"

(cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 > "$stage/initramfs.cpio.gz"
cp "$kernel" "$stage/vmlinuz"
echo "$kver" > "$stage/kernel-version"
mv -f "$stage/vmlinuz" "$out/vmlinuz"
mv -f "$stage/kernel-version" "$out/kernel-version"
# Last, so its time stamp marks a complete build.
mv -f "$stage/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "build.sh: guest for kernel $kver in $out" >&2
