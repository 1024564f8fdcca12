"""Source-table planner: compiled tables -> what one generation's source
tables (map srctab) and classifier tries hold.

Map srctab: per family and generation, a multibit trie of arrays that
resolves source addresses without the LPM trie (bpf/xdpguard.h). The
loader measures the tables once (``measure``, which sizes the program),
builds one ``Plan`` per apply (``build``) and writes it; nothing here is
kept between calls.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import compress, repeat, tee
from operator import and_, eq, gt, ne, rshift
from typing import Mapping

from xdpguard import progress
from xdpguard.compiler import LpmEntries, Tables
from xdpguard.layout import C

FAMILIES = (4, 6)
_BITS = {4: 32, 6: 128}
# Address bits a table resolves: prefixes longer than this go to the trie.
_TABLE_BITS = {4: 8 * C.XG_DIR_V4_BYTES, 6: 8 * C.XG_DIR_V6_BYTES}


@dataclass(frozen=True)
class Sizes:
    """Per family, for d = 16, 24, ... below the table's depth: how many
    /d prefixes hold a longer source prefix, i.e. the nodes below the root
    a full source table of that family has, level by level."""
    levels: Mapping[int, tuple[int, ...]]

    def nodes_needed(self, family: int) -> int:
        """Nodes of a family's source table that hold every source prefix
        it can (root included)."""
        return C.XG_DIR_ROOT_NODES + sum(self.levels[family])


@dataclass(frozen=True)
class Plan:
    """One generation's source tables: per family the table's entries
    (array of u32, nodes x 256, node 0 first) and the (dim, value, plen,
    vec) entries of the classifier trie that goes with it."""
    table: Mapping[int, array]
    trie: Mapping[int, LpmEntries]


def _levels(tables: Tables, family: int) -> tuple[int, ...]:
    bits, depth = _BITS[family], _TABLE_BITS[family]
    e = tables.lpm[family]
    out = []
    for d in range(16, depth, 8):
        # The /d of each source prefix longer than /d, in address order (the
        # entries' order): count where it changes, without a set of them.
        longer = compress(e.value, map(and_, map(eq, e.dim, repeat(C.XG_DIM_SRC)), map(gt, e.plen, repeat(d))))
        tops, ahead = tee(map(rshift, longer, repeat(bits - d)))
        first = next(ahead, None)
        out.append(0 if first is None else 1 + sum(map(ne, tops, ahead)))
    return tuple(out)


def measure(tables: Tables) -> Sizes:
    """What full source tables of these tables need."""
    return Sizes({f: _levels(tables, f) for f in FAMILIES})


def codes(tables: Tables, slots: dict[str, int]) -> list[int]:
    """The source-table entry of each vector: XG_DIR_FAST with the rule,
    its slot and XG_DIR_DROP where the vector decides an allow or deny
    that does not log (the program then reads no vector), else the
    vector's own index."""
    out = list(range(len(tables.vecs)))
    for i, d in enumerate(tables.decides):
        if not d:
            continue
        r = tables.rules[d - 1]
        slot = slots[r.name]
        if r.action == C.XG_ACT_LIMIT or r.log or slot > C.XG_DIR_SLOT_MASK or d - 1 > C.XG_DIR_RULE_MASK:
            continue
        out[i] = (C.XG_DIR_FAST | ((d - 1) << C.XG_DIR_RULE_SHIFT) | slot
                  | (C.XG_DIR_DROP if r.action != C.XG_ACT_ALLOW else 0))
    return out


def build(tables: Tables, nodes: Mapping[int, int], slots: dict[str, int] | None = None,
          sizes: Sizes | None = None) -> Plan:
    """The plan of tables of nodes[family] nodes. With slots the entries
    are codes (what the loader writes); without, vector indexes, enough to
    size a program. sizes: measure(tables), if already known."""
    sizes = sizes or measure(tables)
    entry_codes = None if slots is None else codes(tables, slots)
    parts = {f: source_table(tables, f, nodes[f], entry_codes, sizes) for f in FAMILIES}
    return Plan(table={f: p[0] for f, p in parts.items()}, trie={f: p[1] for f, p in parts.items()})


