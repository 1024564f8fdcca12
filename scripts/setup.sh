#!/usr/bin/env bash
# One-time (idempotent) set-up of a Debian 12 or 13 machine for xdpguard, as
# root: apt packages, kernel headers bcc can compile, bpffs, tracefs, the venv.
#
#   scripts/setup.sh                      this machine, its running kernel
#   scripts/setup.sh --kernel RELEASE     an image being prepared (a chroot,
#                                         where uname -r is the build host's):
#                                         headers for RELEASE, no mounts
set -euo pipefail
cd "$(dirname "$0")/.."

KREL=$(uname -r)
IMAGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KREL=${2:?--kernel needs a kernel release}; IMAGE=1; shift 2 ;;
        *) echo "setup.sh: unknown argument $1 (usage: setup.sh [--kernel RELEASE])" >&2; exit 2 ;;
    esac
done

# pandoc: `make man` and the test that docs/xdpguard.8 is current; man-db:
# the test that man finds the page `make install` puts in place. linux-perf:
# the bench's --flood-profile (bench/perfprofile.py) and its test.
PKGS=(python3-bpfcc bpfcc-tools bpftool xdp-tools libbpf1 linux-headers-amd64
      python3-venv python3-pip iproute2 iputils-ping nftables iptables hping3
      nginx-light curl wrk iperf3 netsniff-ng util-linux procps make git
      pandoc man-db linux-perf)
# The engines of the fleet and CrowdSec tests, where the release has them
# (the tests skip without them, and fail in CI).
ENGINES=(redis-server crowdsec crowdsec-firewall-bouncer)

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (BPF and network namespaces need it)" >&2
    exit 1
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
known() { apt-cache show "$1" >/dev/null 2>&1; }
missing=()
for p in "${PKGS[@]}" "${ENGINES[@]}"; do installed "$p" || missing+=("$p"); done
# The kernel's own headers, where the distribution has them (a kernel of
# its own, like the development VM's, has none: the fallback below).
own=linux-headers-$KREL
if ! installed "$own" && known "$own"; then missing+=("$own"); fi
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # Asked again after the update: an old package list may not know them.
    if ! installed "$own" && known "$own"; then missing+=("$own"); fi
    todo=()
    for p in "${missing[@]}"; do
        case " ${ENGINES[*]} " in
            *" $p "*) if ! known "$p"; then
                          echo "setup: $p is not in this release's packages; its tests skip (and fail in CI)"
                          continue
                      fi ;;
        esac
        todo+=("$p")
    done
    # crowdsec's postinst registers with CrowdSec's Central API (network)
    # unless this file has content; the tests run their own LAPI.
    if [[ " ${todo[*]} " == *" crowdsec "* ]] && [ ! -s /etc/crowdsec/online_api_credentials.yaml ]; then
        mkdir -p /etc/crowdsec
        echo "# no Central API (xdpguard's tests run their own LAPI)" > /etc/crowdsec/online_api_credentials.yaml
    fi
    # No packaged service starts while installing (invoke-rc.d and
    # deb-systemd-invoke ask policy-rc.d; vm/image.sh has its own): the
    # tests start their own. The other postinst steps need neither network
    # nor a running systemd (cscli registers in the local database).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    if [ ${#todo[@]} -gt 0 ]; then
        echo "setup: installing ${todo[*]}"
        apt-get install -y -q --no-install-recommends $(printf '%s\n' "${todo[@]}" | sort -u) >/dev/null
    fi
fi
# nginx, redis and crowdsec serve the tests on private namespaces and
# ports only (the tests start their own instances); never leave the packaged
# services on (CrowdSec's firewall bouncer would rewrite the host's
# nftables). Stopped only where systemd runs; disabled and masked as files,
# which works in a chroot (vm/image.sh) too. Masked: an upgrade's postinst
# unmasks only its own masks, and nothing pulls a masked unit in.
for svc in nginx "${ENGINES[@]}"; do
    if [ -d /run/systemd/system ]; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
    systemctl disable "$svc" >/dev/null 2>&1 || true
done
for svc in "${ENGINES[@]}"; do
    if installed "$svc" && [ "$(systemctl is-enabled "$svc" 2>/dev/null)" != masked ]; then
        systemctl mask "$svc" >/dev/null 2>&1 || true
    fi
