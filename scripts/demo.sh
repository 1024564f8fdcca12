#!/usr/bin/env bash
# xdpguard demo (`make demo`): a two-namespace lab, policies/lab.toml on the
# server veth, real traffic (ping, HTTP to nginx and to a small server on
# 8080, a SYN burst against the per-source HTTP limit, a UDP flood from a
# spoofed range, an SSH attempt), then `xdpguard stats` and `status`.
#
# Only the lab's own namespaces and veth pair are used: no traffic touches
# the machine's interfaces. Every flood is bounded in packets and seconds.
# The lab is removed on exit, also on failure or Ctrl-C; a lab left by a
# run killed hard is removed by the next run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: run as root (XDP and network namespaces need it)" >&2
    exit 1
fi
PY=.venv/bin/python
XG=.venv/bin/xdpguard
[ -x "$PY" ] && [ -x "$XG" ] || { echo "demo.sh: no venv; run 'make setup' first" >&2; exit 1; }
for t in nsenter ping curl nginx hping3; do
    command -v "$t" >/dev/null || { echo "demo.sh: $t is missing ('make setup' installs it)" >&2; exit 1; }
done

STATE=/run/xdpguard-demo.lab
if [ -s "$STATE" ]; then
    echo "== removing the lab of an interrupted run ($(cat "$STATE"))"
    "$PY" -m testing.lab down --tag "$(cat "$STATE")" || true
fi
rm -f "$STATE"

TAG=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
TMP_POLICY=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    echo
    echo "== removing the lab ($TAG)"
    "$PY" -m testing.lab down --tag "$TAG" || rc=1
    rm -f "$STATE"
    [ -n "$TMP_POLICY" ] && rm -f "$TMP_POLICY"
    exit $rc
}
echo "$TAG" >"$STATE"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

POLICY=policies/lab.toml
if [ ! -f "$POLICY" ]; then
    TMP_POLICY=$(mktemp /tmp/xdpguard-lab-XXXXXX.toml)
    cat >"$TMP_POLICY" <<'EOF'
[policy]
name = "lab"
default = "allow"

[[rule]]
name = "ping"
src = "10.200.0.2"
proto = "icmp"
action = "allow"

[[rule]]
name = "lab-web"
src = "10.200.0.0/24"
proto = "tcp"
dport = 8080
action = "allow"

[[rule]]
name = "http-limit"
proto = "tcp"
dport = 80
action = "limit"
rate = "50/s"
burst = 50
per = "source"

[[rule]]
name = "spoofed-udp"
src = "10.200.1.0/24"
proto = "udp"
action = "deny"

[[rule]]
name = "no-ssh"
proto = "tcp"
dport = 22
action = "deny"
EOF
    POLICY=$TMP_POLICY
    echo "note: $POLICY stands in for the missing policies/lab.toml"
fi

echo "== building the lab"
eval "$("$PY" -m testing.lab up --tag "$TAG" --nginx --tcp-server 8080)"
echo "server: netns $SERVER_NS, veth $SERVER_IF, $SERVER4 (nginx :80, vhosts a.lab b.lab; http server :8080)"
echo "client: netns $CLIENT_NS, veth $CLIENT_IF, $CLIENT4, 10.200.0.10-20, spoofed range $SPOOF_NET"

client() { nsenter --net="/run/netns/$CLIENT_NS" -- "$@"; }

echo
echo "== xdpguard check $POLICY"
"$XG" check "$POLICY"
echo
echo "== xdpguard apply $POLICY --iface $SERVER_IF --netns $SERVER_NS"
"$XG" apply "$POLICY" --iface "$SERVER_IF" --netns "$SERVER_NS"

echo
echo "== ping from $CLIENT4 (allowed) and from 10.200.0.10 (policy default)"
client ping -n -q -c 5 -i 0.2 -W 1 -I "$CLIENT4" "$SERVER4" | tail -n 2
client ping -n -q -c 3 -i 0.2 -W 1 -I 10.200.0.10 "$SERVER4" | tail -n 2

echo
echo "== HTTP: nginx on port 80 (two vhosts) and the server on 8080"
for i in 1 2 3; do
    for host in a.lab b.lab; do
        printf 'curl %s -> ' "$host"
        client curl -sS --max-time 3 -H "Host: $host" "http://$SERVER4/"
    done
done
for i in 1 2 3; do
    printf 'curl :8080 -> '
    client curl -sS --max-time 3 "http://$SERVER4:8080/"
done

echo
echo "== SYN burst at port 80 from 10.200.0.11: 600 SYNs at ~500/s (limit 50/s per source, burst 50)"
client timeout 10 hping3 -q -S -p 80 -a 10.200.0.11 -i u2000 -c 600 "$SERVER4" 2>&1 \
    | grep -E 'packets (transmitted|tramitted)' || true
printf 'meanwhile another source (10.200.0.12) has its own bucket: curl -> '
client curl -sS --max-time 3 --interface 10.200.0.12 -H "Host: a.lab" "http://$SERVER4/" || echo "FAILED"

echo
echo "== UDP flood from the spoofed range $SPOOF_NET: 20 sources x 50 packets"
pids=()
for i in $(seq 1 20); do
    client timeout 5 hping3 -q --udp -p 53 -a "10.200.1.$i" -i u500 -c 50 "$SERVER4" >/dev/null 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
echo "sent 1000 datagrams (all should be dropped by 'spoofed-udp')"

echo
echo "== SSH attempt to $SERVER4:22 (denied: the SYN gets no answer)"
if client timeout 3 bash -c "exec 3<>/dev/tcp/$SERVER4/22" 2>/dev/null; then
    echo "connected (unexpected)"
else
    echo "no answer within 3s (dropped; without xdpguard it would be 'connection refused')"
fi

echo
echo "== xdpguard stats --iface $SERVER_IF --netns $SERVER_NS"
sleep 0.2
"$XG" stats --iface "$SERVER_IF" --netns "$SERVER_NS"
echo
echo "== xdpguard status --netns $SERVER_NS"
"$XG" status --netns "$SERVER_NS"
echo
echo "== xdpguard detach"
"$XG" detach --iface "$SERVER_IF" --netns "$SERVER_NS"
