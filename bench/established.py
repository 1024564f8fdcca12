"""Established sources through a spoofed flood (issue 19's per-source targets).

One per-source limit rule with a new-source budget takes, interleaved in one
stream: N established sources (1,024) each sending at twice its rate, a
client sending at half its rate, and forged sources, a new one a frame from
10.0.0.0/8 (none twice), as fast as this one thread goes (some hundred thousand a second,
hundreds of times the budget). Every frame is one BPF_PROG_TEST_RUN of the
production build, so every verdict is known per source; the program keeps
its own clock (the coarse one, at these bursts). Before the flood each
source and the client get their bucket (a budget token each), then the
buckets and the budget refill.

Targets: every established source admitted within 5 % of its burst + rate x
time; everything admitted within 5 % of what the rule allows (the sources'
burst + rate x time, the client's frames, the budget's burst + rate x time);
the client loses nothing. A run whose forged frames do not outrun the budget
20 times over shows nothing and says so.

Where the flood section (bench/flood.py) measures the receiver's rate with
live frames over veth, this measures who gets through: per-source counts
need a verdict per frame.

    .venv/bin/python bench/established.py [--sources 1024] [--seconds 10] [--budget 1000] [--json]
    .venv/bin/python bench/run.py --sections established
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# Run as a script (`bench/established.py`, not -m): the repo on sys.path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import log, print_table
from bench.rig import BenchRig
from xdpguard import bpfsys, packet
from xdpguard.compiler import compile_policy
from xdpguard.policy import load as load_policy

RATE, BURST = 10, 10              # per source: frames/s, frames
BUDGET = 1000                     # new sources/s, its burst one second of it
TOLERANCE = 0.05
FLOOD_OVER_BUDGET = 20            # least forged frames/s over the budget for a run to count
EST_BASE, CLIENT = 0x0A010000, 0x0A020001     # 10.1.0.0 + i, 10.2.0.1
FORGED_BATCH = 64                 # forged frames between looks at the clock

POLICY = """
[policy]
name = "established"
default = "allow"

[[rule]]
name = "web"
src = "10.0.0.0/8"
action = "limit"
rate = "{rate}/s"
burst = {burst}
per = "source"
new_sources = "{budget}/s"
new_sources_burst = {budget}
"""


def _admit_all(fr: bpfsys.FrameRunner, srcs: list[int], seconds: float) -> None:
    """Each source's first frame until it passes: its bucket, a budget token."""
    left = list(srcs)
    deadline = time.monotonic() + seconds
    while left:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(left)} sources got no bucket in {seconds} s")
        still = []
        for s in left:
            fr.frame[packet.IPV4_SRC] = s.to_bytes(4, "big")
            if fr.run() != bpfsys.XDP_PASS:
                still.append(s)
        left = still
        if left:
            time.sleep(0.05)


def measure(sources: int = 1024, seconds: float = 10.0, budget: int = BUDGET, seed: int = 19) -> dict:
    """One run; the numbers of the targets and how the run went. budget:
    new sources a second (its burst one second of it)."""
    text = POLICY.format(rate=RATE, burst=BURST, budget=budget)
    rig = BenchRig(compile_policy(load_policy("established.toml", text=text)))
    try:
        fr = bpfsys.FrameRunner(rig.fd, packet.build("10.1.0.1", "192.0.2.1", "udp", 4000, 80))
        est = [EST_BASE + i for i in range(sources)]
        _admit_all(fr, est + [CLIENT], 10 + 2 * sources / budget)
        # Full buckets and a full budget: the oracle's starting point.
        time.sleep(max(BURST / RATE, 1.0) + 0.1)
        known = set(est) | {CLIENT}
        # Forged sources in the order of a permutation of 10.0.0.0/8 (an
        # odd multiplier mod 2^24): none comes back within a run, so each
        # is new (one that came back would pass on the bucket its first
        # frame got, as an established source does: +13 % "over-admission"
        # in a 10 s run of random sources).
        k = random.Random(seed).getrandbits(24)
        buf, run = fr.frame, fr.run
        passed = [0] * sources
        sent_est = client_sent = client_lost = forged = forged_passed = 0
        est_interval = 1 / (2 * RATE * sources)        # twice the rate, sources staggered
        client_interval = 2 / RATE                     # half the rate
        t0 = time.monotonic()
        end = t0 + seconds
        next_client = t0
        now = t0
        while now < end:
            due = int((now - t0) / est_interval)
            while sent_est < due:
                i = sent_est % sources
                buf[packet.IPV4_SRC] = est[i].to_bytes(4, "big")
                passed[i] += run() == bpfsys.XDP_PASS
                sent_est += 1
            if now >= next_client:
                buf[packet.IPV4_SRC] = CLIENT.to_bytes(4, "big")
                client_sent += 1
                client_lost += run() != bpfsys.XDP_PASS
                # After a preemption the client does not catch up in a
                # burst: it keeps to half its rate.
                next_client = now + client_interval
            for _ in range(FORGED_BATCH):
                k += 1
                s = 0x0A000000 | ((k * 0x9E3779) & 0xFFFFFF)
                if s in known:
                    continue
                buf[packet.IPV4_SRC] = s.to_bytes(4, "big")
                forged_passed += run() == bpfsys.XDP_PASS
                forged += 1
            now = time.monotonic()
        elapsed = now - t0
    finally:
        rig.close()
    want_src = BURST + RATE * elapsed
    want_forged = budget + budget * elapsed
    want_all = sources * want_src + client_sent + want_forged
    got_all = sum(passed) + (client_sent - client_lost) + forged_passed
    errs = [p / want_src - 1 for p in passed]
    worst = max(range(sources), key=lambda i: abs(errs[i]))
    return {
        "sources": sources, "seconds": elapsed, "rate": RATE, "burst": BURST,
        "budget": budget, "budget_burst": budget,
        "established_sent": sent_est, "established_sent_per_source_s": sent_est / sources / elapsed,
        "established_passed_min": min(passed), "established_passed_max": max(passed),
        "established_want": want_src,
        "established_worst_error": errs[worst], "established_worst_source": f"10.1.{worst >> 8}.{worst & 255}",
        "forged": forged, "forged_per_s": forged / elapsed, "forged_passed": forged_passed,
        "forged_want": want_forged,
        "client_sent": client_sent, "client_lost": client_lost,
        "aggregate_passed": got_all, "aggregate_want": want_all, "aggregate_error": got_all / want_all - 1,
        "flood_over_budget": forged / elapsed / budget,
        "flooded": forged / elapsed >= FLOOD_OVER_BUDGET * budget,
    }