done
# Without systemd as init, redis-server's SysV links (update-rc.d defaults).
if [ -x /etc/init.d/redis-server ]; then update-rc.d redis-server disable >/dev/null 2>&1 || true; fi

# The venv sees Debian's bcc (python3-bpfcc) through system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
# Keyed on the file's content, not its time: a fresh copy of an unchanged
# tree (a VM guest without network) must not reinstall.
stamp=.venv/.xdpguard-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2, xdpguard'

# Kernel headers for bcc: /lib/modules/RELEASE/build (and source). The
# candidates in order: the kernel's own, then Debian's packaged headers,
# newest first. bcc must compile the real program against them: bcc 0.26
# cannot parse 6.12's linux/bpf.h (struct bpf_wq), so Debian 12 with its
# 6.12 kernel gets the 6.1 headers; the probes take struct offsets from
# the running kernel's BTF, so older headers are safe. The choice is the
# link itself, and `xdpguard doctor` reports it.
kdir=/lib/modules/$KREL
candidates=()
[ -e "/usr/src/linux-headers-$KREL/include" ] && candidates+=("/usr/src/linux-headers-$KREL")
for d in $(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -rV); do
    [ "$d" = "/usr/src/linux-headers-$KREL" ] || candidates+=("$d")
done
[ ${#candidates[@]} -gt 0 ] || { echo "setup: no kernel headers found under /usr/src" >&2; exit 1; }
link_headers() {
    local hb=$1 hc
    # Debian's -amd64 tree includes the -common tree's Makefile: the source.
    hc=$(sed -n 's|^include \(/\S*\)/Makefile$|\1|p' "$hb/Makefile" 2>/dev/null | head -n1)
    mkdir -p "$kdir"
    ln -sfn "$hb" "$kdir/build"
    if [ -d "$hc" ]; then ln -sfn "$hc" "$kdir/source"; else rm -f "$kdir/source"; fi
}
compiles() {
    # The real program at its smallest shape, loaded as apply loads it.
    .venv/bin/python -c 'from xdpguard import loader
loader.compile_program(loader.Shape(nwords=1, vec_per_gen=256, dir4_nodes=16, dir6_nodes=16))' \
        >/tmp/xdpguard-setup-compile.log 2>&1
}
current=$(readlink -f "$kdir/build" 2>/dev/null || true)
# A choice verified once (headers, bcc) is not compiled again on every make.
verified=$kdir/.xdpguard-headers
mark="$current $(dpkg-query -W -f='${Version}' python3-bpfcc 2>/dev/null)"
if [ "$IMAGE" = 1 ]; then
    # Nothing can be compiled for a kernel that is not running: take the
    # kernel's own headers; setup on the booted image verifies the choice.
    link_headers "${candidates[0]}"
    echo "setup: headers for $KREL: ${candidates[0]} (verified when setup runs on that kernel)"
elif [ -n "$current" ] && [ -e "$current/include" ] && [ "$(cat "$verified" 2>/dev/null)" = "$mark" ]; then
    :
elif [ -n "$current" ] && [ -e "$current/include" ] && compiles; then
    echo "$mark" > "$verified"
    echo "setup: headers for $KREL: $current"
else
    chosen=""
    for hb in "${candidates[@]}"; do
        link_headers "$hb"
        if compiles; then chosen=$hb; break; fi
        echo "setup: bcc cannot compile and load xdpguard with $hb:"
        grep -m3 -E 'error:|invalid|Error' /tmp/xdpguard-setup-compile.log | sed 's/^/setup:   /' || true
    done
    if [ -z "$chosen" ]; then
        echo "setup: no installed kernel headers let bcc compile bpf/xdpguard.c; tried ${candidates[*]}" >&2
        echo "setup: install Debian's linux-headers-amd64 (or headers of an older kernel) and run setup again" >&2
        exit 1
    fi
    echo "$chosen $(dpkg-query -W -f='${Version}' python3-bpfcc 2>/dev/null)" > "$verified"
    echo "setup: headers for $KREL: $chosen"
fi
[ "$IMAGE" = 1 ] && exit 0

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
if [ ! -d /sys/kernel/tracing/events ]; then
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi

