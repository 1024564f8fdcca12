"""Section 5 (full runs only, or --sections analysis): where the time goes.

A. Stage breakdown. Variants of bpf/xdpguard.c, made at run time by
   inserting early returns (`#if XGB_STOP == n`) after fixed lines of the
   real source, so they never drift from it (a line that moved makes its
   stage "n/a", nothing else):

     1 parse                    xg_parse only
     2 + active, gens, bans      the generation, and the ban check (the
                                 banstate flag; the ban trie while bans exist)
     3 + source lookup           the source table (IPv4) or trie, and its vector
     4 + l4, port vectors        the l4 vector and both port arrays (a packet
                                 whose source vector decides skips 4 and 5)
     5 + AND loop                the rule-vector scan
     8 + rule record             the deciding rule's record
     9 + clock, bucket key       the limiter's clock, a per-source bucket's key
    10 + bucket lookup           the bucket (a per-source limit: the seen-sources
                                 filter, then the LRU hash where its bit is set)
    11 + GCRA                    the bucket's compare-and-swap
     6 general path              counters (and rate_total) after the above: the
                                 production program without its fast lane
     7 full                      the production program: the fast lane (a frame its
                                 source decides, no packet record) before the rest

   Stages 1 to 6 have the fast lane switched off, so that they time the
   general path every frame the fast lane leaves takes.

   Each variant runs with BPF_PROG_TEST_RUN (hot caches) for policies b and
   c, and as the receiver of a flood (policy b, native XDP), where the cost
   of a map lookup includes the cache misses that a real packet path has.

B. The LPM trie alone: one lookup in a trie of 8, 6.3k, 100k and 1M IPv4
   prefixes (hit on a /32 deep in it, and a miss), beside one lookup in a
   16M-entry array indexed by the top 24 bits: why IPv4 sources go through
   the array table (map srctab) before the trie.
"""
from __future__ import annotations

import ipaddress
import random
import re
from contextlib import ExitStack

from bench import policies, traffic
from bench.common import Lab, log, median, print_table
from bench.rig import BenchRig
from xdpguard import bpfsys, layout, packet
from xdpguard.compiler import compile_policy
from xdpguard.netns import in_netns
from xdpguard.policy import load as load_policy

STAGES = [
    # (n, name, insert "after" / "before" the one match of a regex, return value)
    (1, "parse", "after", r"\tif \(rc == XG_PARSE_NONIP\)\n\t\treturn XDP_PASS;\n", "XDP_DROP"),
    (2, "+ active, gens, bans", "after", r"\tif \(xg_banned\(pkt, len\)\)\n[^\n]*\n", "XDP_DROP"),
    (3, "+ source lookup", "after",
     r"\tvs = xg_vec\(gen, svec\);\n",
     "vs ? XDP_DROP : XDP_PASS"),
    (4, "+ l4, port vectors", "before", r"\tif \(vl && vs && vd && vsp && vdp\) \{\n",
     "(vl && vs && vd && vsp && vdp) ? XDP_DROP : XDP_PASS"),
    (5, "+ AND loop", "before", r"\tif \(rule == XG_NO_RULE\) \{\n", "rule != XG_NO_RULE ? XDP_DROP : XDP_PASS"),
    # The limiter's steps (issue 19): the limited classes' stages after 5.
    (8, "+ rule record", "after",
     r"\tif \(r->action != XG_ACT_ALLOW && r->action != XG_ACT_LIMIT\)\n[^\n]*\n", "XDP_DROP"),
    (9, "+ clock, bucket key", "after",
     r"\t\txg_mask\(k\.addr, family == 4 \? r->prefix4 : r->prefix6\);\n",
     "(now && k.addr[3]) ? XDP_DROP : XDP_PASS"),
    (10, "+ bucket lookup", "before", r"\t/\* No bucket \(map full and racing\)", "b ? XDP_DROP : XDP_PASS"),
    (11, "+ GCRA", "before", r"\tif \(r->total_cost_fp\) \{\n", "XDP_DROP"),
]
GENERAL, FULL = 6, 7
FAST_CALL = "int rc = xg_fast(ctx, &hint);\n"
CLASSES = ("v4 udp denied", "v4 tcp syn pass", "v6 udp pass", "limit within")


def stage_source() -> tuple[str, list[int]]:
    """bpf/xdpguard.c with the early returns; returns (source, stages found)."""
    src = (layout.bpf_dir() / "xdpguard.c").read_text()
    found = []
    for n, _name, where, pattern, ret in STAGES:
        ms = list(re.finditer(pattern, src))
        if len(ms) != 1:
            continue
        stop = f"#if XGB_STOP == {n}\n\treturn {ret};\n#endif\n"
        at = ms[0].end() if where == "after" else ms[0].start()
        src = src[:at] + stop + src[at:]
        found.append(n)
    if src.count(FAST_CALL) == 1:
        src = src.replace(FAST_CALL, "int rc = XGB_STOP ? -1 : xg_fast(ctx, &hint);\n")
        found.append(GENERAL)
    return src, found + [FULL]


