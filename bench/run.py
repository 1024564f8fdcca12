#!/usr/bin/env python3
"""xdpguard benchmark suite: one entry point.

    .venv/bin/python bench/run.py            # full run (make bench)
    .venv/bin/python bench/run.py --quick    # < 2 minutes (make bench-quick)
    .venv/bin/python bench/run.py --sections percpu,control --json-out /tmp/x.json
    .venv/bin/python bench/run.py --sections flood --flood-modes xdp-drop,xdpguard-native
    .venv/bin/python bench/run.py --sections flood --flood-modes xdp-drop,xdp-read-drop,xdpguard-native --flood-rounds 21
    .venv/bin/python bench/run.py --sections flood --flood-modes xdpguard-native,xdpguard-limit --flood-profile

Sections: percpu (BPF_PROG_TEST_RUN cost per packet), flood (floods
through a veth pair: live XDP frames, or a packet socket where the kernel
refuses them or XDPGUARD_BENCH_GENERATOR=af_packet), established (1,024 established sources and a
client through a spoofed flood into a per-source limit, a verdict per frame), limiter (accuracy
of rate limits), control (apply, re-apply, stats, memory, compile), mitigation (watch: reaction,
legit client during a flood, CPU at 10,000 sources), synflood (spoofed SYNs against nginx:
the kernel, nftables SYNPROXY, xdpguard with and without syncookies), analysis (full runs only: cost
of each stage of the program, LPM trie vs array lookup). Tables go to stdout, progress to
stderr, everything to JSON (bench/results/latest.json by default).

Needs root, bcc and bpffs. Every interface it touches is a veth pair in
namespaces named xgb<hex>, removed on exit, also on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, traffic  # noqa: E402
from bench.common import dump_json, log, print_table  # noqa: E402
from testing.lab import CREATED  # noqa: E402

SECTIONS = ("percpu", "flood", "established", "limiter", "control", "mitigation", "synflood", "analysis")
QUICK_SECTIONS = ("percpu", "flood", "limiter", "control")
RESULTS = Path(__file__).resolve().parent / "results"


class Context:
    def __init__(self, quick: bool, workdir: Path, flood_modes: tuple[str, ...] | None = None,
                 flood_rounds: int | None = None, flood_pools: tuple[int, ...] | None = None,
                 flood_profile: bool = False):
        from bench import policies
        self.quick = quick
        self.flood_modes = flood_modes
        self.flood_rounds = flood_rounds
        self.flood_pools = flood_pools
        self.flood_profile = flood_profile
        self.workdir = workdir
        self.material = policies.material()
        self.sizes: dict = {}
        self.tiny = common.Tiny()

    def close(self) -> None:
        self.tiny.close()


# ---------------------------------------------------------------- targets

def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def targets(res: dict) -> list[dict]:
    """Each target: value, limit, ratio value/limit (or limit/value for
    at-least targets), PASS/MISS; None when the measurement is missing."""
    out = []

    def add(name, value, limit, kind="max", unit="", detail=""):
        if value is None:
            out.append({"target": name, "value": None, "limit": limit, "unit": unit,
                        "status": "n/a", "ratio": None, "detail": detail})
            return
        ok = value <= limit if kind == "max" else value >= limit
        out.append({"target": name, "value": value, "limit": limit, "unit": unit, "kind": kind,
                    "status": "PASS" if ok else "MISS",
                    "ratio": value / limit if limit else None, "detail": detail})

    p = res.get("percpu", {})
    r = _get(p, "ratios", "b_vs_xdp_filter_10k")
    add("full policy (b) cost <= xdp-filter (10k addresses)", r and r["mix"], 1.0,
        unit="x", detail=r and f"worst class {r['worst_class']} {r['worst']:.2f}x")
    r = _get(p, "ratios", "c_vs_a")
    add("100k prefixes + 1000 rules within 1.2x of 10 rules", r and r["mix"], 1.2,
        unit="x", detail=r and f"worst class {r['worst_class']} {r['worst']:.2f}x")
    r = _get(p, "ratios", "d_vs_a")
    n = _get(p, "policies", "d", "prefixes_v4")
    add(f"{n or '1M':,} prefixes within 1.5x of 10 rules" if n else "1M prefixes within 1.5x",
        r and r["mix"], 1.5, unit="x", detail=r and f"worst class {r['worst_class']} {r['worst']:.2f}x")

    f = res.get("flood", {})
    t = f.get("targets", {})
    # The targets are set for live frames; the fallback's receiver works
    # on skbs (a copy for XDP) at the rate one Python thread sends.
    gen = f.get("generator")
    other = f"; generator {gen}, not comparable with live-frames runs" if gen and gen != traffic.LIVE_FRAMES else ""
    add("flood: xdpguard native drop rate >= 3x nftables ingress drop",
        t.get("xdpguard_vs_nft"), 3.0, kind="min", unit="x", detail=t.get("xdpguard_vs_nft_detail", "") + other)
    add("flood: xdpguard native drop rate >= 0.9x empty XDP_DROP",
        t.get("xdpguard_vs_xdp_drop"), 0.9, kind="min", unit="x",
        detail=t.get("xdpguard_vs_xdp_drop_detail", "") + other)
    add("flood: 10M spoofed sources no more than 10% below 1 source",
        t.get("spoof_vs_single"), 0.9, kind="min", unit="x", detail=t.get("spoof_vs_single_detail", "") + other)

    add("flood: 10M spoofed into a per-source limit >= 0.8x blocklist deny (Mpps/core)",
        t.get("spoofed_limit_vs_deny"), 0.8, kind="min", unit="x", detail=t.get("spoofed_limit_detail", "") + other)
    add("flood: 10M spoofed into a per-source limit admit new_sources within 5%",
        t.get("spoofed_limit_admitted_error"), 0.05, unit="", detail=t.get("spoofed_limit_detail", ""))

    e = _get(res, "established", "targets") or {}
    add("spoofed flood: each of 1,024 established sources admitted within 5% of burst + rate x time",
        e.get("established_worst_error"), 0.05, unit="", detail=e.get("detail", ""))
    add("spoofed flood: admitted in all within 5% of the sources' rates + new_sources",
        e.get("aggregate_error"), 0.05, unit="", detail=e.get("detail", ""))
    add("spoofed flood: a client at half its rate loses nothing", e.get("client_lost"), 0, unit="",
        detail=e.get("detail", ""))

    sf = res.get("synflood", {})
    add("SYN flood: legit connections with syncookies >= 95% of no attack",
        _get(sf, "targets", "syncookies_vs_baseline"), 0.95, kind="min", unit="x",
        detail=_get(sf, "targets", "detail") or "")
    add("SYN flood: spoofed SYNs reaching the stack with syncookies",
        _get(sf, "targets", "syncookies_syns_to_stack"), 0, unit="", detail="the nftables counter of xdpguard's table")

    lim = res.get("limiter", {})
    add("limiter within 5% of configured rate", lim.get("worst_error"), 0.05,
        unit="", detail=lim.get("worst_case", ""))

    c = res.get("control", {})
    add("re-apply of 100k prefixes (rules changed) <= 1 s", _get(c, "reapply_100k", "cli_s"), 1.0, unit="s",
        detail=_get(c, "reapply_100k", "detail") or "")
    add("re-apply of 100k prefixes (1 % of the set changed) <= 1 s", _get(c, "reapply_100k_set", "cli_s"), 1.0,
        unit="s", detail=_get(c, "reapply_100k_set", "detail") or "")
    add("stats <= 0.3 s", _get(c, "stats", "median_s"), 0.3, unit="s")
    add("first apply <= 5 s", _get(c, "first_apply", "cli_s"), 5.0, unit="s",
        detail=_get(c, "first_apply", "detail") or "")

    m = res.get("mitigation", {})
    add("watch reaction (threshold for window -> first drop) <= 2 s", _get(m, "reaction_s", "max"), 2.0, unit="s")
    add("legit success during a flood with watch >= 95% of baseline",
        _get(m, "legit", "with_watch_vs_baseline"), 0.95, kind="min", unit="x")
    add("watch CPU at 10,000 sources < 5% of a core", _get(m, "watch_cpu", "cpu_share_of_one_core"), 0.05)
    return out


def print_targets(tg: list[dict]) -> None:
    rows = []
    for t in tg:
        v = t["value"]
        vs = "-" if v is None else (f"{v:.3f}" if t["unit"] == "" else f"{v:.2f}{t['unit']}")
        lim = f"{'<=' if t.get('kind', 'max') == 'max' else '>='} {t['limit']}{t['unit']}"
        rs = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        rows.append([t["target"], vs, lim, rs, t["status"], t["detail"] or ""])
    print_table("targets (ratio = value / limit)", ["target", "value", "limit", "ratio", "status", "detail"], rows)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts, fewer modes (< 2 minutes)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)} "
                         f"(default: all; --quick: {','.join(QUICK_SECTIONS)})")
    ap.add_argument("--json-out", type=Path, default=RESULTS / "latest.json", help="JSON result path")
    ap.add_argument("--flood-modes", default=None,
                    help="comma-separated receiver modes of the flood section (default: all; "
                         "bench/flood.py lists them)")
    ap.add_argument("--flood-rounds", type=int, default=None, metavar="N",
                    help="rounds of the flood section's drop modes (default 9, --quick 1): more "
                         "rounds steady the medians on a host whose speed drifts")
    ap.add_argument("--flood-pools", default=None, metavar="N,N",
                    help="source pools of the flood section, a subset of 1,1024,10000000 "
                         "(default: all; --quick: 1,10000000)")
    ap.add_argument("--flood-profile", action="store_true",
                    help="perf samples of the flood receiver: its time by kernel function and, in "
                         "xdpguard's program, by C line (bench/perfprofile.py; needs perf)")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("bench: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    if args.sections is None:
        args.sections = ",".join(QUICK_SECTIONS if args.quick else SECTIONS)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            print(f"bench: unknown section {s!r} (expected {', '.join(SECTIONS)})", file=sys.stderr)
            return 2

    flood_modes = None
    if args.flood_modes is not None:
        from bench.flood import MODES_FULL
        flood_modes = tuple(m.strip() for m in args.flood_modes.split(",") if m.strip())
        bad = [m for m in flood_modes if m not in MODES_FULL]
        if bad or not flood_modes:
            print(f"bench: unknown flood mode {', '.join(map(repr, bad)) or '(none)'} "
                  f"(expected {', '.join(MODES_FULL)})", file=sys.stderr)
            return 2

    flood_pools = None
    if args.flood_pools is not None:
        from bench.flood import POOLS_FULL
        try:
            flood_pools = tuple(int(p) for p in args.flood_pools.split(",") if p.strip())
        except ValueError:
            flood_pools = ()
        if not flood_pools or any(p not in POOLS_FULL for p in flood_pools):
            print(f"bench: --flood-pools takes some of {','.join(map(str, POOLS_FULL))}", file=sys.stderr)
            return 2

    if args.flood_profile:
        from bench import perfprofile
        why = perfprofile.available()
        if why:
            print(f"bench: --flood-profile: {why}", file=sys.stderr)
            return 2

    if args.flood_rounds is not None and not 1 <= args.flood_rounds <= 99:
        print("bench: --flood-rounds must be 1 to 99", file=sys.stderr)
        return 2

    try:
        generator, generator_why = traffic.pick_generator()
    except (ValueError, OSError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2

    common.install_signal_handlers()
    t_start = time.monotonic()
    res: dict = {
        "schema": 1,
        "meta": {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                 "kernel": platform.release(), "cpus": os.cpu_count(), "git": common.git_rev(), "git_dirty": common.git_dirty(),
                 "python": platform.python_version(), "sections": sections,
                 "generator": generator, "generator_why": generator_why},
        "errors": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="xgbwork"))
    ctx = None
    rc = 0
    try:
        ctx = Context(args.quick, workdir, flood_modes, args.flood_rounds, flood_pools, args.flood_profile)
        res["meta"]["test_addresses"] = vars(ctx.material.addrs)
        for s in sections:
            t0 = time.monotonic()
            load0 = os.getloadavg()
            log(f"section {s} ...")
            mod = __import__(f"bench.{s}", fromlist=["run"])
            try:
                res[s] = mod.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
                traceback.print_exc()
                res["errors"][s] = f"{type(e).__name__}: {e}"
                res[s] = {"error": res["errors"][s]}
                rc = 1
            res[s]["elapsed_s"] = time.monotonic() - t0
            # Other work on the machine skews every number: keep the load.
            res[s]["loadavg"] = {"before": load0, "after": os.getloadavg()}
            log(f"section {s} done in {res[s]['elapsed_s']:.1f}s")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        res["errors"]["interrupted"] = True
        rc = 130
    finally:
        if ctx is not None:
            ctx.close()
        shutil.rmtree(workdir, ignore_errors=True)
    res["meta"]["namespaces"] = list(CREATED)
    res["targets"] = targets(res)
    res["meta"]["elapsed_s"] = time.monotonic() - t_start
    print_targets(res["targets"])
    dump_json(res, args.json_out)
    print(f"\nelapsed {res['meta']['elapsed_s']:.1f}s; JSON: {args.json_out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
