"""Live-frame floods through a bench veth pair, and the receivers under test.

Sender: a bcc XDP program returning XDP_TX, run with BPF_PROG_TEST_RUN and
BPF_F_TEST_XDP_LIVE_FRAMES (batch 64) on the sender veth ``a``: every run
really transmits, into ``b``'s receive ring. The program rewrites the
source address from a per-CPU counter (``-DXGB_POOL``): source i of a pool
of P is ``(n * 2654435761) mod P`` for packet n, a permutation, so every
window of P packets uses every source once. IPv4: 10.0.0.0 + i; IPv6:
2001:db8:<i as bytes 4..7>::1 (one /64 per source). Checksums are updated
incrementally (RFC 1624), so the receiving stack accepts the frames.

Receiver: ``b``'s NAPI runs threaded, pinned to the other CPU than the
sender: like a NIC queue served by its own core. A frame the sender hands
to a full ring (256 frames) is counted by veth as
``tx_queue_0_xdp_xmit_errors``: the "lost, ring full" of the accounting.
"""
from __future__ import annotations

import ipaddress
import json
import time

from bench.common import (NCPU, Lab, cpu_busy, cpu_times, ensure_sigusr1, ethtool_stats, log, nsrun,
                          pinned_thread, run_bounded, schedstat, set_threaded_napi, snmp, steal_times)
from xdpguard import bpfsys, packet
from xdpguard.netns import in_netns

SENDER_SRC = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

BPF_PERCPU_ARRAY(xgb_n, u64, 1);   /* frames transmitted (XDP_TX) */
BPF_ARRAY(xgb_pace, u64, 2);       /* [0] ns between frames (0: as fast as possible), [1] next due */

/* RFC 1624: HC' = ~(~HC + ~m + m') on one 16-bit word. */
static __always_inline void xgb_csum(__u16 *sum, __u16 old, __u16 new)
{
    __u32 s = (__u16)~*sum;
    s += (__u16)~old;
    s += new;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    *sum = (__u16)~s;
}

