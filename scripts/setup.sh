#!/usr/bin/env bash
# One-time (idempotent) set-up of a Debian 12 machine for xdpguard, as root:
# apt packages, a kernel-headers link for bcc, bpffs, tracefs, and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(python3-bpfcc bpfcc-tools bpftool xdp-tools libbpf1 linux-headers-amd64
      python3-venv python3-pip iproute2 iputils-ping nftables iptables hping3
      nginx-light curl wrk iperf3 netsniff-ng util-linux procps)

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (BPF and network namespaces need it)" >&2
    exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# nginx is used by tests on private namespaces only; never leave it on the host.
systemctl disable --now nginx >/dev/null 2>&1 || true

# bcc needs kernel headers. When the running kernel ships none, use Debian's
# newest packaged headers (the -amd64 tree as build, -common as source).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/build/include/generated/autoconf.h" ]; then
    hb=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
    hc=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
    if [ -z "$hb" ] || [ -z "$hc" ]; then
        echo "setup: no kernel headers found under /usr/src" >&2
        exit 1
    fi
    mkdir -p "$kdir"
    ln -sfn "$hb" "$kdir/build"
    ln -sfn "$hc" "$kdir/source"
    echo "setup: linked $kdir/build -> $hb"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
if [ ! -d /sys/kernel/tracing/events ]; then
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi

# The venv sees Debian's bcc (python3-bpfcc) through system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.xdpguard-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2, netaddr, xdpguard' 