def _name(n: int) -> str:
    names = dict((s[0], s[1]) for s in STAGES)
    names[GENERAL] = "general path (counters after the limiter)"
    names[FULL] = "full: fast lane, then the general path"
    return names[n]


def _stages_testrun(ctx, src, stages, stack) -> dict:
    quick = ctx.quick
    runs, repeat = (3, 100_000) if quick else (5, 1_000_000)
    classes = [c for c in policies.classes(ctx.material.addrs) if c.name in CLASSES]
    out = {}
    for key in ("b", "c"):
        path, _ = policies.write_policy(ctx.material, key, ctx.workdir)
        tables = compile_policy(load_policy(path))
        subjects = [("floor", ctx.tiny.pass_fd)]
        for n in stages:
            log(f"analysis: policy {key}: stage {n} ({_name(n)})")
            rig = BenchRig(tables, source=src, cflags=(f"-DXGB_STOP={n if n != FULL else 0}",))
            stack.callback(rig.close)
            rig.ban(ctx.material.addrs.banned4)
            for c in classes:
                rig.verdict(c.frame)
            subjects.append((n, rig.fd))
        res: dict = {s: {c.name: [] for c in classes} for s, _ in subjects}
        for _ in range(runs):
            for c in classes:
                for s, fd in subjects:
                    res[s][c.name].append(bpfsys.prog_test_run(fd, c.frame, repeat=repeat, data_out_size=0)[1])
        out[key] = {str(s): {c: median(v) for c, v in per.items()} for s, per in res.items()}
    return out


def _stages_flood(ctx, src, stages, stack) -> dict:
    quick = ctx.quick
    seconds, reps = (0.5, 1) if quick else (1.5, 3)
    path, _ = policies.write_policy(ctx.material, "b", ctx.workdir)
    tables = compile_policy(load_policy(path))
    fds = {"empty XDP_DROP": ctx.tiny.drop_fd}
    for n in stages:
        rig = BenchRig(tables, source=src, cflags=(f"-DXGB_STOP={n if n != FULL else 0}",))
        stack.callback(rig.close)
        fds[str(n)] = rig.fd
    sender = traffic.Sender()
    stack.callback(sender.close)
    lab = stack.enter_context(Lab(tag="a"))
    out: dict = {k: [] for k in fds}
    for _ in range(reps):
        for k, fd in fds.items():
            with in_netns(lab.ns_b):
                lab.guard(lab.ns_b, lab.ib, lab.b)
                bpfsys.xdp_attach(lab.ib, fd, bpfsys.XDP_FLAGS_DRV_MODE)
            try:
                r = traffic.measure(lab, sender, 4, 1, 40_000_000, seconds, lambda: 0)
            finally:
                with in_netns(lab.ns_b):
                    bpfsys.xdp_detach(lab.ib, bpfsys.XDP_FLAGS_DRV_MODE)
            out[k].append(r["core_mpps"])
            log(f"analysis: flood stage {k}: {r['receive_mpps']:.2f} Mpps, {r['core_mpps']:.2f} Mpps/core")
    return {k: median(v) for k, v in out.items()}


LPM_HEAD = r"""
#include <uapi/linux/bpf.h>
struct xgb_k4 { u32 prefixlen; u8 addr[4]; };
BPF_F_TABLE("lpm_trie", struct xgb_k4, u32, t0, 64, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct xgb_k4, u32, t1, 16384, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct xgb_k4, u32, t2, 262144, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct xgb_k4, u32, t3, 2097152, BPF_F_NO_PREALLOC);
BPF_ARRAY(dir24, u32, 16777216);

/* DIR-24-8's first level: one array slot per /24, inlined by the verifier. */
int dir(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    if (data + 34 > end)
        return XDP_ABORTED;
    u8 *a = data + 26;
    u32 idx = ((u32)a[0] << 16) | ((u32)a[1] << 8) | a[2];
    u32 *v = dir24.lookup(&idx);
    return (v && *v) ? XDP_DROP : XDP_PASS;
}
"""

LPM_FN = r"""
int lpm{n}(struct xdp_md *ctx)
{{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct xgb_k4 k = {{ .prefixlen = 32 }};
    if (data + 34 > end)
        return XDP_ABORTED;
    __builtin_memcpy(k.addr, data + 26, 4);
    return t{n}.lookup(&k) ? XDP_DROP : XDP_PASS;
}}
"""
LPM_SRC = LPM_HEAD + "".join(LPM_FN.format(n=n) for n in range(4))


