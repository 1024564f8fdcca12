"""The classifier lookup, written once in Python exactly as bpf/xdpguard.c runs it.

``explain`` uses it on freshly compiled tables; tests compare it with a
direct first-match evaluation of the rules and with the kernel program.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from xdpguard.compiler import Tables
from xdpguard.layout import C

_ACTION_NAME = {C.XG_ACT_ALLOW: "allow", C.XG_ACT_DENY: "deny", C.XG_ACT_LIMIT: "limit"}
_VERDICT = {C.XG_ACT_ALLOW: "pass", C.XG_ACT_DENY: "drop", C.XG_ACT_LIMIT: "limit"}


@dataclass(frozen=True)
class Decision:
    rule: str | None       # None: no rule matched
    index: int | None
    action: str
    verdict: str           # "pass" | "drop" | "limit"

    def as_json(self) -> dict:
        return {"rule": self.rule, "action": self.action, "verdict": self.verdict}


def _lpm(tables: Tables, family: int, dim: int, addr: int) -> int:
    """The vector of the longest prefix holding addr, as the LPM trie
    answers, by bisection of the compiler's sorted entries (no index): the
    last entry at or before (addr, plen) holds addr, or lies inside the
    match, which then holds both and is at most as long as their common
    prefix; each step shortens plen."""
    bits = 32 if family == 4 else 128
    entries = tables.lpm[family]
    probe, plen = addr, bits
    while True:
        i = bisect_right(entries, (dim, probe, plen + 1))
        if not i or entries[i - 1][0] != dim:
            return 0      # the compiler always adds /0, so this is a safety net like the C
        _d, value, p, vec = entries[i - 1]
        if not (addr ^ value) >> (bits - p):
            return tables.vecs[vec]
        plen = bits - (addr ^ value).bit_length()
        probe = addr >> (bits - plen) << (bits - plen)


def classify(tables: Tables, family: int, src: int, dst: int, l4: int,
             sport: int | None, dport: int | None) -> int | None:
    """Index of the first matching rule, or None."""
    vsrc = _lpm(tables, family, C.XG_DIM_SRC, src)
    if l4 != C.XG_L4_ND:
        # struct xg_vec.decides: the source vector alone decides when its
        # lowest rule matches any protocol, port and destination.
        low = vsrc & -vsrc
        if low & tables.universal:
            return low.bit_length() - 1
    v = tables.vecs[l4] & vsrc
    if tables.flags & C.XG_GEN_HAS_DST:
        v &= _lpm(tables, family, C.XG_DIM_DST, dst)
    if sport is None:
        v &= tables.vecs[C.XG_VEC_NOPORT_SPORT] & tables.vecs[C.XG_VEC_NOPORT_DPORT]
    else:
        v &= tables.vecs[tables.ports[C.XG_PORT_SPORT][sport]]
        v &= tables.vecs[tables.ports[C.XG_PORT_DPORT][dport]]
    if not v:
        return None
    return (v & -v).bit_length() - 1


def decide(tables: Tables, family: int, src: int, dst: int, l4: int,
           sport: int | None, dport: int | None) -> Decision:
    """Rule, action and verdict for one parsed packet (bans not included)."""
    idx = classify(tables, family, src, dst, l4, sport, dport)
    if idx is None:
        if l4 == C.XG_L4_ND:
            return Decision(None, None, "allow", "pass")
        act = tables.default_action
        return Decision(None, None, _ACTION_NAME[act], _VERDICT[act])
    rec = tables.rules[idx]
    return Decision(rec.name, idx, _ACTION_NAME[rec.action], _VERDICT[rec.action])


# ---------------------------------------------------------------- limiter state

def gcra(tat: int, now: int, units: int, cost_fp: int, burst_ns: int) -> int | None:
    """bpf/gcra.h's xg_gcra on one bucket: its new theoretical arrival time
    when the units fit, else None (the bucket unchanged)."""
    nxt = max(tat, now) + ((units * cost_fp) >> 16)
    return None if nxt - now > burst_ns else nxt


class Limiter:
    """The state of the program's buckets, and the verdict of bpf/xdpguard.c's
    xg_limit on it: per-rule buckets (rbuckets, by slot), per-source buckets
    (sbuckets, by slot and masked source) with the new-source budget
    (nbuckets) checked before one is inserted, and rate_total (rbuckets of
    a per-source rule). Times are CLOCK_MONOTONIC nanoseconds, the
    program's bpf_ktime_get_ns."""

    def __init__(self):
        self.rbuckets: dict[int, int] = {}
        self.nbuckets: dict[int, int] = {}
        self.sbuckets: dict[tuple[int, int, int], int] = {}

    def verdict(self, rec, slot: int, family: int, src: int, length: int, now: int) -> tuple[str, int]:
        """("pass" | "drop", counter slot) of a packet a limit rule matched."""
        units = length if rec.unit == C.XG_UNIT_BYTES else 1
        if rec.per == C.XG_PER_RULE:
            nxt = gcra(self.rbuckets.get(slot, 0), now, units, rec.cost_fp, rec.burst_ns)
            if nxt is None:
                return "drop", slot
            self.rbuckets[slot] = nxt
            return "pass", slot
        bits = 32 if family == 4 else 128
        plen = rec.prefix4 if family == 4 else rec.prefix6
        key = (slot, family, src >> (bits - plen) << (bits - plen) if plen else 0)
        if key not in self.sbuckets:
            budget = gcra(self.nbuckets.get(slot, 0), now, 1, rec.new_cost_fp, rec.new_burst_ns)
            if budget is None:
                return "drop", C.XG_SLOT_NEWSRC       # nothing inserted
            self.nbuckets[slot] = budget
            self.sbuckets[key] = 0
        nxt = gcra(self.sbuckets[key], now, units, rec.cost_fp, rec.burst_ns)
        if nxt is None:
            return "drop", slot
        self.sbuckets[key] = nxt
        if rec.total_cost_fp:
            total = gcra(self.rbuckets.get(slot, 0), now, units, rec.total_cost_fp, rec.total_burst_ns)
            if total is None:
                return "drop", slot
            self.rbuckets[slot] = total
        return "pass", slot
