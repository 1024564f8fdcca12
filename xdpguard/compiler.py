"""Compiler: ordered first-match rules -> classifier tables (plain Python).

The algorithm (linear bit-vector search) is described in docs/design.md.
``Tables`` is what the data plane looks up; ``xdpguard.plan`` and
``xdpguard.layout`` turn it into map entries and ``xdpguard.lookup``
evaluates it exactly as the XDP program does.
"""
from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import countOf, eq, itemgetter, lshift, or_

from xdpguard import progress
from xdpguard.layout import ACTION_NAMES, C
from xdpguard.policy import Policy, PrefixSet, Rule, sorted_unique

_ACTION = {name: act for act, name in ACTION_NAMES.items()}

# Which l4 classes a protocol name admits (tcp_flags narrows tcp to SYN).
_PROTO_CLASSES = {
    "tcp": (C.XG_L4_TCP, C.XG_L4_TCP_SYN),
    "udp": (C.XG_L4_UDP,),
    "icmp": (C.XG_L4_ICMP,),
    "icmpv6": (C.XG_L4_ICMPV6, C.XG_L4_ND),
}
# "any" admits every class but ND: ND passes unless a rule names icmpv6.
_ANY_CLASSES = tuple(c for c in range(C.XG_L4_NCLASSES) if c != C.XG_L4_ND)
# Prefix fields by position, for C-level maps over many prefixes.
_FAMILY, _VALUE, _PLEN = itemgetter(0), itemgetter(1), itemgetter(2)


@dataclass(frozen=True)
class RuleRecord:
    """One rule as the data plane sees it (the slot is added by the loader)."""
    name: str
    index: int
    action: int
    per: int
    unit: int
    prefix4: int
    prefix6: int
    cost_fp: int
    burst_ns: int
    log: bool
    new_cost_fp: int = 0       # per-source limits: the new-source budget
    new_burst_ns: int = 0
    total_cost_fp: int = 0     # rate_total; 0: none
    total_burst_ns: int = 0
    syncookies: int = C.XG_COOKIES_OFF    # XG_COOKIES_*
    coarse: bool = False       # the buckets may run on the coarse clock (bpf/gcra.h)


