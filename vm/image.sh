#!/usr/bin/env bash
# Build, or reuse from the cache, the disk image of one guest of
# vm/guests.conf, and print its directory (root.img, vmlinuz, initrd.img,
# image.json). Needs root: debootstrap and chroot.
#
#   vm/image.sh NAME
#
# The image is Debian SUITE from the mirror this machine's apt uses, with
# systemd as PID 1, the guest's kernel and headers, the project's packages
# and venv made by its own scripts/setup.sh (run in a chroot: the guest has
# no network), and a unit that runs the job a host puts on the second disk
# (vm/guest/). The cache key is the guest's line, scripts/setup.sh,
# pyproject.toml and this file with vm/guest/: change any and the image is
# built again; a run never writes to the image (vm/run.py boots an overlay).
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: vm/image.sh NAME (a guest of vm/guests.conf)}
line=$(awk -v n="$name" '$1 == n' vm/guests.conf)
[ -n "$line" ] || { echo "image.sh: no guest '$name' in vm/guests.conf" >&2; exit 2; }
read -r _ suite kernel <<<"$line"
[ "$(id -u)" = 0 ] || { echo "image.sh: run as root (debootstrap, chroot)" >&2; exit 1; }

CACHE=${XDPGUARD_VM_CACHE:-/var/cache/xdpguard-vm}
key=$({ echo "$line"; cat scripts/setup.sh pyproject.toml vm/image.sh vm/guest/*; } | sha256sum | cut -c1-16)
out=$CACHE/$name-$key
if [ -f "$out/image.json" ]; then echo "$out"; exit 0; fi

log() { echo "image[$name]: $*" >&2; }
need=()
for t in debootstrap:debootstrap qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils \
         mkfs.ext4:e2fsprogs debugfs:e2fsprogs; do
    command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# The mirror this machine's apt already uses (deb822 or one-line sources).
sources() { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true; }
MIRROR=${XDPGUARD_VM_MIRROR:-$(sources | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ')}
SECURITY=${XDPGUARD_VM_SECURITY:-$(sources | grep -oE 'https?://[^ ]+/debian-security/?( |$)' | head -n1 | tr -d ' ')}
[ -n "$MIRROR" ] || { echo "image.sh: no Debian mirror in /etc/apt (set XDPGUARD_VM_MIRROR)" >&2; exit 1; }

mkdir -p "$CACHE"
build=$(mktemp -d "$CACHE/build-$name.XXXXXX")
root=$build/root
mounts=()
cleanup() {
    local i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" 2>/dev/null || true
    done
    rm -rf "$build"
}
trap cleanup EXIT
bindmount() { mkdir -p "${@: -1}"; mount "$@" && mounts+=("${@: -1}"); }

t0=$SECONDS
log "debootstrap $suite from $MIRROR"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,dbus,ca-certificates,kmod,initramfs-tools,e2fsprogs,iproute2,procps,python3,rsync,less \
    "$suite" "$root" "$MIRROR" >"$build/debootstrap.log" 2>&1 \
    || { tail -n 20 "$build/debootstrap.log" >&2; exit 1; }

cat >"$root/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
if [ -n "$SECURITY" ]; then
    printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$SECURITY" "$suite" >>"$root/etc/apt/sources.list.d/debian.sources"
fi
rm -f "$root/etc/apt/sources.list"

bindmount -t proc proc "$root/proc"
bindmount -t sysfs sysfs "$root/sys"
bindmount --bind /dev "$root/dev"
bindmount -t devpts devpts "$root/dev/pts"
# The registries' configuration this machine relies on, for apt and pip in
# the chroot: its CA certificates, pip's configuration and local indexes.
cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp /usr/local/share/ca-certificates/* "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" update-ca-certificates >/dev/null 2>&1
pipconf=()
for f in /etc/pip.conf /root/.config/pip/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt; do
    [ -f "$f" ] && { mkdir -p "$root$(dirname "$f")"; cp "$f" "$root$f"; pipconf+=("$f"); }
done
for d in /opt/wheels /opt/pypi /opt/pypi-more; do
    [ -d "$d" ] && bindmount --bind -o ro "$d" "$root$d"
done
printf '#!/bin/sh\n# No service starts while the image is built.\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"

in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_root apt-get update -q >/dev/null
if [ "$kernel" = default ]; then
    kpkg=linux-image-amd64
else
    kpkg=$(in_root apt-cache pkgnames linux-image- | while read -r p; do
        # shellcheck disable=SC2053  # the pattern is a glob on purpose
        if [[ $p == linux-image-$kernel-amd64 ]]; then echo "$p"; fi; done | sort -V | tail -n1)
    [ -n "$kpkg" ] || { echo "image.sh: no package linux-image-$kernel-amd64 in $suite" >&2; exit 1; }
fi
log "installing $kpkg"
in_root apt-get install -y -q --no-install-recommends "$kpkg" >"$build/kernel.log" 2>&1 \
    || { tail -n 20 "$build/kernel.log" >&2; exit 1; }
krel=$(ls "$root/lib/modules" | sort -V | tail -n1)

log "the project's own setup for kernel $krel"
mkdir -p "$root/xdpguard"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
    | tar -xf - -C "$root/xdpguard"
in_root bash /xdpguard/scripts/setup.sh --kernel "$krel" >"$build/setup.log" 2>&1 \
    || { tail -n 30 "$build/setup.log" >&2; exit 1; }
cat "$build/setup.log" >&2

# The guest: root on the first disk, the job on the second, a serial console.
echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" >"$root/etc/fstab"
echo "xg-$name" >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 xg-%s\n::1 localhost\n' "$name" >"$root/etc/hosts"
in_root passwd -d root >/dev/null
install -m 0755 vm/guest/xg-vm-job "$root/usr/local/sbin/xg-vm-job"
install -m 0644 vm/guest/xg-vm-job.service "$root/etc/systemd/system/xg-vm-job.service"
in_root systemctl enable xg-vm-job.service >/dev/null 2>&1
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer man-db.timer >/dev/null 2>&1 || true

rm -f "$root/usr/sbin/policy-rc.d" "${pipconf[@]/#/$root}"
in_root apt-get clean
info=$(in_root sh -c 'printf "%s\t%s\t%s" "$(dpkg-query -W -f="\${Version}" python3-bpfcc)" "$(python3 -V | cut -d" " -f2)" "$(readlink -f /lib/modules/'"$krel"'/build)"')
for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[i]}"; done
mounts=()

log "root filesystem image"
mkdir -p "$build/out"
cp "$root/boot/vmlinuz-$krel" "$build/out/vmlinuz"
cp "$root/boot/initrd.img-$krel" "$build/out/initrd.img"
mkfs.ext4 -q -F -L xgroot -d "$root" "$build/out/root.img" 12G
IFS=$'\t' read -r bcc py headers <<<"$info"
cat >"$build/out/image.json" <<JSON
{"guest": "$name", "suite": "$suite", "kernel": "$krel", "kernel_package": "$kpkg",
 "bcc": "$bcc", "python": "$py", "headers": "$headers", "key": "$key",
 "built": "$(date -u +%FT%TZ)", "build_seconds": $((SECONDS - t0))}
JSON
rm -rf "$CACHE/$name"-*/ 2>/dev/null || true
mv "$build/out" "$out"
log "built in $((SECONDS - t0)) s: $out"
echo "$out"