int xgb_send(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    u32 k0 = 0, k1 = 1;
    u64 *c = xgb_n.lookup(&k0);
    u64 *iv = xgb_pace.lookup(&k0);
    u32 idx = 0, v, old;

    if (!c || !iv)
        return XDP_ABORTED;
    if (*iv) {
        /* Paced: a frame is due every *iv ns; the others are dropped here
         * (recycled at once, never transmitted). At most 10 ms of catch-up. */
        u64 *next = xgb_pace.lookup(&k1);
        u64 now = bpf_ktime_get_ns(), nx;

        if (!next)
            return XDP_ABORTED;
        if (now < *next)
            return XDP_DROP;
        nx = *next + *iv;
        if (nx + 10000000 < now)
            nx = now;
        *next = nx;
    }
#if XGB_POOL > 1
    idx = (u32)((*c * 2654435761ULL) % XGB_POOL);
#endif
    *c += 1;
#if XGB_FAMILY == 4
    struct iphdr *ip = data + 14;
    struct udphdr *udp = data + 14 + 20;
    if ((void *)(udp + 1) > end)
        return XDP_ABORTED;
    v = __builtin_bswap32(0x0a000000U + idx);
    old = ip->saddr;
    ip->saddr = v;
    xgb_csum(&ip->check, old & 0xffff, v & 0xffff);
    xgb_csum(&ip->check, old >> 16, v >> 16);
#else
    struct ipv6hdr *ip6 = data + 14;
    struct udphdr *udp = data + 14 + 40;
    if ((void *)(udp + 1) > end)
        return XDP_ABORTED;
    v = __builtin_bswap32(idx);
    old = ip6->saddr.in6_u.u6_addr32[1];
    ip6->saddr.in6_u.u6_addr32[1] = v;
#endif
    if (udp->check) {
        xgb_csum(&udp->check, old & 0xffff, v & 0xffff);
        xgb_csum(&udp->check, old >> 16, v >> 16);
        if (!udp->check)
            udp->check = 0xffff;
    }
    return XDP_TX;
}
"""

GOLDEN = 2654435761
MAX_REPEAT = (1 << 31) - 1


def pool_sources(family: int, pool: int, limit: int | None = None) -> list[str]:
    """The source addresses a pool uses (first `limit` of them)."""
    n = pool if limit is None else min(pool, limit)
    if family == 4:
        return [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(n)]
    base = 0x20010DB8 << 96
    return [str(ipaddress.IPv6Address(base | (i << 64) | 1)) for i in range(n)]


def template(lab: Lab, family: int) -> bytes:
    """60/62-byte UDP frame a -> b (b's real MAC and address, port 9)."""
    if family == 4:
        f = packet.build("10.0.0.0", Lab.RECV_V4, "udp", sport=40000, dport=9, payload=bytes(18))
    else:
        f = packet.build("2001:db8::1", Lab.RECV_V6, "udp", sport=40000, dport=9)
    mac_b = bytes.fromhex(lab.mac_b.replace(":", ""))
    mac_a = bytes.fromhex(lab.mac_a.replace(":", ""))
    return mac_b + mac_a + f[12:]


class Sender:
    """Compiled sender programs, one per (family, pool), kept for the section.

    One BPF_PROG_TEST_RUN call per flood: each call builds and tears down a
    page pool (an RCU grace period, tens of ms on a busy VM), so many small
    calls would leave the receiver idle between them. The call is bounded
    by `repeat` (packets) and by time (common.run_bounded: SIGUSR1, EINTR).
    """

    def __init__(self):
        self._progs: dict = {}
        ensure_sigusr1()

    def prog(self, family: int, pool: int):
        key = (family, pool)
        if key not in self._progs:
            from bcc import BPF
            b = BPF(text=SENDER_SRC, cflags=["-w", f"-DXGB_FAMILY={family}", f"-DXGB_POOL={pool}ULL"])
            fn = b.load_func(b"xgb_send", BPF.XDP)
            self._progs[key] = (b, fn)
        return self._progs[key]

    def close(self) -> None:
        for b, _ in self._progs.values():
            b.cleanup()
        self._progs.clear()

    def sent(self, family: int, pool: int) -> int:
        """Frames transmitted so far by that sender program."""
        b, _ = self.prog(family, pool)
        t = b[b"xgb_n"]
        return sum(int(v) for v in t[t.Key(0)])

    def send(self, lab: Lab, family: int, pool: int, count: int, seconds: float,
             rate: float | None = None, cpu: int = 0, monitor=None) -> dict:
        """Transmit up to `count` frames for at most `seconds` (rate: frames/s,
        paced inside the program; else as fast as the CPU goes). monitor()
        runs meanwhile in the calling thread. Returns the frames transmitted
        and the time the test run ran."""
        b, fn = self.prog(family, pool)
        pace = b[b"xgb_pace"]
        pace[pace.Key(0)] = pace.Leaf(int(round(1e9 / rate)) if rate else 0)
        pace[pace.Key(1)] = pace.Leaf(0)
        frame = template(lab, family)
        # Paced runs drop most program runs in the sender: repeat counts
        # runs, so only the clock bounds them.
        repeat = MAX_REPEAT if rate else min(count, MAX_REPEAT)

        sched: dict = {}

        def call():
            with in_netns(lab.s), pinned_thread(cpu):
                lab.guard(lab.s, lab.ia, lab.a)
                sched["0"] = schedstat("/proc/thread-self/schedstat")
                try:
                    bpfsys.prog_test_run(fn.fd, frame, repeat=repeat, data_out_size=0,
                                         ctx_in=bpfsys.xdp_md_ctx(lab.ia),
                                         flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
                finally:
                    sched["1"] = schedstat("/proc/thread-self/schedstat")

        sent0 = self.sent(family, pool)
        r = run_bounded(call, seconds + 0.05, monitor=monitor)
        (c0, w0), (c1, w1) = sched.get("0", (0, 0)), sched.get("1", (0, 0))
        return {"sent": self.sent(family, pool) - sent0, "seconds": r["t1"] - r["t0"],
                "interrupted": r["interrupted"], "cpu_s": (c1 - c0) / 1e9, "wait_s": (w1 - w0) / 1e9}


# ---------------------------------------------------------------- receiver-side counters

def veth_counts(lab: Lab) -> dict:
    a = ethtool_stats(lab.s, lab.a)
    b = ethtool_stats(lab.r, lab.b)
    return {
        "xmit": a.get("tx_queue_0_xdp_xmit", 0),
        "xmit_err": a.get("tx_queue_0_xdp_xmit_errors", 0),
        "rx_frames": sum(v for k, v in b.items() if k.endswith("_xdp_packets")),
        "rx_xdp_drops": sum(v for k, v in b.items() if k.endswith("_xdp_drops")),
        "rx_drops": sum(v for k, v in b.items() if k.startswith("rx_queue_") and k.endswith("_drops")
                        and not k.endswith("_xdp_drops")),
    }


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


STACK_KEYS = ("Ip.InReceives", "Ip.InDelivers", "Ip.InHdrErrors", "Ip.InAddrErrors", "Ip.InDiscards",
              "Udp.InDatagrams", "Udp.NoPorts", "Udp.InErrors", "Udp.InCsumErrors",
              "Ip6.Ip6InReceives", "Ip6.Ip6InDelivers", "Ip6.Udp6InDatagrams", "Ip6.Udp6NoPorts",
              "Ip6.Udp6InErrors", "Ip6.Udp6InCsumErrors", "Ip6.Ip6InDiscards", "Ip6.Ip6InAddrErrors")


def stack_counts(lab: Lab) -> dict:
    s = snmp(lab.r)
    return {k: s.get(k, 0) for k in STACK_KEYS}


def measure(lab: Lab, sender: Sender, family: int, pool: int, count: int, seconds: float,
            dropped_fn, rate: float | None = None, settle: float = 0.05) -> dict:
    """One flood with before/after counters. dropped_fn() -> packets the
    receiver under test dropped so far (its own counters)."""
    napi = set_threaded_napi(lab, cpu=1 % NCPU)

    def napi_sched():
        xs = [schedstat(f"/proc/{p}/schedstat") for p in napi]
        return sum(x[0] for x in xs), sum(x[1] for x in xs)
    v0, s0, d0, c0, n0 = veth_counts(lab), stack_counts(lab), dropped_fn(), cpu_times(), napi_sched()
    st0 = steal_times()
    res = sender.send(lab, family, pool, count, seconds, rate=rate)
    st1 = steal_times()
    time.sleep(settle)   # let the receiver drain its ring
    c1, n1, v1, s1, d1 = cpu_times(), napi_sched(), veth_counts(lab), stack_counts(lab), dropped_fn()
    dv, ds = delta(v1, v0), delta(s1, s0)
    rx_cpu, rx_wait = (n1[0] - n0[0]) / 1e9, (n1[1] - n0[1]) / 1e9
    sent, dt = res["sent"], res["seconds"]
    received = dv["rx_frames"]
    dropped = d1 - d0
    busy = cpu_busy(c0, c1)
    out = {
        "family": family, "pool": pool, "sent": sent, "seconds": dt,
        "offered_mpps": sent / dt / 1e6,
        "received": received, "receive_mpps": received / dt / 1e6,
        "dropped": dropped, "drop_mpps": dropped / dt / 1e6,
        "passed": received - dropped, "pass_mpps": (received - dropped) / dt / 1e6,
        "lost_ring_full": dv["xmit_err"],
        "unaccounted": sent - received - dv["xmit_err"],
        "veth": dv, "stack": {k: v for k, v in ds.items() if v},
        "cpu_busy": [round(b, 3) for b in busy],
        # Share of each CPU the hypervisor gave to others while the flood ran.
        "cpu_steal": [round((a1 - a0) / (t1 - t0), 3) if t1 > t0 else 0.0
                      for (a0, t0), (a1, t1) in zip(st0, st1)],
        "sender_bound": dv["xmit_err"] == 0,
        "napi_threads": len(napi),
        # The receiver's own CPU time (its NAPI thread does all of the
        # receive work, XDP and stack): frames per receiver-CPU-second is
        # its capacity, whatever share of the core other work left it.
        "rx_cpu_s": rx_cpu, "rx_wait_s": rx_wait, "rx_cpu_share": rx_cpu / dt if dt else None,
        "core_mpps": received / rx_cpu / 1e6 if rx_cpu > 0 else None,
        "core_drop_mpps": dropped / rx_cpu / 1e6 if rx_cpu > 0 else None,
        "tx_cpu_s": res.get("cpu_s"), "tx_wait_s": res.get("wait_s"),
    }
    return out


# ---------------------------------------------------------------- nftables / iptables receivers

def nft_apply(lab: Lab, text: str) -> None:
    nsrun(lab.r, ["nft", "-f", "-"], input=text)


def nft_counters(lab: Lab, table: str) -> dict[str, int]:
    """Packets of every counter in a netdev table, by rule comment."""
    r = nsrun(lab.r, ["nft", "-j", "list", "table", "netdev", table])
    out: dict[str, int] = {}
    for item in json.loads(r.stdout)["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        name = rule.get("comment", str(rule.get("handle")))
        for e in rule.get("expr", []):
            if "counter" in e:
                out[name] = out.get(name, 0) + int(e["counter"]["packets"])
    return out


def nft_drop_table(name: str, dev: str, v4: list[str], v6: list[str]) -> str:
    e4 = ", ".join(v4)
    e6 = ", ".join(v6)
    return f"""
table netdev {name} {{
    set bl4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {e4} }} }}
    set bl6 {{ type ipv6_addr; flags interval; auto-merge; elements = {{ {e6} }} }}
    chain in {{
        type filter hook ingress device "{dev}" priority 0; policy accept;
        ip saddr @bl4 counter drop comment "drop4"
        ip6 saddr @bl6 counter drop comment "drop6"
    }}
}}
"""


def nft_limit_table(name: str, dev: str, rate: int, burst: int, per_source: bool, size: int) -> str:
    """Drop what is over `rate`/s, per source (dynamic sets) or for the rule."""
    if per_source:
        r4 = (f'ip saddr 10.0.0.0/8 update @lim4 {{ ip saddr limit rate over {rate}/second '
              f'burst {burst} packets }} counter drop comment "over4"')
        r6 = (f'ip6 saddr 2001:db8::/32 update @lim6 {{ ip6 saddr limit rate over {rate}/second '
              f'burst {burst} packets }} counter drop comment "over6"')
        sets = f"""
    set lim4 {{ type ipv4_addr; size {size}; flags dynamic,timeout; timeout 60s; }}
    set lim6 {{ type ipv6_addr; size {size}; flags dynamic,timeout; timeout 60s; }}"""
    else:
        r4 = (f'ip saddr 10.0.0.0/8 limit rate over {rate}/second burst {burst} packets '
              f'counter drop comment "over4"')
        r6 = (f'ip6 saddr 2001:db8::/32 limit rate over {rate}/second burst {burst} packets '
              f'counter drop comment "over6"')
        sets = ""
    return f"""
table netdev {name} {{{sets}
    chain in {{
        type filter hook ingress device "{dev}" priority 0; policy accept;
        {r4}
        {r6}
        ip saddr 10.0.0.0/8 counter accept comment "admit4"
        ip6 saddr 2001:db8::/32 counter accept comment "admit6"
    }}
}}
"""


def iptables_hashlimit(lab: Lab, rate: int, burst: int, size: int) -> None:
    for tool, src in (("iptables", "10.0.0.0/8"), ("ip6tables", "2001:db8::/32")):
        nsrun(lab.r, [tool, "-t", "raw", "-A", "PREROUTING", "-i", lab.b, "-s", src,
                      "-m", "hashlimit", "--hashlimit-above", f"{rate}/sec",
                      "--hashlimit-burst", str(burst), "--hashlimit-mode", "srcip",
                      "--hashlimit-name", f"{lab.name}{tool[:2]}",
                      "--hashlimit-htable-max", str(size), "--hashlimit-htable-size", str(min(size, 65536)),
                      "--hashlimit-htable-expire", "60000", "-j", "DROP"])


def iptables_drops(lab: Lab) -> int:
    total = 0
    for tool in ("iptables", "ip6tables"):
        r = nsrun(lab.r, [tool, "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])
        for ln in r.stdout.splitlines():
            f = ln.split()
            if len(f) > 3 and f[2] == "DROP" and f[0].isdigit():
                total += int(f[0])
    return total


def iptables_flush(lab: Lab) -> None:
    for tool in ("iptables", "ip6tables"):
        nsrun(lab.r, [tool, "-t", "raw", "-F", "PREROUTING"], check=False)


def log_run(mode: str, r: dict) -> None:
    core = "-" if r["core_mpps"] is None else f"{r['core_mpps']:.2f}"
    share = "-" if r["rx_cpu_share"] is None else f"{r['rx_cpu_share'] * 100:.0f}%"
    log(f"flood {mode} v{r['family']} pool {r['pool']}: offered {r['offered_mpps']:.2f} Mpps, "
        f"received {r['receive_mpps']:.2f}, dropped {r['drop_mpps']:.2f}, lost {r['lost_ring_full']}, "
        f"unaccounted {r['unaccounted']}, receiver thread {share} of a CPU -> {core} Mpps/core, "
        f"cpu {r['cpu_busy']}")
