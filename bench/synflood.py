"""Section synflood: a spoofed SYN flood against nginx, side by side (issue 19).

One bench veth pair per mode. Receiver ``b`` (threaded NAPI on CPU 1)
runs nginx on RECV_V4:80 and routes the flood's sources (10.0.0.0/8) back
to ``a``, so that the kernel's own SYN-ACKs leave as XDP's do. Sender ``a``
(198.51.100.2) is also the legitimate client: wrk, one new connection a
request (``Connection: close``); an XDP program on ``a`` drops what comes
back to the forged sources (and lets ``a`` take XDP_TX frames at all: a
veth peer needs one). Without xdpguard, ``b`` runs an XDP_PASS program,
so that the client's frames share the flooded ring in every mode, as on a
NIC queue. The flood: the bench's generator (live frames from
CPU 0), SYNs with a client's options from 10,000,000 forged IPv4 sources,
as fast as it goes, bounded by packets and seconds.

Modes:
    kernel                no xdpguard: the listener, with the kernel's own
                          syncookies (net.ipv4.tcp_syncookies=1)
    nft-synproxy          nftables' SYNPROXY alone: the table and sysctls
                          xdpguard installs for syncookies (xdpguard/syncookies.py),
                          no XDP program
    xdpguard              xdpguard, a rule allowing port 80, no syncookies
    xdpguard-syncookies   the same rule with syncookies = true

Each: connections per second without a flood, and during one; what
reached the listener (nstat in ``b``'s namespace: cookies the kernel sent,
SYNs its queue dropped) and the stack (the SYN counter of xdpguard's table);
the client's side (connections offered, SYNs and segments sent again, its
wait for a CPU) and the SYN-ACKs the receiver's XDP_TX could not hand back.
``b`` keeps no TIME_WAIT sockets (_Mode explains why).
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from contextlib import ExitStack

from bench import traffic
from bench.common import run as run_cmd
from bench.common import Lab, log, median, napi_threads, nsenter, nsrun, print_table
from testing.lab import _NGINX_CONF
from xdpguard import bpfsys, loader, pins, stats, syncookies
from xdpguard.compiler import compile_policy
from xdpguard.netns import in_netns
from xdpguard.policy import load as load_policy

MODES = ("kernel", "nft-synproxy", "xdpguard", "xdpguard-syncookies")
CLIENT4 = "198.51.100.2"
SPOOF_NET = "10.0.0.0/8"
POOL = 10_000_000
PORT = 80
# nstat counters of the listener's side, in b's namespace.
LISTENER = ("TcpExtSyncookiesSent", "TcpExtSyncookiesRecv", "TcpExtSyncookiesFailed", "TcpExtListenDrops",
            "TcpExtListenOverflows", "TcpExtTCPReqQFullDrop", "TcpExtTCPReqQFullDoCookies", "TcpPassiveOpens")

# On a: drop what comes back to the forged sources (10.0.0.0/8), pass the rest.
A_SRC = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
int xgs_client(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);

    if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    return (ip->daddr & bpf_htonl(0xff000000)) == bpf_htonl(0x0a000000) ? XDP_DROP : XDP_PASS;
}
"""

POLICY = """[policy]
name = "synflood"
default = "allow"

[[rule]]
name = "web"
proto = "tcp"
dport = {port}
action = "allow"
{cookies}
"""


# nstat counters of the client's side, in a's namespace: the connections
# wrk tried, and the SYNs it had to send again (a SYN or its SYN-ACK lost).
CLIENT = ("TcpActiveOpens", "TcpExtTCPSynRetrans", "TcpAttemptFails", "TcpRetransSegs", "TcpExtTCPTimeouts")


def _nstat(lab: Lab, ns: str | None = None, keys=LISTENER) -> dict[str, int]:
    out = nsrun(ns or lab.ns_b, ["nstat", "-az", "--json"], check=False).stdout
    import json
    try:
        doc = json.loads(out)["kernel"]
    except (ValueError, KeyError):
        return {}
    return {k: int(doc.get(k, 0)) for k in keys}


