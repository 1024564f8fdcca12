"""Feedback-loop benchmark: how fast `watch` bans a flood, what the flood
costs a legitimate client with and without `watch`, and what `watch`
itself costs at 10,000 tracked sources.

Real traffic in the test lab (testing/lab.py: two namespaces and a veth pair,
nginx on the server side). Floods are hping3 SYN floods bounded in packets
and seconds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

from bench.common import log, print_table

def _watch(lab, policy, state_dir, interval="0.5s"):
    env = dict(os.environ, XDPGUARD_STATE_DIR=str(state_dir))
    p = subprocess.Popen([*lab.xg, "watch", str(policy), "--iface", lab.server_if, "--netns", lab.server_ns,
                          "--interval", interval, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if "watching" in line or not line:
            break
    return p


def _stop(p) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def _flood(lab, src, pps, seconds, dst):
    return lab.popen("client", ["timeout", str(seconds + 5), "hping3", "-q", "-S", "-p", "80", "-a", src,
                                "-i", f"u{max(1, int(1e6 / pps))}", "-c", str(int(pps * seconds)), dst],
                     what="hping3", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _legit(lab, server, client, n, interval) -> dict:
    """n sequential HTTP requests; success rate and latency."""
    lat, ok = [], 0
    for _ in range(n):
        cp = lab.run("client", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                                "--interface", client, "-m", "2", f"http://{server}/"], timeout=5)
        parts = cp.stdout.split()
        if len(parts) == 2 and parts[0] == "200":
            ok += 1
            lat.append(float(parts[1]) * 1000)
        time.sleep(interval)
    return {"requests": n, "ok": ok, "success": ok / n,
            "median_ms": statistics.median(lat) if lat else None,
            "p95_ms": sorted(lat)[int(len(lat) * 0.95) - 1] if len(lat) >= 20 else (max(lat) if lat else None)}


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(ctx) -> dict:
    from testing.lab import CLIENT4, EXTRA4, SERVER4, Lab
    from testing.webpolicy import web_policy
    quick = ctx.quick
    res: dict = {}
    with Lab() as lab:
        lab.start_nginx("server")
        window = 1.0
        pol = lab.write_policy("mit", web_policy("bench-mitigation", syn_rate="200/s", window=f"{window}s", ban="5m"))
        lab.apply(pol)
        state = ctx.workdir / "mit-state"

        # 1. Reaction: flood start (the rate is over the threshold from the
        # first interval) + window -> first flood packet dropped by the ban.
        reactions = []
        for i in range(1 if quick else 3):
            src = EXTRA4[i]
            w = _watch(lab, pol, state)
            try:
                t0 = time.monotonic()
                flood = _flood(lab, src, 2000, 8, SERVER4)
                first = None
                while time.monotonic() - t0 < 10:
                    bans = json.loads(lab.xdpguard("bans", "--iface", lab.server_if, "--netns", lab.server_ns,
                                                   "--json").stdout)["bans"]
                    hit = [b for b in bans if b["prefix"] == f"{src}/32" and b["packets"] > 0]
                    if hit:
                        first = time.monotonic()
                        break
                    time.sleep(0.05)
                lab.stop(flood)
                reactions.append(None if first is None else first - t0 - window)
            finally:
                _stop(w)
        ok = [r for r in reactions if r is not None]
        res["reaction_s"] = {"runs": reactions, "max": max(ok) if ok else None, "window_s": window}

        # 2. A legitimate client during a flood, without and with watch.
        n, gap = (20, 0.05) if quick else (60, 0.05)
        res["legit"] = {"baseline": _legit(lab, SERVER4, CLIENT4, n, gap)}
        for mode in ("without_watch", "with_watch"):
            lab.xdpguard("unban", f"{EXTRA4[5]}/32", "--iface", lab.server_if, "--netns", lab.server_ns,
                         check=False)
            w = _watch(lab, pol, state) if mode == "with_watch" else None
            try:
                flood = _flood(lab, EXTRA4[5], 20000, 6 if quick else 10, SERVER4)
                time.sleep(0.5)
                res["legit"][mode] = _legit(lab, SERVER4, CLIENT4, n, gap)
                lab.stop(flood)
            finally:
                if w:
                    _stop(w)
        base = res["legit"]["baseline"]["success"] or 1
        res["legit"]["with_watch_vs_baseline"] = res["legit"]["with_watch"]["success"] / base

        # 3. watch's own CPU at 10,000 tracked sources: the attached program
        # is fed one packet from each of 10,000 sources every second with
        # BPF_PROG_TEST_RUN on its pinned program (the same maps).
        from xdpguard import bpfsys, packet, pins
        nsrc = 10000
        frames = [packet.build(f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}", SERVER4, "udp",
                               sport=40000, dport=53) for i in range(nsrc)]
        w = _watch(lab, pol, state, interval="1s")
        try:
            d = pins.iface_dir(lab.server_ns, lab.server_if)
            fd = bpfsys.obj_get(str(d / "prog"))
            try:
                seconds = 5 if quick else 15
                c0, t0 = _cpu_of(w.pid), time.monotonic()
                while time.monotonic() - t0 < seconds:
                    tick = time.monotonic()
                    for f in frames:
                        bpfsys.prog_test_run(fd, f)
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
                c1, t1 = _cpu_of(w.pid), time.monotonic()
            finally:
                os.close(fd)
            res["watch_cpu"] = {"sources": nsrc, "seconds": t1 - t0,
                                "cpu_share_of_one_core": (c1 - c0) / (t1 - t0)}
        finally:
            _stop(w)

    rows = [["reaction (threshold+window -> first drop)", f"{res['reaction_s']['max']:.2f} s" if ok else "n/a", "<= 2 s"]]
    for k in ("baseline", "without_watch", "with_watch"):
        L = res["legit"][k]
        rows.append([f"legit client {k.replace('_', ' ')}", f"{L['success'] * 100:.0f}% ok, median "
                     f"{L['median_ms'] or 0:.1f} ms, p95 {L['p95_ms'] or 0:.1f} ms", ""])
    rows.append(["legit success with watch vs baseline", f"{res['legit']['with_watch_vs_baseline'] * 100:.0f}%", ">= 95%"])
    rows.append([f"watch CPU at {nsrc} sources", f"{res['watch_cpu']['cpu_share_of_one_core'] * 100:.1f}% of a core", "< 5%"])
    print_table("feedback loop (xdpguard watch)", ["measure", "value", "target"], rows)
    log("mitigation section done")
    return res
