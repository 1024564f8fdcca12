"""Floods through a bench veth pair, and the receivers under test.

Two generators; both send from the sender namespace out of veth ``a``
into ``b``'s receive ring, and both give frame n the source of the pool
the other would (the same per-CPU counter and permutation in one program):

* ``live-frames`` (preferred): a bcc XDP program returning XDP_TX, run with
  BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES (batch 64) on ``a``:
  every run really transmits. A frame handed to a full ring (256 frames)
  is counted by veth as ``tx_queue_0_xdp_xmit_errors``.
* ``af_packet``, for kernels that refuse live frames
  (bpfsys.live_frames_refused) or when XDPGUARD_BENCH_GENERATOR=af_packet:
  sendmmsg of one template frame on a packet socket bound to ``a``; the
  same rewrite runs as a tc program on ``a``'s egress. A frame veth finds
  no room for is refused to the socket (ENOBUFS). The receiver gets skbs,
  which its XDP program sees only after a copy into an XDP buffer, and
  one Python thread sends them: its numbers are not comparable with
  live-frames runs.

The rewrite (``-DXGB_POOL``): source i of a pool of P is
``(n * 2654435761) mod P`` for packet n, a permutation, so every window of
P packets uses every source once. IPv4: 10.0.0.0 + i; IPv6:
2001:db8:<i as bytes 4..7>::1 (one /64 per source). Checksums are updated
incrementally (RFC 1624), so the receiving stack accepts the frames.

Receiver: ``b``'s NAPI runs threaded, pinned to the other CPU than the
sender: like a NIC queue served by its own core. "lost, ring full" of the
accounting is the frames veth had no room for.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import socket
import time
from contextlib import ExitStack, nullcontext

from bench.common import (NCPU, Lab, cpu_busy, cpu_times, ensure_sigusr1, ethtool_stats, link_stats, log, nsrun,
                          pinned_thread, run_bounded, schedstat, set_threaded_napi, set_tso, snmp, steal_times)
from xdpguard import bpfsys, packet
from xdpguard.netns import in_netns

LIVE_FRAMES, AF_PACKET = "live-frames", "af_packet"
GENERATORS = (LIVE_FRAMES, AF_PACKET)
# Forces a generator (the fallback can then be run on any kernel).
GENERATOR_ENV = "XDPGUARD_BENCH_GENERATOR"
# Where each generator's "lost, ring full" comes from (table notes).
LOST_FROM = {LIVE_FRAMES: "veth's xdp_xmit_errors", AF_PACKET: "frames veth refused to the packet socket"}

SENDER_SRC = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>

BPF_PERCPU_ARRAY(xgb_n, u64, 1);   /* frames handed to the device */
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

/* Frame *c gets its source of the pool; counts it. -1: frame too short. */
static __always_inline int xgb_rewrite(void *data, void *end, u64 *c)
{
    u32 idx = 0, v, old;

#if XGB_POOL > 1
    idx = (u32)((*c * 2654435761ULL) % XGB_POOL);
#endif
    *c += 1;
#if XGB_FAMILY == 4
    struct iphdr *ip = data + 14;
    __u16 *l4sum = data + 14 + 20 + XGB_CSUM_OFF;
    if ((void *)(l4sum + 1) > end)
        return -1;
    v = __builtin_bswap32(0x0a000000U + idx);
    old = ip->saddr;
    ip->saddr = v;
    xgb_csum(&ip->check, old & 0xffff, v & 0xffff);
    xgb_csum(&ip->check, old >> 16, v >> 16);
#else
    struct ipv6hdr *ip6 = data + 14;
    __u16 *l4sum = data + 14 + 40 + XGB_CSUM_OFF;
    if ((void *)(l4sum + 1) > end)
        return -1;
    v = __builtin_bswap32(idx);
    old = ip6->saddr.in6_u.u6_addr32[1];
    ip6->saddr.in6_u.u6_addr32[1] = v;
#endif
    /* UDP (XGB_CSUM_OFF 6): 0 is no checksum; TCP (16) always has one. */
    if (*l4sum || XGB_CSUM_OFF != 6) {
        xgb_csum(l4sum, old & 0xffff, v & 0xffff);
        xgb_csum(l4sum, old >> 16, v >> 16);
        if (!*l4sum && XGB_CSUM_OFF == 6)
            *l4sum = 0xffff;
    }
    return 0;
}

int xgb_send(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    u32 k0 = 0, k1 = 1;
    u64 *c = xgb_n.lookup(&k0);
    u64 *iv = xgb_pace.lookup(&k0);

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
    return xgb_rewrite(data, end, c) ? XDP_ABORTED : XDP_TX;
}

/* The af_packet generator's frames, on the sender veth's egress (paced by
 * the sender itself). */
int xgb_tc(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    u32 k0 = 0;
    u64 *c = xgb_n.lookup(&k0);

    if (!c || xgb_rewrite(data, end, c))
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}
"""

