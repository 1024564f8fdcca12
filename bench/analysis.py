"""Section 5 (full runs only, or --sections analysis): where the time goes.

A. Stage breakdown. Variants of bpf/xdpguard.c, made at run time by
   inserting early returns (`#if XGB_STOP == n`) after fixed lines of the
   real source, so they never drift from it (a line that moved makes its
   stage "n/a", nothing else):

     1 parse                 xg_parse only
     2 + active, ban          the generation word and the ban trie
     3 + l4 vec, src trie     gens, the l4 vector, the source LPM trie and its vector
     4 + port vectors         both port arrays and their vectors
     5 + AND loop             the rule-vector scan
     6 full                   rule record, counters, limiter: the production program

   Each variant runs with BPF_PROG_TEST_RUN (hot caches) for policies b and
   c, and as the receiver of a flood (policy b, native XDP), where the cost
   of a map lookup includes the cache misses that a real packet path has.

B. The LPM trie alone: one lookup in a trie of 8, 6.3k, 100k and 1M IPv4
   prefixes (hit on a /32 deep in it, and a miss), beside one lookup in a
   16M-entry array indexed by the top 24 bits (DIR-24-8's first level):
   what an array-first source lookup would cost instead.

C. A faster variant, prototyped here (bpf/ is not touched): the real source
   plus (1) an IPv4 source lookup through a 16M-slot array of /24s filled
   from the compiled tables (a slot with a longer prefix inside falls back
   to the trie), and (2) the ban trie consulted only while bans exist (a
   flag the ban writer would set). Measured beside the production program
   on the same packet classes (no bans installed: the "banned" class is
   left out) and as a flood receiver.
"""
from __future__ import annotations

import ipaddress
import random
import re
import time
from array import array
from contextlib import ExitStack

from bench import policies, traffic
from bench.common import Lab, log, median, print_table
from bench.rig import BenchRig
from xdpguard import bpfsys, layout, packet
from xdpguard.compiler import compile_policy
from xdpguard.layout import C
from xdpguard.netns import in_netns
from xdpguard.policy import load as load_policy

STAGES = [
    # (n, name, insert "after" / "before" the one match of a regex, return value)
    (1, "parse", "after", r"\tif \(rc == XG_PARSE_NONIP\)\n\t\treturn XDP_PASS;\n", "XDP_DROP"),
    (2, "+ active, gens, ban trie", "after", r"\tif \(xg_banned\(&pkt, len\)\)\n[^\n]*\n", "XDP_DROP"),
    (3, "+ l4 vec, src trie", "after",
     r"\tvs = xg_vec\(gen, xg_addr_vec\(&pkt, gen, XG_DIM_SRC, pkt\.src\)\);\n",
     "(vl && vs) ? XDP_DROP : XDP_PASS"),
    (4, "+ port vectors", "before", r"\tif \(vl && vs && vd && vsp && vdp\) \{\n",
     "(vl && vs && vd && vsp && vdp) ? XDP_DROP : XDP_PASS"),
    (5, "+ AND loop", "before", r"\tif \(rule == ~0U\) \{\n", "rule != ~0U ? XDP_DROP : XDP_PASS"),
]
FULL = 6
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
    return src, found + [FULL]


def _name(n: int) -> str:
    return dict((s[0], s[1]) for s in STAGES).get(n, "full (rule, counters, limiter)")


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
            with in_netns(lab.r):
                lab.guard(lab.r, lab.ib, lab.b)
                bpfsys.xdp_attach(lab.ib, fd, bpfsys.XDP_FLAGS_DRV_MODE)
            try:
                r = traffic.measure(lab, sender, 4, 1, 40_000_000, seconds, lambda: 0)
            finally:
                with in_netns(lab.r):
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


# ---------------------------------------------------------------- C: faster variant

