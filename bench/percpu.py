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

import dataclasses

import ipaddress
import time
from contextlib import ExitStack

from bench import policies
from bench.common import Lab, Skip, XdpFilter, log, median, print_table
from bench.rig import BenchRig
from xdpguard import bpfsys, loader
from xdpguard.compiler import compile_policy
from xdpguard.policy import load as load_policy

SHARED = ("v4 udp denied", "v4 tcp syn pass", "v6 udp pass", "vlan v4 syn pass")


class Subject:
    """One program under measurement: label, fd, and its results per class."""

    def __init__(self, label: str, fd: int):
        self.label, self.fd = label, fd
        self.runs: dict[str, list[int]] = {}
        self.verdicts_ok: dict[str, bool] = {}

    def medians(self) -> dict:
        return {c: median(xs) for c, xs in self.runs.items()}


def _rounds(subjects: list[Subject], classes, runs: int, repeat: int) -> None:
    """Interleave: in every round each subject runs every class once, so a
    slow moment of the machine (other work on it) hits all of them alike."""
    for _ in range(runs):
        for c in classes:
            for s in subjects:
                d = bpfsys.prog_test_run(s.fd, c.frame, repeat=repeat, data_out_size=0)[1]
                s.runs.setdefault(c.name, []).append(d)


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
    return loader.Shape(**{f.name: max(getattr(s, f.name) for s in shapes)
                           for f in dataclasses.fields(loader.Shape)})


def _check(ctx, rig: BenchRig, tables, subject: Subject, classes) -> None:
    """Ban the banned class's source, warm up (limit-over spends its burst)
    and check every class gets its verdict (test build: and its rule)."""
    rig.ban(ctx.material.addrs.banned4)
    for c in classes:
        for _ in range(3):
            got = rig.verdict(c.frame)
        ok = got == c.expect
        if rig.test:
            ok = ok and rig.run(c.frame).rule == c.expect_rule
        subject.verdicts_ok[c.name] = ok
        if not ok:
            log(f"percpu: {subject.label}: {c.name}: verdict {got}, expected {c.expect}")


def _rig(ctx, key, tables, info, build, classes, stack, shape=None) -> Subject:
    rig = BenchRig(tables, test=(build == "test"), shape=shape)
    stack.callback(rig.close)
    s = Subject(f"{key}/{build}", rig.fd)
    s.rig = rig
    _check(ctx, rig, tables, s, classes)
    info[build + "_bcc_compile_s"] = rig.compile_s
    info[build + "_fill_s"] = rig.fill_s
    info[build + "_xlated_bytes"] = bpfsys.prog_info(rig.fd)["xlated_prog_len"]
    return s


def _xdp_filter(ctx, classes, stack) -> tuple[list[Subject], dict]:
    """xdp-filter with 10 and with 10,000 source addresses: two instances on
    two bench veths, alive together, measured in the same rounds."""
    mat = ctx.material
    firsts = []
    for fam, v, pl in mat.level1 + mat.level3:
        if fam == 4:
            firsts.append(str(ipaddress.IPv4Address(v | (1 if pl < 32 else 0))))
    firsts = [a for a in dict.fromkeys(firsts) if a not in set(mat.addrs.xdpf_deny)]
    info: dict = {}
    subjects = []
    for label, extra in (("10", []), ("10000", firsts[: 10000 - len(mat.addrs.xdpf_deny)])):
        lab = stack.enter_context(Lab(split=False))
        xf = stack.enter_context(XdpFilter(lab.ns_a, lab.b, mode="native"))
        info["prog_name"] = xf.prog_name
        xf.add_src(mat.addrs.xdpf_deny, via_cli=10)
        if extra:
            xf.add_src(extra, via_cli=0)
        s = Subject(f"xdp-filter/{label}", xf.prog_fd)
        for c in classes:
            got = bpfsys.prog_test_run(xf.prog_fd, c.frame, data_out_size=0)[0]
            s.verdicts_ok[c.name] = got == (1 if c.src in mat.addrs.xdpf_deny else 2)
        info[label + "_entries"] = xf.count(4)
        subjects.append(s)
    return subjects, info


