"""The verdict, written once in Python exactly as bpf/xdpguard.c gives it.

``decide`` is the classifier on a parsed packet (``explain`` uses it on
freshly compiled tables); ``verdict`` is the whole program on a frame:
parse, bans, classifier, action. Tests compare it with a direct
first-match evaluation of the rules and with the kernel program, whose
test build reports the same ``Outcome`` (``loader.TestRig.run``).
"""
from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass, field

from xdpguard import packet
from xdpguard.bpfsys import XDP_DROP, XDP_PASS, XDP_TX
from xdpguard.compiler import Tables
from xdpguard.layout import ACTION_NAMES, MALFORMED_SLOTS, SLOT_REASONS, C

_VERDICT = {C.XG_ACT_ALLOW: "pass", C.XG_ACT_DENY: "drop", C.XG_ACT_LIMIT: "limit"}
_RESULT = {XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx"}
# Outcome.reason besides the fixed slots' (layout.SLOT_REASONS).
RULE, NON_IP = "rule", "non-ip"
# The policy default's name wherever a rule's name is shown (stats' row,
# explain, test; policy.py reserves it).
DEFAULT = "default"
_SLOT_OF = {reason: slot for slot, reason in SLOT_REASONS.items()}
MALFORMED_REASONS = frozenset(SLOT_REASONS[s] for s in MALFORMED_SLOTS)


@dataclass(frozen=True)
class Decision:
    rule: str | None       # None: no rule matched
    index: int | None
    action: str
    verdict: str           # "pass" | "drop" | "limit"
    default: bool = False  # the policy default decided (not ND's pass)

    def as_json(self) -> dict:
        return {"rule": DEFAULT if self.default else self.rule, "action": self.action, "verdict": self.verdict}


@dataclass(frozen=True)
class Outcome:
    """What the program does with a frame: its return value, why (RULE,
    NON_IP or a fixed counter slot's reason: layout.SLOT_REASONS) and the
    deciding rule. Equal outcomes are the same verdict; the fields after
    `rule` are what the test build measured, and compare as equal."""
    retval: int                  # XDP_PASS, XDP_DROP, XDP_TX (a cookie SYN-ACK)
    reason: str
    rule: str | None = None      # reason RULE, or "no_entry" under a limit rule
    slot: int | None = field(default=None, compare=False)   # the counter the kernel used
    fast: bool = field(default=False, compare=False)        # decided in the fast lane
    duration_ns: int = field(default=0, compare=False)

    @property
    def malformed(self) -> bool:
        return self.reason in MALFORMED_REASONS

    def counter_slot(self, slots: dict[str, int]) -> int:
        """The counter slot the program counts this outcome in (slots: the
        rules' slots, loader.assign_slots); XG_NO_SLOT for none."""
        if self.reason == RULE:
            return slots[self.rule]
        return C.XG_NO_SLOT if self.reason == NON_IP else _SLOT_OF[self.reason]

    def as_json(self, tables: Tables) -> dict:
        """The `xdpguard test` line: explain's rule, action and verdict, the
        kernel's result, and the reason of a verdict no rule or default gave
        (a malformed frame's cause apart)."""
        if self.rule is not None:
            act = next(r.action for r in tables.rules if r.name == self.rule)
        elif self.reason == "default":
            act = tables.default_action
        else:
            act = C.XG_ACT_ALLOW if self.reason in (NON_IP, "nd") else C.XG_ACT_DENY
        out = {"rule": DEFAULT if self.reason == "default" else self.rule, "action": ACTION_NAMES[act], "verdict": _VERDICT[act],
               "result": _RESULT[self.retval]}
        if self.malformed:
            out.update(reason="malformed", cause=self.reason)
        elif self.reason not in (RULE, "default"):
            out["reason"] = self.reason
        return out


def kernel_outcome(tables: Tables, retval: int, slot: int, rule: int, **measured) -> Outcome:
    """The Outcome of a test build's run: its return value and debug
    record (struct xg_debug's slot and rule)."""
    name = None if rule == C.XG_NO_RULE else tables.rules[rule].name
    reason = NON_IP if slot == C.XG_NO_SLOT else SLOT_REASONS.get(slot, RULE)
    return Outcome(retval, reason, name, slot=slot, **measured)


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
        return Decision(None, None, ACTION_NAMES[act], _VERDICT[act], default=True)
    rec = tables.rules[idx]
    return Decision(rec.name, idx, ACTION_NAMES[rec.action], _VERDICT[rec.action])


def banned(bans, family: int, src) -> bool:
    """Whether the ban map holds a source: bans are (network, expires_ns)
    pairs (CLOCK_BOOTTIME, 0: never), and the longest network holding the
    source decides alone, as an LPM lookup does: an expired entry is
    ignored even where a shorter one holds."""
    best = None
    for net, expires in bans:
        if net.version == family and src in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, expires)
    if best is None:
        return False
    return not best[1] or best[1] > time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def verdict(frame: bytes, tables: Tables, bans=(), over_rate: bool = False) -> Outcome:
    """The Outcome of one frame: parse, ban map (bans: see `banned`),
    classifier, action, in the program's order (docs/design.md). The
    reference keeps no buckets: a limit rule passes the frame unless
    over_rate says its bucket is spent."""
    p = packet.parse(frame)
    if p is packet.NON_IP:
        return Outcome(XDP_PASS, NON_IP)
    if p in packet.MALFORMED:
        return Outcome(XDP_DROP, SLOT_REASONS[p.value])
    if bans and banned(bans, p.family, p.src):
        return Outcome(XDP_DROP, "ban")
    d = decide(tables, p.family, int(p.src), int(p.dst), p.l4, p.sport, p.dport)
    drop = d.verdict == "drop" or (d.verdict == "limit" and over_rate)
    retval = XDP_DROP if drop else XDP_PASS
    if d.rule is not None:
        return Outcome(retval, RULE, d.rule)
    return Outcome(retval, "nd" if p.l4 == C.XG_L4_ND else "default")


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