MAX_REPEAT = (1 << 31) - 1


def pool_sources(family: int, pool: int, limit: int | None = None) -> list[str]:
    """The source addresses a pool uses (first `limit` of them)."""
    n = pool if limit is None else min(pool, limit)
    if family == 4:
        return [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(n)]
    base = 0x20010DB8 << 96
    return [str(ipaddress.IPv6Address(base | (i << 64) | 1)) for i in range(n)]


# The generator's frames: UDP to port 9 (no socket), or TCP SYNs to port 80.
PROTOS = ("udp", "syn")
_CSUM_OFF = {"udp": 6, "syn": 16}


def template(lab: Lab, family: int, proto: str = "udp") -> bytes:
    """UDP: a 60/62-byte frame a -> b (b's real MAC and address, port 9);
    syn: a SYN to port 80 with MSS, SACK, timestamp and window scale, as
    a client's."""
    src = "10.0.0.0" if family == 4 else "2001:db8::1"
    dst = Lab.RECV_V4 if family == 4 else Lab.RECV_V6
    if proto == "syn":
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6
        ip = IP(src=src, dst=dst) if family == 4 else IPv6(src=src, dst=dst)
        f = bytes(b"\0" * 12 + b"\x08\x00" if family == 4 else b"\0" * 12 + b"\x86\xdd") + bytes(
            ip / TCP(sport=40000, dport=80, flags="S", seq=1, window=64240,
                     options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                              ("WScale", 7)]))
    elif family == 4:
        f = packet.build(src, dst, "udp", sport=40000, dport=9, payload=bytes(18))
    else:
        f = packet.build(src, dst, "udp", sport=40000, dport=9)
    mac_b = bytes.fromhex(lab.mac_b.replace(":", ""))
    mac_a = bytes.fromhex(lab.mac_a.replace(":", ""))
    return mac_b + mac_a + f[12:]


def pick_generator() -> tuple[str, str]:
    """The flood generator of this run, and why: GENERATOR_ENV if set, else
    live frames unless the kernel refuses them (tried, not guessed)."""
    forced = os.environ.get(GENERATOR_ENV)
    if forced:
        if forced not in GENERATORS:
            raise ValueError(f"{GENERATOR_ENV}={forced!r}: expected one of {', '.join(GENERATORS)}")
        return forced, f"{GENERATOR_ENV}={forced}"
    err = bpfsys.live_frames_refused()
    if err is None:
        return LIVE_FRAMES, "the kernel runs live-frame test runs"
    return AF_PACKET, f"the kernel refuses BPF_F_TEST_XDP_LIVE_FRAMES: {errno.errorcode.get(err, err)}"


# ---------------------------------------------------------------- af_packet generator

class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int

# Frames per sendmmsg: unpaced, enough to make the Python loop's share
# small; paced, small enough to keep the bursts short.
AFP_BATCH, AFP_PACED_BATCH = 256, 32
# Room for every frame veth may hold: a full socket send buffer would block
# the sender instead of the ring refusing frames (ENOBUFS, "lost").
AFP_SNDBUF = 4 << 20
SO_SNDBUFFORCE = 32         # asm-generic/socket.h; the socket module lacks it
TC_EGRESS = "ffff:fff3"     # clsact's egress hook