class LpmEntries(Sequence):
    """Classifier trie entries (dim, value, plen, vec) of one family, as
    columns: 10 bytes an IPv4 entry, where a tuple and its ints take ~100
    (a blocklist brings millions). Indexing and iterating give tuples."""
    __slots__ = ("dim", "value", "plen", "vec")

    def __init__(self, family: int):
        self.dim, self.plen, self.vec = array("B"), array("B"), array("I")
        self.value = array("I") if family == 4 else []

    def append(self, entry) -> None:
        dim, value, plen, vec = entry
        self.dim.append(dim)
        self.value.append(value)
        self.plen.append(plen)
        self.vec.append(vec)

    def extend(self, other: "LpmEntries") -> None:
        self.dim += other.dim
        self.value += other.value
        self.plen += other.plen
        self.vec += other.vec

    def vecs_of(self, dim: int) -> set[int]:
        """The vector indexes of one dimension's entries."""
        return set(compress(self.vec, map(eq, self.dim, repeat(dim))))

    def __len__(self) -> int:
        return len(self.vec)

    def __getitem__(self, i):
        """An entry's tuple; a slice is an LpmEntries of its own."""
        if isinstance(i, slice):
            part = LpmEntries(4 if isinstance(self.value, array) else 6)
            part.dim, part.value, part.plen, part.vec = self.dim[i], self.value[i], self.plen[i], self.vec[i]
            return part
        return self.dim[i], self.value[i], self.plen[i], self.vec[i]

    def __iter__(self):
        return zip(self.dim, self.value, self.plen, self.vec)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (LpmEntries, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(map(eq, self, map(tuple, other)))

    __hash__ = None


@dataclass
class Tables:
    """The classifier of one policy. lpm lists each family's entries sorted
    by (dim, value, plen), the order the source-table planner and the
    lookup rely on; prefixes of one dim nest or are disjoint."""
    nrules: int
    nwords: int
    default_action: int
    flags: int
    vecs: list[int]                                  # rule bit vectors (Python ints)
    lpm: dict[int, LpmEntries]                       # family -> (dim, value, plen, vec) entries
    ports: dict[int, array]                          # port dim -> 65536 vector indexes
    rules: list[RuleRecord]
    universal: int                                   # universal_rules
    decides: list[int]                               # per vector: decides(vec, universal)
    mit_prefix4: int = 32
    mit_prefix6: int = 64
    log_rate: int = 10

    @property
    def syncookies(self) -> bool:
        """Whether a rule has SYN cookies, on or "auto" (the program needs
        them compiled in)."""
        return any(r.syncookies for r in self.rules)

    def summary(self) -> dict:
        return {
            "rules": self.nrules,
            "vector_words": self.nwords,
            "vectors": len(self.vecs),
            "lpm4_entries": len(self.lpm[4]),
            "lpm6_entries": len(self.lpm[6]),
            "port_classes": len(set(self.ports[C.XG_PORT_SPORT]) | set(self.ports[C.XG_PORT_DPORT])),
        }


def rule_classes(rule: Rule) -> tuple[int, ...]:
    """The l4 classes a rule admits."""
    if rule.syn_only:
        return (C.XG_L4_TCP_SYN,)
    if rule.protos is None:
        return _ANY_CLASSES
    return tuple(sorted({c for p in rule.protos for c in _PROTO_CLASSES[p]}))


class _Vectors:
    """Interns bit vectors: equal vectors share one table slot."""

    def __init__(self, fixed: list[int]):
        self.vecs = list(fixed)
        self.index: dict[int, int] = {}

    def intern(self, mask: int) -> int:
        idx = self.index.get(mask)
        if idx is None:
            idx = self.index[mask] = len(self.vecs)
            self.vecs.append(mask)
        return idx


def _sort_keys(prefixes, family: int, bits: int, shift: int, tag: int):
    """``(value << 8 | plen) << shift | tag`` for the prefixes of one family.

    Such keys sort like the tuples (value, plen, tag) (plen <= 128 fits in 8
    bits, tag < 1 << shift), but one int sorts several times faster than a
    tuple. The columns are taken with C-level maps, not a Python loop per
    prefix: one rule may bring millions of prefixes (a PrefixSet's keys
    are value << 8 | plen already).
    """
    if isinstance(prefixes, PrefixSet):
        keys = prefixes.keys(family)
        if not shift:
            return keys
        return (array("Q", map(or_, map(lshift, keys, repeat(shift)), repeat(tag))) if family == 4
                else [k << shift | tag for k in keys])
    n = countOf(map(_FAMILY, prefixes), family)
    if n == 0:
        return []
    if n < len(prefixes):
        prefixes = [p for p in prefixes if p.family == family]
    tails = [plen << shift | tag for plen in range(bits + 1)]
    return list(map(or_, map(lshift, map(_VALUE, prefixes), repeat(8 + shift)),
                    map(tails.__getitem__, map(_PLEN, prefixes))))


def _address_entries(rules: list[Rule], family: int, dim: int, attr: str, vectors: _Vectors) -> LpmEntries:
    """LPM entries of one (family, dimension): each prefix carries the rules
    of every prefix that contains it, so the longest match is exact."""
    bits = 32 if family == 4 else 128
    # One sorted list of (prefix, rule index) keys (see _sort_keys) instead
    # of a dict per prefix: a prefix listed by several rules gives adjacent
    # keys, whose rule bits are merged below. (A dict keyed by such ints
    # would be slow too: an int hashes to itself, and its low bits (rule
    # index, length, zero host bits) are much the same for every prefix.)
    # IPv4 keys fit 64 bits (32 + 8 + 13 for 4,096 rules): an array of them
    # takes 8 bytes a key where a list of ints takes ~40.
    shift = max((r.index for r in rules), default=0).bit_length()
    rule_of = (1 << shift) - 1
    root_bits = 0                         # rules with no constraint: the 0/0 entry
    keys = array("Q") if family == 4 else []
    for r in rules:
        prefixes = getattr(r, attr)
        if prefixes is None:
            root_bits |= 1 << r.index
        else:
            keys.extend(_sort_keys(prefixes, family, bits, shift, r.index))
    if family == 4:
        keys = sorted_unique(keys, "sorting IPv4 prefixes")   # a repeated (prefix, rule) merges alike
    else:
        keys.sort()
    # A key above every prefix's: flushes the last prefix, is never output.
    keys.append(1 << (bits + 9 + shift))
    hostmask = [(1 << (bits - plen)) - 1 for plen in range(bits + 1)]
    # Interning inlined (see _Vectors.intern): this loop runs once per prefix.
    index, vecs = vectors.index, vectors.vecs
    out = LpmEntries(family)
    out_value, out_plen, out_vec = out.value.append, out.plen.append, out.vec.append
    # The prefix output last (cur_*) and the innermost prefix that contains
    # it (cont_*: last address, accumulated mask) live in locals, the ones
    # around those on the stack. Prefixes nest or are disjoint, so a prefix
    # is either inside the last one or inside one of its containers. The
    # sentinel container holds every address and adds no rules.
    cont_last, cont_mask = 1 << bits, 0
    cur_last = cur_mask = -1              # none yet: 0/0 comes first and goes in the sentinel
    stack: list[tuple[int, int]] = []
    pfx, own = 0, root_bits               # the prefix being gathered (key >> shift), its rules
    last_own = last_cont = idx = None
    with progress.task(f"compiling IPv{family} {'source' if dim == C.XG_DIM_SRC else 'destination'} "
                       f"prefixes", len(keys)) as tick:
        for n, key in enumerate(keys):
            k = key >> shift
            if k == pfx:                      # the same prefix, listed by one more rule
                own |= 1 << (key & rule_of)
                continue
            # `pfx` is complete: output it.
            value = pfx >> 8
            if value <= cur_last:             # inside the prefix output last
                stack.append((cont_last, cont_mask))
                cont_last, cont_mask = cur_last, cur_mask
            else:
                while cont_last < value:
                    cont_last, cont_mask = stack.pop()
            # Neighbours mostly have the same rules and the same container, hence
            # the same vector: skip the OR and the hash of a mask that may be
            # thousands of bits wide.
            if own != last_own or cont_mask != last_cont:
                last_own, last_cont = own, cont_mask
                cur_mask = own | cont_mask
                idx = index.get(cur_mask)
                if idx is None:
                    idx = index[cur_mask] = len(vecs)
                    vecs.append(cur_mask)
            plen = pfx & 0xFF
            cur_last = value | hostmask[plen]
            out_value(value)
            out_plen(plen)
            out_vec(idx)
            pfx, own = k, 1 << (key & rule_of)
            if not n & 0xFFFF:
                tick(0x10000)
    out.dim.extend(repeat(dim, len(out.vec)))
    return out


def _port_table(rules: list[Rule], attr: str, vectors: _Vectors) -> array:
    anymask = 0
    ranged = []
    bounds = {0, C.XG_NPORTS}
    for r in rules:
        ranges = getattr(r, attr)
        if ranges is None:
            anymask |= 1 << r.index
        else:
            ranged.append((1 << r.index, ranges))
            for lo, hi in ranges:
                bounds.update((lo, hi + 1))
    edges = sorted(bounds)
    seg_masks = [anymask] * (len(edges) - 1)
    for bit, ranges in ranged:
        for lo, hi in ranges:
            for s in range(bisect_right(edges, lo) - 1, bisect_right(edges, hi)):
                seg_masks[s] |= bit
    table = array("I", bytes(4 * C.XG_NPORTS))
    for s, mask in enumerate(seg_masks):
        lo, hi = edges[s], edges[s + 1]
        table[lo:hi] = array("I", [vectors.intern(mask)]) * (hi - lo)
    return table


def gcra(rate, burst: int) -> tuple[int, int]:
    """(cost_fp, burst_ns) of a rate and its burst: struct xg_rule's GCRA
    parameters, ns per unit << 16 and how far ahead a bucket may run."""
    per_second = rate.per_second
    return max(1, round(1e9 * 65536 / per_second)), round(burst * 1e9 / per_second)


_COOKIES = {None: C.XG_COOKIES_OFF, "on": C.XG_COOKIES_ON, "auto": C.XG_COOKIES_AUTO}


def _record(rule: Rule, cookies: str | None) -> RuleRecord:
    cost_fp = burst_ns = 0
    unit = C.XG_UNIT_PACKETS
    extra = {}
    if rule.rate is not None:
        cost_fp, burst_ns = gcra(rule.rate, rule.burst)
        unit = C.XG_UNIT_BYTES if rule.rate.unit == "bytes" else C.XG_UNIT_PACKETS
    if rule.new_sources is not None:
        extra["new_cost_fp"], extra["new_burst_ns"] = gcra(rule.new_sources, rule.new_sources_burst)
    if rule.rate_total is not None:
        extra["total_cost_fp"], extra["total_burst_ns"] = gcra(rule.rate_total, rule.burst_total)
    bursts = [b for b in (burst_ns, extra.get("new_burst_ns"), extra.get("total_burst_ns")) if b is not None]
    return RuleRecord(name=rule.name, index=rule.index, action=_ACTION[rule.action],
                      per=C.XG_PER_RULE if rule.per == "rule" else C.XG_PER_SOURCE,
                      unit=unit, prefix4=rule.prefix4, prefix6=rule.prefix6,
                      cost_fp=cost_fp, burst_ns=burst_ns, log=rule.log, syncookies=_COOKIES[cookies],
                      coarse=rule.rate is not None and min(bursts) >= C.XG_COARSE_BURST_NS, **extra)


def universal_rules(nrules: int, vecs: list[int], ports: dict[int, array], lpm: dict, has_dst: bool) -> int:
    """Rules that match whatever the packet's protocol (ND aside), ports
    and destination are: their bits are set in every vector the program can
    find in those four dimensions. Derived from the tables, so it holds for
    exactly what the program looks up."""
    u = (1 << nrules) - 1
    for c in range(C.XG_L4_NCLASSES):
        if c != C.XG_L4_ND:
            u &= vecs[c]
    u &= vecs[C.XG_VEC_NOPORT_SPORT] & vecs[C.XG_VEC_NOPORT_DPORT]
    for dim in (C.XG_PORT_SPORT, C.XG_PORT_DPORT):
        for idx in set(ports[dim]):
            u &= vecs[idx]
    if has_dst:
        for fam in (4, 6):
            for idx in lpm[fam].vecs_of(C.XG_DIM_DST):
                u &= vecs[idx]
    return u


def decides(vec: int, universal: int) -> int:
    """struct xg_vec.decides: rule + 1 when the vector's lowest rule is
    universal (then it is the lowest bit of any AND with this vector)."""
    low = vec & -vec
    return low.bit_length() if low & universal else 0


def compile_policy(policy: Policy) -> Tables:
    """Compile a validated policy into classifier tables."""
    rules = policy.rules
    l4 = [0] * C.XG_L4_NCLASSES
    nosport = nodport = 0
    for r in rules:
        bit = 1 << r.index
        for c in rule_classes(r):
            l4[c] |= bit
        if r.sport is None:
            nosport |= bit
        if r.dport is None:
            nodport |= bit
    vectors = _Vectors(l4 + [nosport, nodport])
    assert len(vectors.vecs) == C.XG_VEC_FIRST_FREE

    has_dst = any(r.dst is not None for r in rules)
    lpm = {}
    for fam in (4, 6):
        entries = _address_entries(rules, fam, C.XG_DIM_SRC, "src", vectors)
        if has_dst:
            entries.extend(_address_entries(rules, fam, C.XG_DIM_DST, "dst", vectors))
        lpm[fam] = entries
    ports = {C.XG_PORT_SPORT: _port_table(rules, "sport", vectors),
             C.XG_PORT_DPORT: _port_table(rules, "dport", vectors)}

    universal = universal_rules(len(rules), vectors.vecs, ports, lpm, has_dst)
    flags = ((C.XG_GEN_HAS_DST if has_dst else 0) | (C.XG_GEN_MITIGATE if policy.mitigation.enabled else 0)
             | (C.XG_GEN_LOG_DEFAULT if policy.log_default else 0) | (C.XG_GEN_LOG_BANS if policy.log_bans else 0))
    return Tables(nrules=len(rules), nwords=max(1, (len(rules) + 63) // 64),
                  default_action=_ACTION[policy.default], flags=flags, vecs=vectors.vecs,
                  lpm=lpm, ports=ports, rules=[_record(r, policy.cookies(r)) for r in rules], universal=universal,
                  decides=[decides(v, universal) for v in vectors.vecs],
                  mit_prefix4=policy.mitigation.prefix4, mit_prefix6=policy.mitigation.prefix6,
                  log_rate=policy.log_rate)


# ---------------------------------------------------------------- warnings for `check`

def merged_intervals(prefixes) -> dict[int, tuple[list[int], list[int]]]:
    """Per family: sorted, merged [first, last] intervals for containment tests."""
    out = {}
    for fam in (4, 6):
        iv = sorted((p.value, p.last) for p in prefixes if p.family == fam)
        firsts, lasts = [], []
        for a, b in iv:
            if lasts and a <= lasts[-1] + 1:
                lasts[-1] = max(lasts[-1], b)
            else:
                firsts.append(a)
                lasts.append(b)
        out[fam] = (firsts, lasts)
    return out


def _covers(outer, inner, within) -> bool:
    """Whether constraint `outer` admits all that `inner` admits (None: anything)."""
    if outer is None or inner is None:
        return outer is None
    return within(outer, inner)


def _prefixes_within(outer, inner) -> bool:
    if outer is inner:                    # a set of millions, named by two rules
        return True
    m = merged_intervals(outer)
    for p in inner:
        firsts, lasts = m[p.family]
        i = bisect_right(firsts, p.value) - 1
        if i < 0 or lasts[i] < p.last:
            return False
    return True


def _ranges_within(outer, inner) -> bool:
    return all(any(a <= lo and hi <= b for a, b in outer) for lo, hi in inner)


def _families(prefixes) -> set[int]:
    if prefixes is None:
        return {4, 6}
    if isinstance(prefixes, PrefixSet):
        return {f for f in (4, 6) if prefixes.keys(f)}
    return {p.family for p in prefixes}


def find_unreachable(policy: Policy) -> list[str]:
    """Warnings for rules that can never match: shadowed by one earlier
    rule, or with constraints no packet can satisfy."""
    out = []
    rules = policy.rules
    for j, rj in enumerate(rules):
        fams = _families(rj.src) & _families(rj.dst)
        if not fams:
            empty = any(a is not None and not len(a) for a in (rj.src, rj.dst))
            what = "an empty address set" if empty else "src and dst of different address families"
            out.append(f"{policy.source}: {rj.label}: can never match: {what}")
            continue
        cj = set(rule_classes(rj))
        for ri in rules[:j]:
            if (set(rule_classes(ri)) >= cj and _covers(ri.sport, rj.sport, _ranges_within)
                    and _covers(ri.dport, rj.dport, _ranges_within)
                    and _covers(ri.src, rj.src, _prefixes_within) and _covers(ri.dst, rj.dst, _prefixes_within)):
                out.append(f"{policy.source}: {rj.label}: can never match: shadowed by {ri.label}")
                break
    return out
