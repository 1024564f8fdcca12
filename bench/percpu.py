"""Section 1: per-packet cost with BPF_PROG_TEST_RUN.

The kernel runs one frame `repeat` times and reports the average duration
per repeat (ns); we take the median of several such runs. Every packet class
is first checked to get the verdict it should (a benchmark of the wrong path
would be worthless).

Columns: xdpguard's production build (what `apply` attaches; the headline),
the XG_TEST build (`xdpguard test`, one more map update per packet),
xdp-filter loaded on a bench veth with 10 and with 10,000 source addresses
(its limit; firehol_level1's first addresses, then level3's), and the floor:
an empty bcc XDP program returning XDP_PASS, i.e. the test-run loop itself.
"""
from __future__ import annotations

import ipaddress
import time

from bench import policies
from bench.common import Lab, Skip, XdpFilter, log, median, print_table, ratio
from bench.rig import BenchRig
from xdpguard import bpfsys, loader
from xdpguard.compiler import compile_policy
from xdpguard.policy import load as load_policy

SHARED = ("v4 udp denied", "v4 tcp syn pass", "v6 udp pass", "vlan v4 syn pass")


def _measure(fd: int, frame: bytes, runs: int, repeat: int) -> dict:
    xs = [bpfsys.prog_test_run(fd, frame, repeat=repeat, data_out_size=0)[1] for _ in range(runs)]
    return {"median": median(xs), "runs": xs}


def _mean_ratio(num: dict, den: dict, names) -> tuple[float | None, float | None, str | None]:
    """Ratio of summed costs over the classes (a packet mix with one of
    each), and the worst single class."""
    pairs = [(num.get(n), den.get(n), n) for n in names]
    pairs = [(a, b, n) for a, b, n in pairs if a is not None and b]
    if not pairs:
        return None, None, None
    agg = sum(a for a, _, _ in pairs) / sum(b for _, b, _ in pairs)
    worst = max(pairs, key=lambda p: p[0] / p[1])
    return agg, worst[0] / worst[1], worst[2]


def _compiled(ctx, key: str):
    n = ctx.sizes.get(key)
    path, nprefixes = policies.write_policy(ctx.material, key, ctx.workdir, nprefixes=n)
    t0 = time.monotonic()
    pol = load_policy(path)
    t1 = time.monotonic()
    tables = compile_policy(pol)
    t2 = time.monotonic()
    info = {"policy": key, "rules": len(pol.rules), "prefixes_v4": nprefixes,
            "lpm4_entries": len(tables.lpm[4]), "lpm6_entries": len(tables.lpm[6]),
            "vector_words": tables.nwords, "load_s": t1 - t0, "compile_s": t2 - t1,
            "key_rule_index": len(pol.rules) - policies.KEY_RULES}
    return tables, info


def _union(*shapes):
    return loader.Shape(*(max(getattr(s, f) for s in shapes)
                          for f in ("nwords", "vec_per_gen", "lpm4_max", "lpm6_max")))


def _xdpguard(ctx, key: str, classes, runs: int, repeat: int, builds, compiled=None,
              rig: BenchRig | None = None) -> dict:
    """Measure one policy. With rig: load the policy into that program in
    place (same shape; the trie capacity does not change the lookup cost)."""
    mat = ctx.material
    tables, out = compiled or _compiled(ctx, key)
    for build in builds:
        shared = rig is not None
        if shared:
            if rig.tables is not tables:
                t0 = time.monotonic()
                rig.load(tables)
                rig.fill_s = time.monotonic() - t0
                rig.compile_s = 0.0
            out["shared_program"] = True
        else:
            rig = BenchRig(tables, test=(build == "test"))
        try:
            rig.ban(mat.addrs.banned4)
            res, checks = {}, {}
            for c in classes:
                # Warm up (limit-over spends its burst of 1) and check the verdict.
                for _ in range(3):
                    got = rig.verdict(c.frame)
                ok = got == c.expect
                if build == "test":
                    d = rig.run(c.frame)
                    name = None if d["rule"] is None else tables.rules[d["rule"]].name
                    ok = ok and name == c.expect_rule
                checks[c.name] = ok
                if not ok:
                    log(f"percpu: policy {key} {build}: {c.name}: verdict {got}, expected {c.expect}")
                res[c.name] = _measure(rig.fd, c.frame, runs, repeat)
            out[build] = {c: r["median"] for c, r in res.items()}
            out[build + "_runs"] = {c: r["runs"] for c, r in res.items()}
            out[build + "_verdicts_ok"] = checks
            out[build + "_bcc_compile_s"] = rig.compile_s
            out[build + "_fill_s"] = rig.fill_s
            out[build + "_xlated_bytes"] = bpfsys.prog_info(rig.fd)["xlated_prog_len"]
        finally:
            if not shared:
                rig.close()
            rig = None if not shared else rig
    return out


def _xdp_filter(ctx, classes, runs: int, repeat: int) -> dict:
    mat = ctx.material
    out: dict = {}
    with Lab(split=False) as lab:
        with XdpFilter(lab.s, lab.b, mode="native") as xf:
            out["prog_name"] = xf.prog_name
            xf.add_src(mat.addrs.xdpf_deny, via_cli=10)
            sets = [("10", None)]
            # The firehol comparison: up to xdp-filter's 10,000 addresses.
            firsts = []
            for fam, v, pl in mat.level1 + mat.level3:
                if fam == 4:
                    firsts.append(str(ipaddress.IPv4Address(v | (1 if pl < 32 else 0))))
            firsts = [a for a in dict.fromkeys(firsts) if a not in set(mat.addrs.xdpf_deny)]
            sets.append(("10000", firsts[: 10000 - len(mat.addrs.xdpf_deny)]))
            for label, extra in sets:
                if extra:
                    xf.add_src(extra, via_cli=0)
                res, checks = {}, {}
                for c in classes:
                    got = bpfsys.prog_test_run(xf.prog_fd, c.frame, data_out_size=0)[0]
                    want = 1 if c.src in mat.addrs.xdpf_deny else 2
                    checks[c.name] = got == want
                    res[c.name] = _measure(xf.prog_fd, c.frame, runs, repeat)["median"]
                out[label] = res
                out[label + "_verdicts_ok"] = checks
                out[label + "_entries"] = xf.count(4)
    return out