def _afp_loop(sock: socket.socket, frame: bytes, count: int, seconds: float, rate: float | None) -> dict:
    """sendmmsg `frame` until `count` frames were offered or for `seconds`.
    Returns the frames veth refused (ring full)."""
    batch = AFP_PACED_BATCH if rate else AFP_BATCH
    buf = ctypes.create_string_buffer(frame, len(frame))
    iov = _Iovec(ctypes.addressof(buf), len(frame))
    msgs = (_Mmsghdr * batch)()
    for m in msgs:
        m.hdr.iov, m.hdr.iovlen = ctypes.addressof(iov), 1
    fd, base = sock.fileno(), ctypes.addressof(msgs)
    offered = refused = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while offered < count:
        now = time.perf_counter()
        if now >= deadline:
            break
        if rate:
            due = t0 + offered / rate
            if now < due:
                time.sleep(min(due - now, deadline - now))
                continue
        want = min(batch, count - offered)
        n = _libc.sendmmsg(fd, base, want, 0)
        if n == want:
            offered += n
            continue
        if n > 0:
            # Frame n failed and sendmmsg drops its error: ENOBUFS, the one
            # error a frame meets there once it has been taken.
            offered += n
            err = errno.ENOBUFS
        else:
            err = ctypes.get_errno()
        if err == errno.ENOBUFS:        # veth's ring is full: this frame is dropped
            offered += 1
            refused += 1
        elif err == errno.EINTR:        # run_bounded's SIGUSR1: time is up
            break
        else:
            raise OSError(err, f"sendmmsg on {sock.getsockname()[0]}: {os.strerror(err)}")
    return {"refused": refused}


class Sender:
    """Compiled sender programs, one per (family, pool), kept for the section.

    live-frames: one BPF_PROG_TEST_RUN call per flood (each call builds and
    tears down a page pool, an RCU grace period, tens of ms on a busy VM,
    so many small calls would leave the receiver idle between them),
    bounded by `repeat` (packets) and by time (common.run_bounded: SIGUSR1,
    EINTR). af_packet: a loop of sendmmsg calls bounded by both.
    """

    def __init__(self):
        self._progs: dict = {}
        self.generator, self.why = pick_generator()
        log(f"flood generator: {self.generator} ({self.why})")
        ensure_sigusr1()

    def prog(self, family: int, pool: int, proto: str = "udp"):
        key = (family, pool, proto)
        if key not in self._progs:
            from bcc import BPF
            b = BPF(text=SENDER_SRC, cflags=["-w", f"-DXGB_FAMILY={family}", f"-DXGB_POOL={pool}ULL",
                                             f"-DXGB_CSUM_OFF={_CSUM_OFF[proto]}"])
            if self.generator == LIVE_FRAMES:
                fn = b.load_func(b"xgb_send", BPF.XDP)
            else:
                fn = b.load_func(b"xgb_tc", BPF.SCHED_CLS)
            self._progs[key] = (b, fn)
        return self._progs[key]

    def close(self) -> None:
        for b, _ in self._progs.values():
            b.cleanup()
        self._progs.clear()

    def sent(self, family: int, pool: int, proto: str = "udp") -> int:
        """Frames handed to the device so far by that sender program."""
        b, _ = self.prog(family, pool, proto)
        t = b[b"xgb_n"]
        return sum(int(v) for v in t[t.Key(0)])

    def send(self, lab: Lab, family: int, pool: int, count: int, seconds: float,
             rate: float | None = None, cpu: int = 0, monitor=None, proto: str = "udp") -> dict:
        """Transmit up to `count` frames for at most `seconds` (rate: frames/s,
        paced; else as fast as the CPU goes). monitor() runs meanwhile in
        the calling thread. Returns the frames transmitted, the time the
        sender ran, and (af_packet) the frames veth refused."""
        b, fn = self.prog(family, pool, proto)
        frame = template(lab, family, proto)
        sched: dict = {}
        extra: dict = {}

        if self.generator == LIVE_FRAMES:
            pace = b[b"xgb_pace"]
            pace[pace.Key(0)] = pace.Leaf(int(round(1e9 / rate)) if rate else 0)
            pace[pace.Key(1)] = pace.Leaf(0)
            # Paced runs drop most program runs in the sender: repeat counts
            # runs, so only the clock bounds them.
            repeat = MAX_REPEAT if rate else min(count, MAX_REPEAT)

            def work():
                bpfsys.prog_test_run(fn.fd, frame, repeat=repeat, data_out_size=0,
                                     ctx_in=bpfsys.xdp_md_ctx(lab.ia),
                                     flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
        else:
            def work():
                extra.update(_afp_loop(sock, frame, count, seconds, rate))

        def call():
            with in_netns(lab.ns_a), pinned_thread(cpu):
                lab.guard(lab.ns_a, lab.ia, lab.a)
                sched["0"] = schedstat("/proc/thread-self/schedstat")
                try:
                    work()
                finally:
                    sched["1"] = schedstat("/proc/thread-self/schedstat")

        sent0 = self.sent(family, pool, proto)
        with ExitStack() as stack:
            if self.generator == AF_PACKET:
                self._prepare_afp(lab)
                sock = stack.enter_context(self._afp_socket(lab))
                self._tc_attach(lab, fn)
                stack.callback(self._tc_detach, lab)
            r = run_bounded(call, seconds + 0.05, monitor=monitor)
        (c0, w0), (c1, w1) = sched.get("0", (0, 0)), sched.get("1", (0, 0))
        return {"sent": self.sent(family, pool, proto) - sent0, "seconds": r["t1"] - r["t0"],
                "interrupted": r["interrupted"], "cpu_s": (c1 - c0) / 1e9, "wait_s": (w1 - w0) / 1e9,
                "generator": self.generator, **extra}

    # ---- af_packet helpers

    @staticmethod
    def _prepare_afp(lab: Lab) -> None:
        # With TCP segmentation offloads on, veth hands a packet socket's
        # frames to the sending CPU's backlog, past b's NAPI (its XDP
        # program, its counters, its pinned thread). Every flood: veth
        # turns them back on when b's XDP program goes.
        set_tso(lab.ns_a, lab.a, False)

    @staticmethod
    def _afp_socket(lab: Lab) -> socket.socket:
        """A packet socket bound to `a` (protocol 0: it receives nothing)."""
        with in_netns(lab.ns_a):
            lab.guard(lab.ns_a, lab.ia, lab.a)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, AFP_SNDBUF)
                sock.bind((lab.a, 0))
            except BaseException:
                sock.close()
                raise
        return sock

    @staticmethod
    def _tc_attach(lab: Lab, fn) -> None:
        from pyroute2 import IPRoute
        with in_netns(lab.ns_a):
            lab.guard(lab.ns_a, lab.ia, lab.a)
            with IPRoute() as ipr:
                ipr.tc("add", "clsact", lab.ia)
                try:
                    ipr.tc("add-filter", "bpf", lab.ia, ":1", fd=fn.fd, name=fn.name.decode(),
                           parent=TC_EGRESS, classid=1, direct_action=True)
                except BaseException:
                    ipr.tc("del", "clsact", lab.ia)
                    raise

    @staticmethod
    def _tc_detach(lab: Lab) -> None:
        from pyroute2 import IPRoute
        with in_netns(lab.ns_a):
            lab.guard(lab.ns_a, lab.ia, lab.a)
            with IPRoute() as ipr:
                ipr.tc("del", "clsact", lab.ia)      # takes the filter with it


