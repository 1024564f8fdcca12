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
