"""SYN cookies outside XDP: the kernel probe, the nftables table and the
sysctls xdpguard owns while a policy has `syncookies = true` rules.

The XDP program answers SYNs with cookie SYN-ACKs (bpf/syncookie.h); the
client's ACK then goes to netfilter's SYNPROXY, which checks the cookie
and opens the connection to the local listener. That needs, in the
interface's network namespace (these settings are all per namespace):

* an nftables table of xdpguard's own: SYNs to the ports untracked (and
  counted: those are the SYNs the XDP path left to the stack), the
  returning ACK (conntrack state invalid or untracked) to SYNPROXY, and
  what SYNPROXY refuses dropped. SYNs the XDP path does not answer
  (VLAN-tagged, IPv4 options, IPv6 extension headers) get their cookie
  from this SYNPROXY instead;
* the sysctls SYNPROXY needs (SYSCTLS), whose values before are recorded
  in the pinned record and restored when the last interface of the
  namespace that uses them stops (re-apply without syncookies, detach).

The ruleset is built from validated integers and a validated interface
name only.
"""
from __future__ import annotations

import subprocess
from functools import lru_cache

from xdpguard.errors import LoadError, UsageError
from xdpguard.layout import C
from xdpguard.netns import check_name, in_netns
from xdpguard.pins import Syncookies

# sysctl -> the value SYNPROXY needs (the kernel selftest xdp_synproxy's set-up).
SYSCTLS = {
    "net.ipv4.tcp_syncookies": "2",
    "net.ipv4.tcp_timestamps": "1",
    "net.netfilter.nf_conntrack_tcp_loose": "0",
}

_PROBE_SRC = r"""
#include <uapi/linux/bpf.h>
#include <linux/ip.h>
#include <linux/tcp.h>
int xg_probe(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk;

    if (data + 14 + 20 + 20 > end)
        return XDP_PASS;
    if (bpf_tcp_raw_gen_syncookie_ipv4(data + 14, data + 34, 20) < 0)
        return XDP_DROP;
    if (bpf_tcp_raw_check_syncookie_ipv4(data + 14, data + 34))
        return XDP_DROP;
    sk = (struct bpf_sock *)bpf_skc_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk)
        bpf_sk_release(sk);
    return XDP_PASS;
}
"""


@lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why this kernel cannot run SYN cookies at XDP, or None when it can:
    a tiny program calling the helpers (Linux >= 6.0) is loaded, so the
    answer is the verifier's, whatever the version says."""
    from bcc import BPF
    try:
        b = BPF(text=_PROBE_SRC.encode(), cflags=["-w"])
    except Exception as e:   # bcc raises bare Exception
        return f"the probe program does not compile here ({str(e).splitlines()[0]})"
    try:
        b.load_func(b"xg_probe", BPF.XDP)
    except Exception:
        return ("the kernel refuses the SYN cookie helpers (bpf_tcp_raw_gen_syncookie_ipv4, "
                "bpf_tcp_raw_check_syncookie_ipv4; Linux >= 6.0)")
    finally:
        b.cleanup()
    return None


def require() -> None:
    """Refuse (exit 2) a policy with syncookies on a kernel without them."""
    why = unavailable()
    if why:
        raise UsageError(f"syncookies = true cannot run here: {why}; remove it from the policy")


def port_ranges(policy, mode: str = "on") -> list[list[int]]:
    """The destination port ranges of the rules whose cookies are `mode`
    (policy.Policy.cookies: "on" or "auto"), merged."""
    out: list[list[int]] = []
    for lo, hi in sorted(rng for r in policy.rules if policy.cookies(r) == mode for rng in r.dport):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def ports_text(ranges) -> str:
    """'80, 443, 8000-8100': port ranges as status and watch say them."""
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def table_name(ifindex: int) -> str:
    return f"xdpguard_{int(ifindex)}"


def _set(ranges: list[list[int]]) -> str:
    return "{ " + ", ".join(str(int(lo)) if lo == hi else f"{int(lo)}-{int(hi)}" for lo, hi in ranges) + " }"