def _lpm(ctx, stack) -> dict:
    from bcc import BPF
    quick = ctx.quick
    runs, repeat = (3, 100_000) if quick else (5, 1_000_000)
    mat = ctx.material
    b = BPF(text=LPM_SRC, cflags=["-w"])
    stack.callback(b.cleanup)
    sizes = [("t0", mat.blocklist("a")), ("t1", mat.blocklist("b")),
             ("t2", mat.blocklist("c", 100_000))]
    if not quick:
        sizes.append(("t3", mat.blocklist("d", 1_000_000)))
    hit_src = None
    out: dict = {}
    fds = {}
    for i, (name, pfx) in enumerate(sizes):
        t = b[name.encode()]
        keys = b"".join(int(32 if pl == 32 else pl).to_bytes(4, "little") + v.to_bytes(4, "big")
                        for _f, v, pl in pfx)
        vals = b"\1\0\0\0" * len(pfx)
        bpfsys.map_update_batch(t.map_fd, keys, vals, len(pfx))
        fds[f"trie {len(pfx):,}"] = b.load_func(f"lpm{i}".encode(), BPF.XDP).fd
    # A /32 of the largest list (deep in every trie that has it) and a miss.
    rng = random.Random(7)
    big = sizes[-1][1]
    hit_src = str(ipaddress.IPv4Address(next(v for _f, v, pl in rng.sample(big, len(big)) if pl == 32)))
    d = b[b"dir24"]
    d[d.Key(int(ipaddress.IPv4Address(hit_src)) >> 8)] = d.Leaf(1)
    fds["array /24 (16M slots)"] = b.load_func(b"dir", BPF.XDP).fd
    fds["floor"] = ctx.tiny.pass_fd
    frames = {"hit /32": packet.build(hit_src, "198.51.100.1", "udp"),
              "miss": packet.build(mat.addrs.pass4, "198.51.100.1", "udp")}
    res = {k: {f: [] for f in frames} for k in fds}
    for _ in range(runs):
        for f, frame in frames.items():
            for k, fd in fds.items():
                res[k][f].append(bpfsys.prog_test_run(fd, frame, repeat=repeat, data_out_size=0)[1])
    for k in fds:
        out[k] = {f: median(v) for f, v in res[k].items()}
    return out


def run(ctx) -> dict:
    src, stages = stage_source()
    result: dict = {"stages": {str(n): _name(n) for n in stages},
                    "stages_missing": [s[0] for s in STAGES if s[0] not in stages]}
    with ExitStack() as stack:
        result["stage_testrun"] = _stages_testrun(ctx, src, stages, stack)
    with ExitStack() as stack:
        result["stage_flood"] = _stages_flood(ctx, src, stages, stack)
    with ExitStack() as stack:
        log("analysis: LPM trie vs array")
        result["lpm"] = _lpm(ctx, stack)

    # ---- tables
    rows = []
    for n in stages:
        row = [f"{n} {_name(n)}"]
        for key in ("b", "c"):
            tr = result["stage_testrun"][key]
            for c in ("v4 udp denied", "v4 tcp syn pass", "limit within"):
                row.append(tr[str(n)].get(c))
        f = result["stage_flood"].get(str(n))
        row += [f, None if not f else 1e3 / f]
        rows.append(row)
    tr_b, tr_c = result["stage_testrun"]["b"], result["stage_testrun"]["c"]
    fl = result["stage_flood"].get("empty XDP_DROP")
    rows.insert(0, ["0 floor / empty XDP_DROP", tr_b["floor"]["v4 udp denied"], tr_b["floor"]["v4 tcp syn pass"],
                    tr_b["floor"]["limit within"], tr_c["floor"]["v4 udp denied"],
                    tr_c["floor"]["v4 tcp syn pass"], tr_c["floor"]["limit within"], fl,
                    None if not fl else 1e3 / fl])
    print_table("where the time goes: cumulative stages of the xdpguard program",
                ["stage", "b deny", "b pass", "b limit", "c deny", "c pass", "c limit",
                 "flood Mpps/core", "flood ns/pkt"], rows,
                "test-run ns/packet (hot caches) for policies b (100 rules, 6k prefixes) and c (1000 rules,\n"
                "100k prefixes); flood: policy b as native receiver of a 1-source IPv4 flood (denied by\n"
                "rule 0), frames per second of the receiver thread's CPU time; ns/pkt = its CPU time per\n"
                "frame, the whole receive path (veth ring, XDP, page recycling)")
    lr = [[k, v["hit /32"], v["miss"]] for k, v in result["lpm"].items()]
    print_table("one IPv4 source lookup (test-run ns/packet, whole program)", ["structure", "hit /32", "miss"], lr)

    return result
