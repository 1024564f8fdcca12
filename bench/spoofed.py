"""The spoofed-source path in test runs (issue 19): ns per frame of a forged
source into a per-source limit whose new-source budget is empty, beside
a forged source into a deny of its range, production build.

Not part of run.py. Two ways of timing each class, in interleaved rounds:
"cold": one test run per frame, each frame from a new random source, so
the maps a source indexes (the bucket map's table, the seen-sources
filter) are as cold as in a flood; the kernel's own timing of a single
run is in the number (the same for every class). "hot": one frame
repeated 50,000 times (what bench/percpu.py measures).

    .venv/bin/python bench/spoofed.py [--frames 20000] [--rounds 5] [--json]

The "seen filter full" classes set every bit of the seen-sources filter
(bpf/xdpguard.h XG_SEEN_*) while they run, so every forged frame pays the
bucket map's lookup (a miss) as before that filter: what a flood cost
once its admitted sources had set most bits, before the bits aged out,
and the filter's own gain. The "seen filter aged" classes set the share
of bits that counts at most under a long flood now that they age out
(two epochs of admissions at the default 1,000 new sources a second:
29 %). The other classes run with the bits the admitted frames set.

Run it from another checkout (PYTHONPATH) for a before/after.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

# Run as a script (`bench/spoofed.py`, not -m) from a clean clone: the repo on sys.path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO, median, print_table
from bench.rig import BenchRig
from xdpguard import bpfsys, loader, packet
from xdpguard.compiler import compile_policy
from xdpguard.layout import C
from xdpguard.policy import load as load_policy

POLICY = """
[policy]
name = "spoofed"
default = "allow"

[[rule]]
name = "deny4"
src = "10.0.0.0/8"
action = "deny"

[[rule]]
name = "limit4"
src = "11.0.0.0/8"
action = "limit"
rate = "100/s"
burst = 100
per = "source"

[[rule]]
name = "deny6"
src = "2001:db8:8000::/33"
action = "deny"

[[rule]]
name = "limit6"
src = "2001:db8::/33"
action = "limit"
rate = "100/s"
burst = 100
per = "source"
"""


def _frames(rnd: random.Random, fam: int, first: int, n: int) -> list[bytes]:
    """n UDP frames from random sources whose first byte (IPv4) or
    16-bit group 3 (IPv6) is `first`."""
    if fam == 4:
        tmpl = packet.build(src="11.0.0.1", dst="192.0.2.1", proto="udp", sport=4000, dport=80)
        return [_with_src(tmpl, packet.IPV4_SRC, bytes([first]) + rnd.randbytes(3)) for _ in range(n)]
    tmpl = packet.build(src="2001:db8::1", dst="2001:db8:ffff::1", proto="udp", sport=4000, dport=80)
    keep = tmpl[packet.IPV6_SRC][:4]          # 2001:db8: the rules' prefix
    return [_with_src(tmpl, packet.IPV6_SRC, keep + first.to_bytes(2, "big") + rnd.randbytes(10))
            for _ in range(n)]


def _with_src(frame: bytes, where: slice, src: bytes) -> bytes:
    out = bytearray(frame)
    out[where] = src
    return bytes(out)


def aged_share(new_per_s: float = 1000) -> float:
    """What counts of the filter at most through a long flood: the bits
    of two epochs of admissions at the default budget."""
    return 1 - math.exp(-new_per_s * 2 ** (C.XG_SEEN_EPOCH_LOG2 + 1) / 1e9 / (C.XG_SEEN_PAIRS * C.XG_SEEN_BITS))


def _aged(rnd: random.Random, share: float) -> bytes:
    """Words of the seen filter with `share` of the keys' bits counting
    now."""
    return loader.seen_words([sum(1 << i for i in range(C.XG_SEEN_BITS) if rnd.random() < share)
                              for _ in range(C.XG_SEEN_PAIRS)])


def measure(frames: int, rounds: int) -> dict:
    rig = BenchRig(compile_policy(load_policy("spoofed.toml", text=POLICY)))
    rnd = random.Random(19)
    classes = {"v4 spoofed limit (budget empty)": (4, 11), "v4 spoofed deny": (4, 10),
               "v6 spoofed limit (budget empty)": (6, 0x0000), "v6 spoofed deny": (6, 0x8000)}
    seen = rig.maps.get("seen")
    if seen is not None:
        classes.update({"v4 spoofed limit, seen filter full": (4, 11),
                        "v6 spoofed limit, seen filter full": (6, 0x0000)})
        words = C.XG_SEEN_WORDS
        if hasattr(loader, "seen_words"):    # a checkout whose bits age out
            classes.update({"v4 spoofed limit, seen filter aged": (4, 11),
                            "v6 spoofed limit, seen filter aged": (6, 0x0000)})
    # Spend both limits' budgets (default: 10x the rate, its burst 1 s).
    for fam, first in ((4, 11), (6, 0)):
        for f in _frames(rnd, fam, first, 3000):
            rig.verdict(f)
    out = {name: {"cold": [], "hot": []} for name in classes}
    try:
        for _ in range(rounds):
            for name, (fam, first) in classes.items():
                fs = _frames(rnd, fam, first, frames)
                full = name.endswith(("seen filter full", "seen filter aged"))
                if full:     # the bits the admitted frames set, back after
                    seen_bits = bpfsys.map_lookup_batch(seen.fd, 4, 8, words)[1]
                    if name.endswith("full"):
                        loader.fill_seen(seen)
                    else:
                        loader.write_seen(seen, _aged(rnd, aged_share()))
                try:
                    out[name]["cold"].append(median([rig.ns_per_packet(f, 1) for f in fs]))
                    out[name]["hot"].append(rig.ns_per_packet(fs[0], 50_000))
                finally:
                    if full:
                        loader.write_seen(seen, seen_bits)
    finally:
        rig.close()
    return {name: {"cold_median": median(v["cold"]), "cold_min": min(v["cold"]),
                   "hot_median": median(v["hot"]), "hot_min": min(v["hot"]), "rounds": v}
            for name, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20_000, help="frames (sources) per class and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (BPF)", file=sys.stderr)
        return 2
    res = measure(args.frames, args.rounds)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    doc = {"git": git, "loadavg": os.getloadavg(), "frames": args.frames, "classes": res}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print_table(f"ns per frame, production build ({git}, load {doc['loadavg'][0]:.1f})",
                ["class", "cold: median (min) of rounds", "hot: median (min)"],
                [[n, f"{r['cold_median']:.0f} ({r['cold_min']:.0f})", f"{r['hot_median']:.0f} ({r['hot_min']:.0f})"]
                 for n, r in res.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