FAST_MAPS = """
/* bench prototype (bench/analysis.py): DIR-24-8 first level for IPv4
 * sources of generation 0, and a "bans exist" flag. */
BPF_ARRAY(xgb_dir4, __u32, 16777216);   /* 0: default vector; bit 31: longer prefix inside */
BPF_ARRAY(xgb_cfg, __u32, 2);           /* [0] bans exist, [1] default vector + 1 */

static __always_inline int xgb_have_bans(void)
{
	__u32 z = 0;
	__u32 *n = xgb_cfg.lookup(&z);

	return n && *n;
}
"""

FAST_LOOKUP = """	if (pkt->family == 4 && dim == XG_DIM_SRC && gen == 0) {
		__u32 slot = ((__u32)addr[0] << 16) | ((__u32)addr[1] << 8) | addr[2], one = 1;
		__u32 *d = xgb_dir4.lookup(&slot);
		__u32 *def = xgb_cfg.lookup(&one);

		if (d && def && *def) {
			if (*d == 0)
				return *def - 1;
			if (!(*d & 0x80000000U))
				return *d - 1;
		}
	}
"""


def fast_source() -> str | None:
    src = (layout.bpf_dir() / "xdpguard.c").read_text()
    edits = [
        (r'XG_MAP\("lpm_trie", struct xg_lpm6_key[^\n]*\n', "after", FAST_MAPS),
        (r"(?<=xg_addr_vec\(struct xg_pkt \*pkt, __u32 gen, __u8 dim, __u8 \*addr\)\n\{\n\tstruct xg_class \*cl;\n\n)",
         "after", FAST_LOOKUP),
    ]
    for pattern, where, text in edits:
        ms = list(re.finditer(pattern, src))
        if len(ms) != 1:
            return None
        at = ms[0].end() if where == "after" else ms[0].start()
        src = src[:at] + text + src[at:]
    new, n = re.subn(r"\tif \(xg_banned\(&pkt, len\)\)", "\tif (xgb_have_bans() && xg_banned(&pkt, len))", src)
    return new if n == 1 else None


def fill_dir4(rig: BenchRig, tables) -> float:
    """Paint every /24 slot with the vector of its longest prefix <= /24;
    mark slots holding a longer prefix (those use the trie)."""
    t0 = time.monotonic()
    slots = array("I", bytes(4 << 24))
    default = None
    ent = sorted((e for e in tables.lpm[4] if e[0] == C.XG_DIM_SRC), key=lambda e: e[2])
    for _dim, value, plen, vec in ent:
        if plen == 0:
            default = vec
        elif plen <= 24:
            lo, n = value >> 8, 1 << (24 - plen)
            slots[lo:lo + n] = array("I", [vec + 1]) * n
    for _dim, value, plen, _vec in ent:
        if plen > 24:
            slots[value >> 8] |= 0x80000000
    keys = array("I", range(1 << 24))
    m = rig.b[b"xgb_dir4"]
    bpfsys.map_update_batch(m.map_fd, keys.tobytes(), slots.tobytes(), 1 << 24)
    cfg = rig.b[b"xgb_cfg"]
    cfg[cfg.Key(1)] = cfg.Leaf(0 if default is None else default + 1)
    return time.monotonic() - t0