def ruleset(table: str, iface: str, ports_: list[list[int]], auto: list[list[int]] = ()) -> str:
    """The nftables table (nft -f text), re-created whole each time.
    ports_: syncookies = true; auto: the ports `watch` may switch. An auto
    port's SYNs stay tracked: with its cookies off the stack and conntrack
    handle the handshake as without xdpguard; with them on, the XDP path
    answers the SYN, so the ACK (of no tracked connection, invalid) goes to
    SYNPROXY like a true port's."""
    check_name(iface, "iface")
    every = sorted([list(r) for r in ports_] + [list(r) for r in auto])
    match = f'iifname "{iface}" tcp dport {_set(every)}'
    opts = f"wscale {C.XG_COOKIE_WSCALE} timestamp sack-perm"
    notrack = (f'iifname "{iface}" tcp dport {_set(ports_)} tcp flags & (fin | syn | rst | ack) == syn '
               f"counter notrack" if ports_ else "")
    return f"""table inet {table}
delete table inet {table}
table inet {table} {{
    chain pre {{
        type filter hook prerouting priority raw; policy accept;
        {notrack}
    }}
    chain in {{
        type filter hook input priority filter; policy accept;
        meta nfproto ipv4 {match} ct state invalid,untracked synproxy mss {C.XG_COOKIE_MSS4} {opts}
        meta nfproto ipv6 {match} ct state invalid,untracked synproxy mss {C.XG_COOKIE_MSS6} {opts}
        {match} ct state invalid counter drop
    }}
}}
"""


def _nft(netns: str | None, text: str | None, *args: str) -> str:
    cmd = ["nft", *args] + (["-f", "-"] if text is not None else [])
    try:
        with in_netns(netns):
            r = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise LoadError("nft (nftables) is not installed: syncookies need it") from None
    if r.returncode != 0:
        raise LoadError(f"nft {' '.join(args) or '-f'} failed: {r.stderr.strip()}")
    return r.stdout


def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctls(netns: str | None) -> dict[str, str]:
    out = {}
    with in_netns(netns):
        for name in SYSCTLS:
            with open(_sysctl_path(name)) as f:
                out[name] = f.read().strip()
    return out


def write_sysctls(netns: str | None, values: dict[str, str]) -> None:
    with in_netns(netns):
        for name, value in values.items():
            if name not in SYSCTLS:
                continue          # only what this module sets
            with open(_sysctl_path(name), "w") as f:
                f.write(f"{value}\n")


def install(netns: str | None, iface: str, ifindex: int, ports_: list[list[int]],
            previous: Syncookies | None, inherited: Syncookies | None,
            auto: list[list[int]] = ()) -> Syncookies:
    """Table and sysctls in place; returns what the record keeps. ports_:
    syncookies = true's, auto: those [mitigation] syncookies = "auto" may
    switch. previous: this interface's (its sysctls were set by us);
    inherited: another interface's of the namespace, which has set them
    already."""
    saved = (previous and previous.sysctls) or (inherited and inherited.sysctls) or read_sysctls(netns)
    table = table_name(ifindex)
    _nft(netns, ruleset(table, iface, ports_, auto))
    write_sysctls(netns, SYSCTLS)
    return Syncookies(table, [list(r) for r in ports_], dict(saved), [list(r) for r in auto])


def remove(netns: str | None, rec: Syncookies, others_use: bool) -> None:
    """Delete the table; restore the sysctls unless another interface of
    the namespace still uses them (its record keeps the saved values)."""
    try:
        _nft(netns, None, "delete", "table", "inet", rec.table)
    except LoadError as e:
        if "No such file" not in str(e):
            raise
    if not others_use:
        write_sysctls(netns, rec.sysctls)


def state(netns: str | None, rec: Syncookies) -> dict:
    """What `status` shows: the table (present?), ports, sysctls now and before."""
    try:
        present = bool(_nft(netns, None, "list", "table", "inet", rec.table))
    except LoadError:
        present = False
    try:
        now = read_sysctls(netns)
    except OSError:
        now = {}
    return {"table": rec.table, "table_present": present, "ports": rec.ports, "auto_ports": rec.auto,
            "sysctls": now, "sysctls_before": rec.sysctls}