def table(r: dict) -> None:
    rows = [
        ["established sources", f"{r['sources']:,}, each at {r['established_sent_per_source_s']:.1f}/s "
                                f"(rate {r['rate']}/s, burst {r['burst']})"],
        ["admitted per source", f"{r['established_passed_min']:,} .. {r['established_passed_max']:,} "
                                f"(burst + rate x time: {r['established_want']:.1f}); worst "
                                f"{100 * r['established_worst_error']:+.2f} % ({r['established_worst_source']})"],
        ["forged frames", f"{r['forged']:,} ({r['forged_per_s']:,.0f}/s, {r['flood_over_budget']:.0f}x "
                          f"the budget of {r['budget']:,}/s)"],
        ["forged admitted", f"{r['forged_passed']:,} (budget burst + rate x time: {r['forged_want']:,.0f})"],
        ["client at half its rate", f"{r['client_sent']:,} sent, {r['client_lost']} lost"],
        ["admitted in all", f"{r['aggregate_passed']:,} of {r['aggregate_want']:,.0f} allowed "
                            f"({100 * r['aggregate_error']:+.2f} %)"],
    ]
    note = f"{r['seconds']:.1f} s of test runs, one frame each, production build"
    if not r["flooded"]:
        note += f"; the forged frames did not outrun the budget {FLOOD_OVER_BUDGET}x: the run shows nothing"
    print_table("established sources through a spoofed flood (test runs)", ["", "value"], rows, note)


def targets(r: dict) -> dict:
    """The section's numbers for bench/run.py's targets; None where the
    run did not flood (nothing to judge)."""
    ok = r["flooded"]
    return {"established_worst_error": abs(r["established_worst_error"]) if ok else None,
            "aggregate_error": abs(r["aggregate_error"]) if ok else None,
            "client_lost": r["client_lost"] if ok else None,
            "detail": f"{r['sources']:,} sources, forged {r['forged_per_s']:,.0f}/s "
                      f"({r['flood_over_budget']:.0f}x the budget), {r['seconds']:.1f} s"}


def run(ctx) -> dict:
    """bench/run.py's section."""
    seconds = 3.0 if ctx.quick else 10.0
    log(f"established: 1,024 sources, a client, forged sources, {seconds:.0f} s of test runs")
    r = measure(1024, seconds)
    table(r)
    return {**r, "targets": targets(r)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=1024, help="established sources (1 to 65,536)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the flood (0.5 to 600)")
    ap.add_argument("--budget", type=int, default=BUDGET,
                    help=f"new sources a second, burst one second of it (10 to 100,000; default {BUDGET}: "
                         "an emulated guest's test runs outrun only a smaller one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.sources <= 65536 or not 0.5 <= args.seconds <= 600 or not 10 <= args.budget <= 100_000:
        print("established: --sources takes 1 to 65,536, --seconds 0.5 to 600, --budget 10 to 100,000",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("established: needs root (BPF)", file=sys.stderr)
        return 2
    r = measure(args.sources, args.seconds, args.budget)
    if args.json:
        print(json.dumps({**r, "targets": targets(r)}, indent=1))
    else:
        table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