def run(ctx) -> dict:
    quick = ctx.quick
    runs, repeat = (3, 100_000) if quick else (5, 1_000_000)
    classes = policies.classes(ctx.material.addrs)
    names = [c.name for c in classes]
    keys = ["a", "b", "c", "d"]
    ctx.sizes.setdefault("d", 200_000 if quick else 1_000_000)
    result: dict = {"runs": runs, "repeat": repeat, "classes": names, "policies": {}}
    P = result["policies"]

    with ExitStack() as stack:
        floor = Subject("floor", ctx.tiny.pass_fd)
        subjects = [floor]
        later = []          # quick: d replaces c in the shared program afterwards
        if not quick:
            for key in keys:
                log(f"percpu: policy {key}: compile, load, check (prod, test)")
                tables, P[key] = _compiled(ctx, key)
                for build in ("prod", "test"):
                    subjects.append(_rig(ctx, key, tables, P[key], build, classes, stack))
        else:
            # A bcc compile costs seconds: production builds, the test build
            # of b only, and c and d share one program of their union shape.
            for key in ("a", "b"):
                log(f"percpu: policy {key}: compile, load, check")
                tables, P[key] = _compiled(ctx, key)
                for build in (("prod", "test") if key == "b" else ("prod",)):
                    subjects.append(_rig(ctx, key, tables, P[key], build, classes, stack))
            log("percpu: policies c, d (one program)")
            (tc, P["c"]), (td, P["d"]) = _compiled(ctx, "c"), _compiled(ctx, "d")
            shape = _union(loader.Shape.for_tables(tc), loader.Shape.for_tables(td))
            sc = _rig(ctx, "c", tc, P["c"], "prod", classes, stack, shape=shape)
            P["c"]["shared_program"] = P["d"]["shared_program"] = True
            subjects.append(sc)
            later.append(("d", td, sc.rig))
        try:
            log("percpu: xdp-filter")
            xsubs, result["xdp_filter"] = _xdp_filter(ctx, classes, stack)
            subjects += xsubs
        except Skip as e:
            result["xdp_filter"] = {"skipped": str(e)}
        log(f"percpu: {len(subjects)} programs x {len(classes)} classes x {runs} rounds")
        _rounds(subjects, classes, runs, repeat)
        for key, tables, rig in later:
            t0 = time.monotonic()
            rig.load(tables)
            P[key]["prod_fill_s"] = time.monotonic() - t0
            s = Subject(f"{key}/prod", rig.fd)
            _check(ctx, rig, tables, s, classes)
            _rounds([s, floor], classes, runs, repeat)
            subjects.append(s)

    for s in subjects:
        if "/" in s.label and not s.label.startswith("xdp-filter"):
            key, build = s.label.split("/")
            P[key][build] = s.medians()
            P[key][build + "_runs"] = s.runs
            P[key][build + "_verdicts_ok"] = s.verdicts_ok
        elif s.label.startswith("xdp-filter"):
            lab = s.label.split("/")[1]
            result["xdp_filter"][lab] = s.medians()
            result["xdp_filter"][lab + "_runs"] = s.runs
            result["xdp_filter"][lab + "_verdicts_ok"] = s.verdicts_ok
    result["floor"] = floor.medians()
    result["floor_runs"] = floor.runs
    floor = result["floor"]

    # ---- ratios
    xf = result.get("xdp_filter", {})
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
        # The same with the test-run loop itself (the floor) taken out.
        net = {c: P[k]["prod"][c] - floor[c] for c in names}
        net_a = {c: P["a"]["prod"][c] - floor[c] for c in names}
        agg, worst, wname = _mean_ratio(net, net_a, names)
        r[f"{k}_vs_a_net_of_floor"] = {"mix": agg, "worst": worst, "worst_class": wname}
    for k in keys:
        if "test" in P[k]:
            agg, _, _ = _mean_ratio(P[k]["test"], P[k]["prod"], names)
            r[f"test_build_vs_prod_{k}"] = {"mix": agg}
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
    bad += [f"xdp-filter {n}/{c}" for n in ("10", "10000")
            for c, ok in xf.get(n + "_verdicts_ok", {}).items() if not ok]
    note = [f"ns/packet, median of {runs} x {repeat:,} repeats, all programs interleaved in rounds;",
            "xdpguard production build; key rules at index N-8 (passing packets scan every rule word)"]
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
