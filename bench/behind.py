#!/usr/bin/env python3
"""What the first read of a frame costs, by the work that waits behind it.

On the flood path (bench/flood.py) the sender writes every frame on CPU 0
and the receiver's XDP program reads it on CPU 1: the first read of the
frame's headers is a cache miss. This experiment floods one receiver with
variants of the read-and-drop program, each adding one kind of work after
that read, and prints each one's rate against plain read-and-drop (median
of the per-round ratios, the variants interleaved in every round):

    read-drop       reads the source, counts, drops (bench/common.py)
    + N moves       N independent register moves after the read
    + 4 lookups     4 array lookups, each indexed by the last one and the
                    first by the frame's source bytes

It is why xdpguard's fast lane is short (docs/design.md): independent
work costs nothing up to a point and then a lot; lookups that depend on
the frame cost little.

examples:
    .venv/bin/python bench/behind.py                 # 5 rounds, ~1 minute
    .venv/bin/python bench/behind.py --rounds 9 --moves 0,100,200 --json-out /tmp/b.json

Needs root and bcc; runs in namespaces it makes and removes, floods
bounded by a packet count and by --seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, traffic  # noqa: E402
from bench.common import Lab, log, median, print_table  # noqa: E402
from xdpguard import bpfsys  # noqa: E402
from xdpguard.netns import in_netns  # noqa: E402

# MOVES and LOOKUPS are -D integers; one program per variant.
SRC = r"""
#include <uapi/linux/bpf.h>
BPF_PERCPU_ARRAY(xgb_behind_seen, u64, 1);
BPF_ARRAY(xgb_behind_tab, u32, 65536);

int xgb_behind(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    unsigned char *p = data;
    u32 k = 0, idx;
    u64 *v, x = 0;

    if (data + 54 > end)
        return XDP_PASS;
    if (!(p[12] == 0x08 && p[13] == 0x00 && p[26] == 10))
        return XDP_PASS;
    idx = (p[27] << 8) | p[28];
#pragma unroll
    for (int i = 0; i < LOOKUPS; i++) {
        u32 *t = xgb_behind_tab.lookup(&idx);

        if (!t)
            return XDP_PASS;
        idx = (*t + idx) & 0xffff;
    }
#pragma unroll
    for (int i = 0; i < MOVES; i++)
        asm volatile("%0 = 1" : "=r"(x));   /* kept: clang cannot see through asm */
    v = xgb_behind_seen.lookup(&k);
    if (v)
        *v += 1 + ((x + idx) & 0);
    return XDP_DROP;
}
"""


class Variant:
    def __init__(self, name: str, moves: int, lookups: int):
        from bcc import BPF
        self.name = name
        self.b = BPF(text=SRC, cflags=["-w", f"-DMOVES={moves}", f"-DLOOKUPS={lookups}"])
        self.fd = self.b.load_func(b"xgb_behind", BPF.XDP).fd

    def seen(self) -> int:
        t = self.b[b"xgb_behind_seen"]
        return sum(int(v) for v in t[t.Key(0)])

    def close(self) -> None:
        self.b.cleanup()


def run(rounds: int, seconds: float, moves: list[int]) -> dict:
    sender = traffic.Sender()
    out: dict = {"rounds": rounds, "seconds": seconds, "generator": sender.generator,
                 "generator_why": sender.why, "variants": {}}
    with ExitStack() as stack:
        stack.callback(sender.close)
        sender.prog(4, 1)
        variants = [Variant(f"+ {n} moves" if n else "read-drop", n, 0) for n in moves]
        variants.append(Variant("+ 4 lookups", 0, 4))
        labs = {}
        for v in variants:
            stack.callback(v.close)
            lab = stack.enter_context(Lab(tag="h"))
            with in_netns(lab.ns_b):
                lab.guard(lab.ns_b, lab.ib, lab.b)
                bpfsys.xdp_attach(lab.ib, v.fd, bpfsys.XDP_FLAGS_DRV_MODE)
            labs[v.name] = lab
            traffic.measure(lab, sender, 4, 1, 500_000, 0.2, v.seen)     # warm-up
        rates: dict = {v.name: [] for v in variants}
        for i in range(rounds):
            for v in variants:
                r = traffic.measure(labs[v.name], sender, 4, 1, 20_000_000, seconds, v.seen)
                rates[v.name].append(r["core_mpps"])
            log(f"behind: round {i + 1}/{rounds}: " + ", ".join(f"{k} {x[-1]:.2f}" for k, x in rates.items()))
        for v in variants:
            with in_netns(labs[v.name].ns_b):
                bpfsys.xdp_detach(labs[v.name].ib)
    base = rates[variants[0].name]
    for name, xs in rates.items():
        out["variants"][name] = {"mpps_core": xs, "median": median(xs),
                                 "vs_read_drop": median([a / b for a, b in zip(xs, base) if b])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=float, default=0.6, help="flood length per variant and round (default 0.6)")
    ap.add_argument("--moves", default="0,50,150,300",
                    help="comma-separated move counts; 0 is plain read-drop and must come first (default 0,50,150,300)")
    ap.add_argument("--json-out", type=Path, help="write the numbers here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("behind: needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    try:
        moves = [int(x) for x in args.moves.split(",")]
    except ValueError:
        print(f"behind: --moves {args.moves!r} is not a list of integers", file=sys.stderr)
        return 2
    if not moves or moves[0] != 0 or any(not 0 <= n <= 1000 for n in moves):
        print("behind: --moves must start with 0, each between 0 and 1000", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 50 or not 0.1 <= args.seconds <= 5:
        print("behind: --rounds 1-50, --seconds 0.1-5", file=sys.stderr)
        return 2
    try:
        traffic.pick_generator()
    except (ValueError, OSError) as e:
        print(f"behind: {e}", file=sys.stderr)
        return 2
    common.install_signal_handlers()
    res = run(args.rounds, args.seconds, moves)
    rows = [[name, f"{v['median']:.2f}", f"{v['vs_read_drop']:.2f}x"] for name, v in res["variants"].items()]
    print_table("work behind the frame's first read (receiver Mpps/core)", ["variant", "Mpps/core", "vs read-drop"],
                rows, f"median of {args.rounds} interleaved rounds of {args.seconds} s; vs read-drop: "
                      f"median of the per-round ratios\ngenerator: {res['generator']} ({res['generator_why']})")
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