def _sched(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a
    process so far, all its threads (/proc/<pid>/task/*/schedstat)."""
    from bench.common import schedstat
    run = wait = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for t in tasks:
        r, w = schedstat(f"/proc/{pid}/task/{t}/schedstat")
        run, wait = run + r, wait + w
    return run / 1e9, wait / 1e9


def _sched_all(pids) -> tuple[float, float]:
    from bench.common import schedstat
    xs = [schedstat(f"/proc/{p}/schedstat") for p in pids]
    return sum(x[0] for x in xs) / 1e9, sum(x[1] for x in xs) / 1e9


def _ring(lab: Lab) -> dict[str, int]:
    """What b's XDP sent back to a (XDP_TX), and what a's ring refused."""
    from bench.common import ethtool_stats
    b = ethtool_stats(lab.ns_b, lab.b)
    return {"xdp_tx": sum(v for k, v in b.items() if k.endswith("_xdp_tx")),
            "xdp_tx_errors": sum(v for k, v in b.items() if k.endswith("_xdp_tx_errors"))}


def _wrk(lab: Lab, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(nsenter(lab.ns_a, ["wrk", "-t1", "-c16", f"-d{seconds:.0f}s", "-H", "Connection: close",
                                               f"http://{Lab.RECV_V4}:{PORT}/"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wrk_result(p: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    n = re.search(r"(\d+) requests in ([\d.]+)s", out)
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"conns_per_s": float(m.group(1)) if m else None, "requests": int(n.group(1)) if n else None,
            "errors": dict(zip(("connect", "read", "write", "timeout"), map(int, e.groups()))) if e else {},
            "output": out.strip()[-400:] + err.strip()[-200:]}


class _Mode:
    """A mode's receiver side on one veth pair; close() undoes it."""

    def __init__(self, ctx, lab: Lab, mode: str, client_fd: int):
        self.lab, self.mode, self.stack = lab, mode, ExitStack()
        self.dir = pins.iface_dir(lab.ns_b, lab.b)
        lab.ip(lab.ns_a, f"addr add {CLIENT4}/24 dev {lab.a}")
        lab.ip(lab.ns_b, f"route add {SPOOF_NET} via {CLIENT4}")
        with in_netns(lab.ns_a):
            lab.guard(lab.ns_a, lab.ia, lab.a)
            bpfsys.xdp_attach(lab.ia, client_fd, bpfsys.XDP_FLAGS_DRV_MODE)
        # What b sends back is taken off a's ring by a's own NAPI thread on
        # the sender's CPU, not in b's softirq on the receiver's core.
        run_cmd(["ip", "netns", "exec", lab.ns_a, "sh", "-c", f"echo 1 > /sys/class/net/{lab.a}/threaded"], check=False)
        for pid in napi_threads(lab.a):
            os.sched_setaffinity(pid, {0})
        # The one wrk client stands for many: it recycles its ports at
        # thousands of connections a second, so its 4-tuples come back
        # while the listener still holds them in TIME_WAIT (60 s), which
        # clients on many addresses rarely do. Through SYNPROXY
        # (syncookies, nft-synproxy) the listener then takes SYNPROXY's
        # SYN on the TIME_WAIT socket instead of a fresh one, and that
        # handshake stalls about a second (its SYN-ACK is retransmitted
        # and reaches the client, which answers with a challenge ACK):
        # 0.3-1 % of connections, p99 1.1-1.6 s, half of wrk's rate.
        # Without TIME_WAIT sockets on b, every mode sees fresh tuples.
        run_cmd(["ip", "netns", "exec", lab.ns_b, "sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0"], check=False)
        self._nginx(ctx)
        if not mode.startswith("xdpguard"):
            # An XDP_PASS program on b: like a NIC queue, b then takes the
            # client's frames on the ring the flood fills (without one,
            # veth hands the client's skbs to the sending CPU's backlog,
            # past the flood), and the generator's frames at all.
            with in_netns(lab.ns_b):
                lab.guard(lab.ns_b, lab.ib, lab.b)
                bpfsys.xdp_attach(lab.ib, ctx.tiny.pass_fd, bpfsys.XDP_FLAGS_DRV_MODE)
            self.stack.callback(self._detach_b)
        self.cookies = None
        if mode == "nft-synproxy":
            self.cookies = syncookies.install(lab.ns_b, lab.b, lab.ib, [[PORT, PORT]], None, None)
            self.stack.callback(syncookies.remove, lab.ns_b, self.cookies, False)
        elif mode.startswith("xdpguard"):
            path = ctx.workdir / f"synflood-{mode}.toml"
            path.write_text(POLICY.format(port=PORT, cookies="syncookies = true" if mode.endswith("cookies") else ""))
            pol = load_policy(path)
            rec = loader.apply(pol, compile_policy(pol), lab.b, netns=lab.ns_b, mode="native",
                               log=lambda m: log("xdpguard: " + m))
            self.cookies = rec.syncookies
            self.stack.callback(loader.detach, lab.b, lab.ns_b, lambda m: None)

    def _nginx(self, ctx) -> None:
        d = ctx.workdir / f"nginx-{self.lab.name}"
        d.mkdir(parents=True, exist_ok=True)
        server = (f"    server {{\n        listen {Lab.RECV_V4}:{PORT} backlog=4096;\n"
                  f"        location / {{ return 200 \"ok\\n\"; }}\n    }}")
        conf = d / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(dir=d, servers=server).replace("access_log " + str(d) + "/access.log",
                                                                         "access_log off"))
        p = subprocess.Popen(nsenter(self.lab.ns_b, ["nginx", "-p", str(d), "-c", str(conf), "-e",
                                                     str(d / "error.log")]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.stack.callback(lambda: (p.terminate(), p.wait(timeout=10)))
        for _ in range(100):
            if nsrun(self.lab.ns_b, ["ss", "-ltnH", f"sport = :{PORT}"], check=False).stdout.strip():
                return
            time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def _detach_b(self) -> None:
        with in_netns(self.lab.ns_b):
            bpfsys.xdp_detach(self.lab.ib)

    def syns_to_stack(self) -> int | None:
        """SYNs to the port that the stack got (the counter of the table's
        notrack rule); None without the table."""
        if not self.cookies:
            return None
        import json
        r = nsrun(self.lab.ns_b, ["nft", "-j", "list", "table", "inet", self.cookies.table], check=False)
        for item in json.loads(r.stdout or '{"nftables": []}')["nftables"]:
            rule = item.get("rule")
            if rule and rule["chain"] == "pre":
                return next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), None)
        return None

    def xdp_counts(self) -> tuple[int, int]:
        """(dropped, seen) of xdpguard's counters (0, 0 without it)."""
        if not self.mode.startswith("xdpguard"):
            return 0, 0
        s = stats.read_stats(self.dir)
        fixed = sum(s[k]["packets"] for k in ("bans", "malformed", "new_source_overflow", "syncookie_bad_acks"))
        return (sum(r["dropped_packets"] for r in s["rules"]) + fixed,
                sum(r["packets"] for r in s["rules"]) + fixed + s["syncookie_synacks"]["packets"])

    def close(self) -> None:
        try:
            with in_netns(self.lab.ns_a):
                bpfsys.xdp_detach(self.lab.ia)
        except OSError:
            pass
        self.stack.close()


def _one(ctx, sender, mode: str, client_fd: int, seconds: float, count: int) -> dict:
    out: dict = {"mode": mode}
    with Lab(tag="s") as lab:
        m = _Mode(ctx, lab, mode, client_fd)
        try:
            p = _wrk(lab, seconds)
            out["baseline"] = _wrk_result(p, seconds + 30)
            n0, s0, x0 = _nstat(lab), m.syns_to_stack(), m.xdp_counts()
            c0, g0 = _nstat(lab, lab.ns_a, CLIENT), _ring(lab)
            p = _wrk(lab, seconds)
            time.sleep(0.2)     # wrk's connections first
            a_napi = napi_threads(lab.a)
            w0, a0 = _sched(p.pid), _sched_all(a_napi)
            # wrk's CPU is read while it runs (it may end with the flood).
            last, done = [w0], threading.Event()

            def sample():
                while not done.wait(0.05):
                    w = _sched(p.pid)
                    if w[0] >= last[0][0]:
                        last[0] = w
            t = threading.Thread(target=sample, daemon=True)
            t.start()
            try:
                r = traffic.measure(lab, sender, 4, POOL, count, seconds - 0.4, lambda: m.xdp_counts()[0],
                                    proto="syn")
            finally:
                done.set()
                t.join()
            w1, a1 = last[0], _sched_all(a_napi)
            out["flood"] = {k: r[k] for k in ("sent", "seconds", "offered_mpps", "received", "receive_mpps",
                                               "lost_ring_full", "rx_cpu_share", "core_mpps", "generator",
                                               "cpu_busy")}
            out["during"] = _wrk_result(p, seconds + 30)
            n1, s1, x1 = _nstat(lab), m.syns_to_stack(), m.xdp_counts()
            c1, g1 = _nstat(lab, lab.ns_a, CLIENT), _ring(lab)
            # The client's side of it: the connections it offered (SYNs
            # sent the first time), SYNs sent again, its CPU while the flood
            # ran, and what the receiver's XDP_TX could not hand to a.
            out["client"] = {**{k: c1.get(k, 0) - c0.get(k, 0) for k in CLIENT},
                             "offered_per_s": (c1.get("TcpActiveOpens", 0) - c0.get("TcpActiveOpens", 0)) / seconds,
                             "wrk_cpu_s": w1[0] - w0[0], "wrk_wait_s": w1[1] - w0[1],
                             "a_napi_cpu_s": a1[0] - a0[0], "a_napi_wait_s": a1[1] - a0[1],
                             **{k: g1[k] - g0[k] for k in g1}}
            out["listener"] = {k: n1.get(k, 0) - n0.get(k, 0) for k in LISTENER}
            out["syns_to_stack"] = None if s0 is None else s1 - s0
            out["xdp"] = {"dropped": x1[0] - x0[0], "seen": x1[1] - x0[1]}
            if mode == "xdpguard-syncookies":
                s = stats.read_stats(m.dir)
                out["xdp"]["cookie_synacks"] = s["syncookie_synacks"]["packets"]
        finally:
            m.close()
    return out


def run(ctx) -> dict:
    if syncookies.unavailable():
        return {"skipped": syncookies.unavailable()}
    seconds, count = (3.0, 10_000_000) if ctx.quick else (5.0, 40_000_000)
    from bcc import BPF
    b = BPF(text=A_SRC, cflags=["-w"])
    client_fd = b.load_func(b"xgs_client", BPF.XDP).fd
    sender = traffic.Sender()
    result: dict = {"pool": POOL, "seconds": seconds, "count": count, "generator": sender.generator,
                    "runs": []}
    try:
        sender.prog(4, POOL, "syn")
        for mode in MODES:
            log(f"synflood {mode} ...")
            try:
                result["runs"].append(_one(ctx, sender, mode, client_fd, seconds, count))
            except Exception as e:  # noqa: BLE001 - keep the other modes
                log(f"synflood {mode}: {type(e).__name__}: {e}")
                result["runs"].append({"mode": mode, "error": f"{type(e).__name__}: {e}"})
    finally:
        sender.close()
        b.cleanup()

    by = {r["mode"]: r for r in result["runs"] if "error" not in r}
    base = median([r["baseline"]["conns_per_s"] for r in by.values()])
    rows = []
    for r in result["runs"]:
        if "error" in r:
            rows.append([r["mode"]] + ["-"] * 15 + [r["error"][:60]])
            continue
        b0, b1 = r["baseline"]["conns_per_s"], r["during"]["conns_per_s"]
        lst = r["listener"]
        cl = r["client"]
        rows.append([r["mode"], b0, b1, (b1 / base) if b1 is not None and base else None,
                     (b1 / b0) if b1 is not None and b0 else None,
                     r["flood"]["offered_mpps"], r["flood"]["receive_mpps"], r["flood"]["core_mpps"],
                     r["flood"]["rx_cpu_share"],
                     lst["TcpExtSyncookiesSent"] + lst["TcpExtListenDrops"],
                     "-" if r["syns_to_stack"] is None else r["syns_to_stack"],
                     cl["offered_per_s"], cl["TcpExtTCPSynRetrans"], cl["TcpExtTCPTimeouts"],
                     cl["wrk_wait_s"], cl["xdp_tx_errors"],
                     sum(r["during"]["errors"].values())])
    rows = [[f"{c:.2f}" if isinstance(c, float) else ("-" if c is None else c) for c in row] for row in rows]
    xg = by.get("xdpguard-syncookies")
    result["targets"] = {
        "baseline_conns_per_s": base,
        "syncookies_vs_baseline": (xg["during"]["conns_per_s"] / base) if xg and base and xg["during"]["conns_per_s"]
        else None,
        "syncookies_syns_to_stack": xg and xg["syns_to_stack"],
        "detail": "; ".join(f"{m}: {by[m]['during']['conns_per_s'] or 0:.0f}/s under flood"
                            for m in MODES if m in by) + f" (no attack: median {base or 0:.0f}/s)",
    }
    print_table("synflood: spoofed SYNs (10M sources) against nginx, legit wrk connections",
                ["mode", "conn/s idle", "conn/s flood", "x no attack", "x own idle", "offered Mpps",
                 "received Mpps", "Mpps/core", "rx CPU share", "listener SYNs", "SYNs to stack",
                 "client conn/s", "SYN retrans", "RTOs", "wrk wait s", "XDP_TX refused", "wrk errors"], rows,
                f"wrk: 1 thread, 16 connections, Connection: close, {seconds:.0f} s; flood: <= {count:,} SYNs, "
                f"<= {seconds - 0.4:.1f} s, generator {sender.generator}; x no attack: vs the median of the modes' "
                "idle runs; listener SYNs: cookies the kernel sent + listen drops (nstat); SYNs to stack: "
                "the notrack rule's counter in xdpguard's table; rx CPU share: of a core, the receiver's NAPI thread "
                "while the flood ran (what else ran on it set the rest); client: connections wrk offered a "
                "second during the flood (nstat TcpActiveOpens in a), SYNs it sent again, its retransmission "
                "timeouts, seconds wrk was runnable but not running (CPU 0 is the generator's too); XDP_TX "
                "refused: SYN-ACKs b's XDP could not put in a's ring (the flood's own answers crowd the "
                "client's)")
    return result

