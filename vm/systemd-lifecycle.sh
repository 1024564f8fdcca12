#!/usr/bin/env bash
# The systemd unit's life in a guest (vm/run.py test): run as root in the
# guest's /xdpguard, once before a reboot and once after it.
#
#   before: make install (the man page found); a veth xgs0 made at every boot (its peer xgc0 in
#           namespace xgc, the client); /etc/xdpguard/xgs0.toml;
#           systemctl enable --now xdpguard@xgs0; reload after a policy
#           change; restart; a permanent ban of the client
#   after:  the unit came back by itself, applied the policy, and the ban
#           is in force (the client's ping is dropped, counted as banned)
#
# Only for a throw-away guest: it installs units and changes /etc.
set -euo pipefail
cd "$(dirname "$0")/.."
IF=xgs0 NS=xgc SRV=10.231.0.1 CLI=10.231.0.2
XG=/usr/local/sbin/xdpguard
step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; journalctl -u "xdpguard@$IF" --no-pager -n 40 >&2 || true; exit 1; }
# bcc compiles the program at every apply: slow under emulation.
wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || fail "$what (after ${limit} s)"
        sleep 2
    done
}
client_ping() { nsenter --net=/run/netns/$NS ping -n -q -c 3 -i 0.3 -W 1 $SRV; }
# status --json: {"interfaces": [{"iface", "attached", "sha256", ...}]}
ours() { $XG status --json | python3 -c "import json,sys
for i in json.load(sys.stdin)['interfaces']:
    if i['iface'] == '$IF': print(i['$1'])"; }
policy_sha() { ours sha256; }
attached() { [ "$(ours attached)" = True ]; }

write_policy() {  # write_policy EXTRA_PORT
    cat >/etc/xdpguard/$IF.toml <<TOML
[policy]
name = "vm-lifecycle"
default = "allow"

[[rule]]
name = "closed-port"
proto = "tcp"
dport = $1
action = "deny"
TOML
}

case "${1:-}" in
before)
    step "make install"
    make install
    step "the unit's Documentation=man:xdpguard(8) resolves; the completion is in place"
    man -w 8 xdpguard || fail "man -w 8 xdpguard after make install"
    [ -s /usr/local/share/bash-completion/completions/xdpguard ] || fail "no bash completion after make install"
    step "a veth made at every boot, before the unit"
    cat >/etc/systemd/system/xg-lab-veth.service <<UNIT
[Unit]
Description=xdpguard VM lab: veth $IF, its peer in namespace $NS
Before=xdpguard@$IF.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip netns add $NS; ip link add $IF type veth peer name xgc0 netns $NS; ip addr add $SRV/24 dev $IF; ip link set $IF up; ip -n $NS addr add $CLI/24 dev xgc0; ip -n $NS link set xgc0 up; ip -n $NS link set lo up'
[Install]
WantedBy=multi-user.target
UNIT
    # The unit gives apply TimeoutStartSec=180 (start and reload), seconds
    # on real hardware; under emulation (vm/run.py sets the slowdown) a
    # first bcc compile alone takes minutes: the same drop-in an operator
    # of a slow machine would write, stretched by that factor.
    if [ -n "${XDPGUARD_TEST_SLOWDOWN:-}" ]; then
        mkdir -p /etc/systemd/system/xdpguard@.service.d
        printf '[Service]\nTimeoutStartSec=%d\n' "$(python3 -c "print(int(180 * float('$XDPGUARD_TEST_SLOWDOWN')))")" \
            >/etc/systemd/system/xdpguard@.service.d/slow-machine.conf
    fi
    systemctl daemon-reload
    systemctl enable --now xg-lab-veth.service
    write_policy 9999
    step "systemctl enable --now xdpguard@$IF"
    systemctl enable --now "xdpguard@$IF" || fail "start"
    wait_for 600 "the unit is active and the program attached" attached
    client_ping || fail "the client cannot reach the server through an allow policy"
    sha1=$(policy_sha)
    step "reload after a policy change"
    write_policy 9998
    systemctl reload "xdpguard@$IF" || fail "reload"
    sha2=$(policy_sha)
    [ -n "$sha2" ] && [ "$sha1" != "$sha2" ] || fail "reload did not apply the new policy ($sha1 -> $sha2)"
    systemctl is-active --quiet "xdpguard@$IF" || fail "not active after reload"
    step "restart"
    systemctl restart "xdpguard@$IF" || fail "restart"
    wait_for 600 "active and attached after restart" attached
    [ "$(policy_sha)" = "$sha2" ] || fail "restart runs another policy"
    step "a permanent ban of the client"
    $XG ban $CLI --iface $IF --ttl 0 --reason "vm lifecycle" || fail "ban"
    ! client_ping || fail "the banned client still gets through"
    sync
    ;;
after)
    step "after the reboot: the unit is back"
    wait_for 900 "the unit applied the policy after the reboot" attached
    systemctl is-active --quiet "xdpguard@$IF" || fail "the unit is not active after the reboot"
    $XG bans --iface $IF --json | grep -q "$CLI" || fail "the ban is gone after the reboot"
    ! client_ping || fail "the banned client gets through after the reboot"
    $XG stats --iface $IF --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
text = json.dumps(s)
assert "ban" in text, "stats show no ban counter"
' || fail "stats"
    step "ok"
    ;;
*) echo "usage: $0 before|after" >&2; exit 2 ;;
esac