def run(ctx) -> dict:
    quick = ctx.quick
    runs, repeat = (3, 100_000) if quick else (5, 1_000_000)
    classes = policies.classes(ctx.material.addrs)
    keys = ["a", "b", "c", "d"]
    ctx.sizes.setdefault("d", 200_000 if quick else 1_000_000)
    result: dict = {"runs": runs, "repeat": repeat, "classes": [c.name for c in classes],
                    "policies": {}, "notes": []}

    floor = {c.name: _measure(ctx.tiny.pass_fd, c.frame, runs, repeat)["median"] for c in classes}
    result["floor"] = floor

    if not quick:
        for key in keys:
            log(f"percpu: policy {key} (prod, test)")
            result["policies"][key] = _xdpguard(ctx, key, classes, runs, repeat, ["prod", "test"])
    else:
        # A bcc compile costs seconds: production builds only (and the test
        # build of b), c and d share one program of their union shape.
        for key in ("a", "b"):
            builds = ["prod", "test"] if key == "b" else ["prod"]
            log(f"percpu: policy {key} ({', '.join(builds)})")
            result["policies"][key] = _xdpguard(ctx, key, classes, runs, repeat, builds)
        log("percpu: policies c, d (one program)")
        cc, cd = _compiled(ctx, "c"), _compiled(ctx, "d")
        shape = _union(loader.Shape.for_tables(cc[0]), loader.Shape.for_tables(cd[0]))
        rig = BenchRig(cc[0], shape=shape)
        try:
            rig.ban(ctx.material.addrs.banned4)
            result["policies"]["c"] = _xdpguard(ctx, "c", classes, runs, repeat, ["prod"], cc, rig)
            result["policies"]["d"] = _xdpguard(ctx, "d", classes, runs, repeat, ["prod"], cd, rig)
        finally:
            rig.close()

    try:
        log("percpu: xdp-filter")
        result["xdp_filter"] = _xdp_filter(ctx, classes, runs, repeat)
    except Skip as e:
        result["xdp_filter"] = {"skipped": str(e)}

    # ---- ratios
    P = result["policies"]
    xf = result.get("xdp_filter", {})
    names = [c.name for c in classes]
    r: dict = {}
    if "10000" in xf:
        agg, worst, wname = _mean_ratio(P["b"]["prod"], xf["10000"], SHARED)
        r["b_vs_xdp_filter_10k"] = {"mix": agg, "worst": worst, "worst_class": wname,
                                    "classes": list(SHARED)}
        agg, worst, wname = _mean_ratio(P["a"]["prod"], xf["10"], SHARED)
        r["a_vs_xdp_filter_10"] = {"mix": agg, "worst": worst, "worst_class": wname}
    for k in ("b", "c", "d"):
        agg, worst, wname = _mean_ratio(P[k]["prod"], P["a"]["prod"], names)
        r[f"{k}_vs_a"] = {"mix": agg, "worst": worst, "worst_class": wname}
    if "test" in P["a"]:
        agg, _, _ = _mean_ratio(P["a"]["test"], P["a"]["prod"], names)
        r["test_build_vs_prod_a"] = {"mix": agg}
    result["ratios"] = r

    # ---- tables
    hdr = ["class"] + [f"{k}: {P[k]['rules']}r/{_short(P[k]['prefixes_v4'])}" for k in keys]
    hdr += ["xdp-filter 10", "xdp-filter 10k", "floor"]
    rows = []
    for c in names:
        row = [c] + [P[k]["prod"].get(c) for k in keys]
        row += [xf.get("10", {}).get(c), xf.get("10000", {}).get(c), floor.get(c)]
        rows.append(row)
    bad = [f"{k}/{b}/{c}" for k in keys for b in ("prod", "test")
           for c, ok in P[k].get(b + "_verdicts_ok", {}).items() if not ok]
    note = [f"ns/packet, median of {runs} x {repeat:,} repeats; xdpguard production build "
            f"(key rules at index N-8: passing packets scan every rule-vector word)"]
    if "skipped" in xf:
        note.append(f"xdp-filter: skipped: {xf['skipped']}")
    else:
        note.append("xdp-filter has no limiter or ban map: it passes the limit/banned classes")
    note.append("verdict checks: " + ("all as expected" if not bad else "WRONG: " + ", ".join(bad)))
    print_table("per-packet cost, BPF_PROG_TEST_RUN (ns/packet)", hdr, rows, "\n".join(note))

    trows = []
    for c in names:
        trows.append([c] + [P[k].get("test", {}).get(c) for k in keys])
    print_table("XG_TEST build (debug map update per packet), ns/packet",
                ["class"] + [k for k in keys], trows)

    rrows = []
    for k, v in r.items():
        rrows.append([k, v.get("mix"), v.get("worst"), v.get("worst_class") or ""])
    print_table("per-packet ratios (mix = one packet of each class)",
                ["ratio", "mix", "worst", "worst class"], [[a, _f2(b), _f2(c), d] for a, b, c, d in rrows])
    return result


def _short(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 else str(n)


def _f2(x):
    return None if x is None else f"{x:.2f}"