# ---------------------------------------------------------------- receiver-side counters

def veth_counts(lab: Lab) -> dict:
    a = ethtool_stats(lab.ns_a, lab.a)
    b = ethtool_stats(lab.ns_b, lab.b)
    return {
        "tx_dropped": link_stats(lab.ns_a, lab.a)["tx_dropped"],
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
    s = snmp(lab.ns_b)
    return {k: s.get(k, 0) for k in STACK_KEYS}


def measure(lab: Lab, sender: Sender, family: int, pool: int, count: int, seconds: float,
            dropped_fn, rate: float | None = None, settle: float = 0.05, proto: str = "udp",
            profile=None) -> dict:
    """One flood with before/after counters. dropped_fn() -> packets the
    receiver under test dropped so far (its own counters). profile(pids):
    a context manager around the flood given the receiver's NAPI threads
    (bench/perfprofile.py recording); what it yields is the result's `perf`."""
    napi = set_threaded_napi(lab, cpu=1 % NCPU)

    def napi_sched():
        xs = [schedstat(f"/proc/{p}/schedstat") for p in napi]
        return sum(x[0] for x in xs), sum(x[1] for x in xs)
    v0, s0, d0, c0, n0 = veth_counts(lab), stack_counts(lab), dropped_fn(), cpu_times(), napi_sched()
    st0 = steal_times()
    with (profile(napi) if profile and napi else nullcontext()) as perf:
        res = sender.send(lab, family, pool, count, seconds, rate=rate, proto=proto)
        st1 = steal_times()
        time.sleep(settle)   # let the receiver drain its ring
    c1, n1, v1, s1, d1 = cpu_times(), napi_sched(), veth_counts(lab), stack_counts(lab), dropped_fn()
    dv, ds = delta(v1, v0), delta(s1, s0)
    rx_cpu, rx_wait = (n1[0] - n0[0]) / 1e9, (n1[1] - n0[1]) / 1e9
    sent, dt = res["sent"], res["seconds"]
    received = dv["rx_frames"]
    lost = res["refused"] if "refused" in res else dv["xmit_err"]
    dropped = d1 - d0
    busy = cpu_busy(c0, c1)
    out = {
        "family": family, "pool": pool, "sent": sent, "seconds": dt,
        "offered_mpps": sent / dt / 1e6,
        "received": received, "receive_mpps": received / dt / 1e6,
        "dropped": dropped, "drop_mpps": dropped / dt / 1e6,
        "passed": received - dropped, "pass_mpps": (received - dropped) / dt / 1e6,
        "lost_ring_full": lost,
        "unaccounted": sent - received - lost,
        "veth": dv, "stack": {k: v for k, v in ds.items() if v},
        "cpu_busy": [round(b, 3) for b in busy],
        # Share of each CPU the hypervisor gave to others while the flood ran.
        "cpu_steal": [round((a1 - a0) / (t1 - t0), 3) if t1 > t0 else 0.0
                      for (a0, t0), (a1, t1) in zip(st0, st1)],
        "sender_bound": lost == 0,
        "generator": res["generator"],
        "napi_threads": len(napi),
        # The receiver's own CPU time (its NAPI thread does all of the
        # receive work, XDP and stack): frames per receiver-CPU-second is
        # its capacity, whatever share of the core other work left it.
        "rx_cpu_s": rx_cpu, "rx_wait_s": rx_wait, "rx_cpu_share": rx_cpu / dt if dt else None,
        "core_mpps": received / rx_cpu / 1e6 if rx_cpu > 0 else None,
        "core_drop_mpps": dropped / rx_cpu / 1e6 if rx_cpu > 0 else None,
        "tx_cpu_s": res.get("cpu_s"), "tx_wait_s": res.get("wait_s"),
    }
    if perf is not None:
        out["perf"] = perf
    return out


# ---------------------------------------------------------------- nftables / iptables receivers

def nft_apply(lab: Lab, text: str) -> None:
    nsrun(lab.ns_b, ["nft", "-f", "-"], input=text)


def nft_counters(lab: Lab, table: str) -> dict[str, int]:
    """Packets of every counter in a netdev table, by rule comment."""
    r = nsrun(lab.ns_b, ["nft", "-j", "list", "table", "netdev", table])
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
        nsrun(lab.ns_b, [tool, "-t", "raw", "-A", "PREROUTING", "-i", lab.b, "-s", src,
                      "-m", "hashlimit", "--hashlimit-above", f"{rate}/sec",
                      "--hashlimit-burst", str(burst), "--hashlimit-mode", "srcip",
                      "--hashlimit-name", f"{lab.name}{tool[:2]}",
                      "--hashlimit-htable-max", str(size), "--hashlimit-htable-size", str(min(size, 65536)),
                      "--hashlimit-htable-expire", "60000", "-j", "DROP"])


def iptables_drops(lab: Lab) -> int:
    total = 0
    for tool in ("iptables", "ip6tables"):
        r = nsrun(lab.ns_b, [tool, "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])
        for ln in r.stdout.splitlines():
            f = ln.split()
            if len(f) > 3 and f[2] == "DROP" and f[0].isdigit():
                total += int(f[0])
    return total


def iptables_flush(lab: Lab) -> None:
    for tool in ("iptables", "ip6tables"):
        nsrun(lab.ns_b, [tool, "-t", "raw", "-F", "PREROUTING"], check=False)


def log_run(mode: str, r: dict) -> None:
    core = "-" if r["core_mpps"] is None else f"{r['core_mpps']:.2f}"
    share = "-" if r["rx_cpu_share"] is None else f"{r['rx_cpu_share'] * 100:.0f}%"
    log(f"flood {mode} v{r['family']} pool {r['pool']}: offered {r['offered_mpps']:.2f} Mpps, "
        f"received {r['receive_mpps']:.2f}, dropped {r['drop_mpps']:.2f}, lost {r['lost_ring_full']}, "
        f"unaccounted {r['unaccounted']}, receiver thread {share} of a CPU -> {core} Mpps/core, "
        f"cpu {r['cpu_busy']}")