def source_table(tables: Tables, family: int, nodes: int, codes: list[int] | None = None,
                 sizes: Sizes | None = None) -> tuple[array, LpmEntries]:
    """One generation of a family's source table in `nodes` nodes, and the
    trie entries of that family that must go with it.

    Returns (table, trie): table is the region's entries (array of u32,
    nodes x 256, node 0 first): codes[vec] (see codes()) for each vector,
    or the vector index without codes; trie the (dim, value, plen, vec)
    entries for the family's classifier trie. IPv4: every dst entry, and
    where the table ran out of nodes (XG_DIR_TRIE) the slot's own prefix
    with the vector it would have held, plus the source prefixes inside
    it. (Two vectors deciding the same rule have the same code; the trie
    gets either, which decides the same.) IPv6: every entry, so that the
    trie alone gives any source's vector: an ND packet needs it where the
    table holds a verdict code (no rule that decides alone matches ND),
    and IPv6 policies are small next to IPv4 blocklists.

    One pass in the compiler's order (by address, then length): prefixes
    nest or are disjoint, so a prefix comes after every prefix holding it,
    and painting each over what is there leaves the longest match in every
    entry. A node is made when a longer prefix first needs one, filled
    with the value of the entry it replaces. Nodes of shallower levels are
    reserved first: without a /16 node, a whole /16 would go to the trie;
    without a /24 node, only the addresses of that /24.
    """
    NODE, TRIE, SRC = C.XG_DIR_NODE, C.XG_DIR_TRIE, C.XG_DIM_SRC
    MASK = NODE - 1
    bits, depth = _BITS[family], _TABLE_BITS[family]
    table = array("I", bytes(1024 * nodes))
    trie = LpmEntries(family)
    # The trie's columns, appended to directly: this loop runs once per entry.
    t_dim, t_value, t_plen, t_vec = trie.dim.append, trie.value.append, trie.plen.append, trie.vec.append
    fills: dict[int, array] = {}       # value -> a node of it (most nodes share a few)
    free = C.XG_DIR_ROOT_NODES
    # room[L]: nodes that may still be made at levels L and deeper, with
    # every node the levels above L need kept for them.
    need = sizes.levels[family] if sizes else _levels(tables, family)
    room = [nodes - free - sum(need[:lv]) for lv in range(len(need))]
    trie_until = -1                    # last address under the newest XG_DIR_TRIE slot
    # code -> a vector with that code (the trie needs vectors, not codes).
    vec_of = {} if codes is None else {c: v for v, c in enumerate(codes)}
    keep_all = family == 6
    entries = tables.lpm[family]
    with progress.task(f"planning IPv{family} source table", len(entries)) as tick:
        for n, e in enumerate(entries):
            if not n & 0xFFFF:
                tick(0x10000)
            dim, value, plen, vec = e
            if dim != SRC or value <= trie_until:
                if not keep_all:
                    t_dim(dim)
                    t_value(value)
                    t_plen(plen)
                    t_vec(vec)
                continue
            if codes is not None:
                vec = codes[vec]
            # slot: the entry of the /d holding the prefix (root entries are /16s).
            slot, d = value >> (bits - 16), 16
            while plen > d:
                cur = table[slot]
                if not cur & NODE:
                    level = (d - 16) >> 3
                    if d >= depth or room[level] <= 0:
                        if not keep_all:
                            # the slot's own prefix, then the entry
                            t_dim(SRC)
                            t_value(value >> (bits - d) << (bits - d))
                            t_plen(d)
                            t_vec(vec_of.get(cur, cur))
                            t_dim(SRC)
                            t_value(value)
                            t_plen(plen)
                            t_vec(e[3])
                        table[slot] = TRIE
                        trie_until = value | ((1 << (bits - d)) - 1)
                        break
                    n_node, free = free, free + 1
                    room[0] -= 1
                    for lv in range(1, level + 1):
                        room[lv] -= 1
                    fill = fills.get(cur)
                    if fill is None:
                        fill = fills[cur] = array("I", [cur]) * 256
                    table[n_node << 8:(n_node + 1) << 8] = fill
                    table[slot] = cur = NODE | n_node
                d += 8
                slot = (cur & MASK) << 8 | (value >> (bits - d)) & 255
            else:
                width = 1 << (d - plen)
                if width == 1:
                    table[slot] = vec
                else:
                    table[slot:slot + width] = array("I", [vec]) * width
    return table, (entries if keep_all else trie)