def _fast(ctx, stack) -> dict:
    src = fast_source()
    if src is None:
        return {"skipped": "bpf/xdpguard.c changed where the prototype edits it"}
    quick = ctx.quick
    runs, repeat = (3, 100_000) if quick else (5, 1_000_000)
    classes = [c for c in policies.classes(ctx.material.addrs) if c.name != "banned"]
    keys = ["a", "b", "c"] + ([] if quick else ["d"])
    subjects = [("floor", ctx.tiny.pass_fd)]
    out: dict = {"fill_s": {}, "ok": {}}
    fds = {}
    for key in keys:
        log(f"analysis: fast variant, policy {key}")
        path, _ = policies.write_policy(ctx.material, key, ctx.workdir,
                                        nprefixes=1_000_000 if key == "d" else None)
        tables = compile_policy(load_policy(path))
        prod = BenchRig(tables)
        stack.callback(prod.close)
        fast = BenchRig(tables, source=src)
        stack.callback(fast.close)
        out["fill_s"][key] = fill_dir4(fast, tables)
        for c in classes:
            for rig in (prod, fast):
                for _ in range(3):
                    got = rig.verdict(c.frame)
                out["ok"][f"{key} {c.name} {'fast' if rig is fast else 'prod'}"] = got == c.expect
        subjects += [(f"{key} prod", prod.fd), (f"{key} fast", fast.fd)]
        if key == "b":
            fds = {"prod": prod.fd, "fast": fast.fd}
    res = {s: {c.name: [] for c in classes} for s, _ in subjects}
    for _ in range(runs):
        for c in classes:
            for s, fd in subjects:
                res[s][c.name].append(bpfsys.prog_test_run(fd, c.frame, repeat=repeat, data_out_size=0)[1])
    out["testrun"] = {s: {c: median(v) for c, v in per.items()} for s, per in res.items()}

    # Flood: policy b, production vs fast, as native receivers.
    seconds, reps = (0.5, 1) if quick else (1.5, 3)
    sender = traffic.Sender()
    stack.callback(sender.close)
    lab = stack.enter_context(Lab(tag="a"))
    fl: dict = {k: [] for k in ("empty XDP_DROP", "prod", "fast")}
    fds = {"empty XDP_DROP": ctx.tiny.drop_fd, **fds}
    for _ in range(reps):
        for k, fd in fds.items():
            with in_netns(lab.r):
                lab.guard(lab.r, lab.ib, lab.b)
                bpfsys.xdp_attach(lab.ib, fd, bpfsys.XDP_FLAGS_DRV_MODE)
            try:
                r = traffic.measure(lab, sender, 4, 1, 40_000_000, seconds, lambda: 0)
            finally:
                with in_netns(lab.r):
                    bpfsys.xdp_detach(lab.ib, bpfsys.XDP_FLAGS_DRV_MODE)
            fl[k].append(r["core_mpps"])
    out["flood_mpps"] = {k: median(v) for k, v in fl.items()}
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
    with ExitStack() as stack:
        result["fast"] = _fast(ctx, stack)

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

    f = result["fast"]
    if "skipped" in f:
        print(f"\n== faster variant: skipped: {f['skipped']}")
        return result
    tr = f["testrun"]
    keys = sorted({s.split()[0] for s in tr if s != "floor"})
    cls = list(tr["floor"])
    rows = []
    for c in cls:
        row = [c]
        for k in keys:
            row += [tr[f"{k} prod"][c], tr[f"{k} fast"][c]]
        rows.append(row)
    ratios = []
    for k in keys:
        prod = sum(tr[f"{k} prod"].values()) / sum(tr["a prod"].values())
        fast = sum(tr[f"{k} fast"].values()) / sum(tr["a fast"].values())
        ratios.append(f"{k}/a: prod {prod:.2f}x, fast {fast:.2f}x")
    fm = f["flood_mpps"]
    bad = [k for k, ok in f["ok"].items() if not ok]
    print_table("prototype: array-first IPv4 source lookup + ban trie only while bans exist (ns/packet)",
                ["class"] + [f"{k} {b}" for k in keys for b in ("prod", "fast")], rows,
                "mix ratios vs a (one packet per class): " + "; ".join(ratios) + "\n"
                f"flood, policy b native, per receiver core: prod {fm['prod']:.2f} Mpps, fast {fm['fast']:.2f} Mpps, "
                f"empty XDP_DROP {fm['empty XDP_DROP']:.2f} Mpps "
                f"(fast/XDP_DROP {fm['fast'] / fm['empty XDP_DROP']:.2f}x)\n"
                "verdicts: " + ("all as expected" if not bad else "WRONG: " + ", ".join(bad)))
    return result
