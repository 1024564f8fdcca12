"""Map layout: the constants of bpf/xdpguard.h and the map entries built from them.

The header is the one definition shared by C and Python. Integer constants
are read from its ``#define XG_*`` lines; struct layouts come from bcc
(``table.Key`` / ``table.Leaf``) after a compile, or from the type
descriptions bcc produced, saved in the pinned record (``pins.py``).
"""
from __future__ import annotations

import ctypes
import re
import struct
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

_DEFINE = re.compile(r"^#define\s+(XG_\w+)\s+(\d+)\s*(?:/\*.*)?$")


def bpf_dir() -> Path:
    """Directory holding the C sources (repo checkout or installed package)."""
    here = Path(__file__).resolve().parent.parent / "bpf"
    if (here / "xdpguard.h").is_file():
        return here
    return Path(str(resources.files("xdpguard.bpf")))


@lru_cache(maxsize=None)
def _constants() -> SimpleNamespace:
    values = {}
    for line in (bpf_dir() / "xdpguard.h").read_text().splitlines():
        m = _DEFINE.match(line.strip())
        if m:
            values[m.group(1)] = int(m.group(2))
    return SimpleNamespace(**values)


C = _constants()


# ---------------------------------------------------------------- map entries
#
# Tables (xdpguard.compiler) -> ctypes arrays for one generation. The types
# are bcc's (``Map.Key`` / ``Map.Leaf``), never declared here.

# Maps that outlive a policy shape: reused when a new program is loaded.
PERSISTENT_MAPS = ("counters", "rbuckets", "nbuckets", "sbuckets", "ban4", "ban6", "banstate", "srcstat", "logbuckets")
# Maps of the classifier, sized by the shape.
# lpm4 / lpm6 are arrays of per-generation tries; lpm*_inner, their
# template, gives the tries' key and value types.
POLICY_MAPS = ("active", "gens", "lpm4", "lpm6", "lpm4_inner", "lpm6_inner", "vecs", "ports", "rules",
               "srctab")


_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def struct_of(ctype) -> struct.Struct:
    """A struct.Struct with the layout of a bcc ctypes struct (native byte
    order, bcc's offsets and padding), for packing entries by the 100,000:
    derived from the one definition, never written by hand."""
    fmt, pos = "=", 0
    for f in ctype._fields_:
        name, ft = f[0], f[1]
        if name.startswith("__pad"):
            continue          # bcc's explicit padding: left as pad bytes
        off = getattr(ctype, name).offset
        if off > pos:
            fmt += f"{off - pos}x"
        size = ctypes.sizeof(ft)
        if hasattr(ft, "_length_"):
            fmt += f"{size}s"
        else:
            fmt += _INT_CODES[size]
        pos = off + size
    if ctypes.sizeof(ctype) > pos:
        fmt += f"{ctypes.sizeof(ctype) - pos}x"
    st = struct.Struct(fmt)
    assert st.size == ctypes.sizeof(ctype), (ctype, fmt)
    return st


def lpm_entries(tmpl, entries, family: int) -> tuple[bytes, bytes]:
    """Packed keys and values of a classifier trie of one family (tmpl:
    map lpm4_inner or lpm6_inner, for the types), from (dim, value, plen,
    vec) entries."""
    kst, vst = struct_of(tmpl.Key), struct_of(tmpl.Leaf)
    # Field order of struct xg_lpm*_key: prefixlen, dim, addr.
    assert [f[0] for f in tmpl.Key._fields_ if not f[0].startswith("__pad")] == ["prefixlen", "dim", "addr"]
    nbytes = 4 if family == 4 else 16
    keys = b"".join([kst.pack(8 + plen, dim, value.to_bytes(nbytes, "big"))
                     for dim, value, plen, _vec in entries])
    vals = b"".join([vst.pack(vec) for _d, _v, _p, vec in entries])
    return keys, vals


def _derived(tables, key: str, make):
    d = tables._derived
    if key not in d:
        d[key] = make()
    return d[key]


def universal_rules(tables) -> int:
    """Rules that match whatever the packet's protocol (ND aside), ports
    and destination are: their bits are set in every vector the program can
    find in those four dimensions. Derived from the tables, so it holds for
    exactly what the program looks up."""
    return _derived(tables, "universal", lambda: _universal(tables))


def _universal(tables) -> int:
    u = (1 << tables.nrules) - 1
    for c in range(C.XG_L4_NCLASSES):
        if c != C.XG_L4_ND:
            u &= tables.vecs[c]
    u &= tables.vecs[C.XG_VEC_NOPORT_SPORT] & tables.vecs[C.XG_VEC_NOPORT_DPORT]
    for dim in (C.XG_PORT_SPORT, C.XG_PORT_DPORT):
        for idx in set(tables.ports[dim]):
            u &= tables.vecs[idx]
    if tables.flags & C.XG_GEN_HAS_DST:
        for fam in (4, 6):
            for idx in {vec for dim, _v, _p, vec in tables.lpm[fam] if dim == C.XG_DIM_DST}:
                u &= tables.vecs[idx]
    return u


def decides(vec: int, universal: int) -> int:
    """struct xg_vec.decides: rule + 1 when the vector's lowest rule is
    universal (then it is the lowest bit of any AND with this vector)."""
    low = vec & -vec
    return low.bit_length() if low & universal else 0


def vec_entries(maps, tables, gen: int, vec_per_gen: int, slots: dict[str, int]):
    m = maps["vecs"]
    n = len(tables.vecs)
    keys = (ctypes.c_uint32 * n)(*range(gen * vec_per_gen, gen * vec_per_gen + n))
    vals = (m.Leaf * n)()
    nwords = len(vals[0].w) if n else 0
    mask = (1 << 64) - 1
    universal = universal_rules(tables)
    for i, v in enumerate(tables.vecs):
        d = vals[i].decides = decides(v, universal)
        if d:
            r = tables.rules[d - 1]
            vals[i].dslot, vals[i].daction, vals[i].dlog = slots[r.name], r.action, int(r.log)
        w = vals[i].w
        summary = 0
        for j in range(nwords):
            w[j] = word = (v >> (64 * j)) & mask
            if word:
                summary |= 1 << j
            if not v >> (64 * (j + 1)):
                break
        vals[i].summary = summary
    return keys, vals


def port_entries(tables, gen: int):
    from array import array
    keys = array("I", range(gen * 2 * C.XG_NPORTS, (gen + 1) * 2 * C.XG_NPORTS))
    vals = tables.ports[C.XG_PORT_SPORT] + tables.ports[C.XG_PORT_DPORT]
    return keys, vals


def rule_entries(maps, tables, gen: int, rules_per_gen: int, slots: dict[str, int]):
    m = maps["rules"]
    n = len(tables.rules)
    keys = (ctypes.c_uint32 * n)(*range(gen * rules_per_gen, gen * rules_per_gen + n))
    vals = (m.Leaf * n)()
    for i, r in enumerate(tables.rules):
        v = vals[i]
        v.slot = slots[r.name]
        v.action = r.action
        v.per = r.per
        v.unit = r.unit
        v.prefix4 = r.prefix4
        v.prefix6 = r.prefix6
        v.log = int(r.log)
        v.cost_fp = r.cost_fp
        v.burst_ns = r.burst_ns
        v.new_cost_fp = r.new_cost_fp
        v.new_burst_ns = r.new_burst_ns
        v.total_cost_fp = r.total_cost_fp
        v.total_burst_ns = r.total_burst_ns
    return keys, vals


def gen_value(maps, tables):
    g = maps["gens"].Leaf()
    g.nwords = tables.nwords
    g.flags = tables.flags
    g.default_action = tables.default_action
    g.mit_prefix4 = tables.mit_prefix4
    g.mit_prefix6 = tables.mit_prefix6
    if tables.log_rate:
        # At most log_rate events per second per slot, bursts of log_rate.
        g.log_cost_fp = round(1e9 * 65536 / tables.log_rate)
        g.log_burst_ns = round(1e9)
    return g


# ---------------------------------------------------------------- source tables
#
# Map srctab: per family and generation, a multibit trie of arrays that
# resolves source addresses without the LPM trie (bpf/xdpguard.h).

_BITS = {4: 32, 6: 128}
# Address bits a table resolves: prefixes longer than this go to the trie.
_TABLE_BITS = {4: 8 * C.XG_DIR_V4_BYTES, 6: 8 * C.XG_DIR_V6_BYTES}


def _levels(tables, family: int) -> tuple[int, ...]:
    """For d = 16, 24, ... below the table's depth: how many /d prefixes
    hold a longer source prefix, i.e. the nodes below the root a full
    source table of this family has, level by level."""
    def count():
        bits, depth = _BITS[family], _TABLE_BITS[family]
        src = [(value, plen) for dim, value, plen, _vec in tables.lpm[family] if dim == C.XG_DIM_SRC]
        return tuple(len({v >> (bits - d) for v, p in src if p > d}) for d in range(16, depth, 8))
    return _derived(tables, f"levels{family}", count)


def srctab_nodes_needed(tables, family: int) -> int:
    """Nodes of a family's source table that hold every source prefix it
    can (root included): one per /16 holding a longer prefix, one per /24
    holding a prefix longer than /24, and so on."""
    return C.XG_DIR_ROOT_NODES + sum(_levels(tables, family))


def srctab_codes(tables, slots: dict[str, int]) -> list[int]:
    """The source-table entry of each vector: XG_DIR_FAST with the rule,
    its slot and XG_DIR_DROP where the vector decides an allow or deny
    that does not log (the program then reads no vector), else the
    vector's own index."""
    universal = universal_rules(tables)
    codes = list(range(len(tables.vecs)))
    for i, v in enumerate(tables.vecs):
        d = decides(v, universal)
        if not d:
            continue
        r = tables.rules[d - 1]
        slot = slots[r.name]
        if r.action == C.XG_ACT_LIMIT or r.log or slot > C.XG_DIR_SLOT_MASK or d - 1 > C.XG_DIR_RULE_MASK:
            continue
        codes[i] = (C.XG_DIR_FAST | ((d - 1) << C.XG_DIR_RULE_SHIFT) | slot
                    | (C.XG_DIR_DROP if r.action != C.XG_ACT_ALLOW else 0))
    return codes


def srctab(tables, family: int, nodes: int, slots: dict[str, int] | None = None):
    """srctab_plan, computed once per tables, family, size and slots
    (without slots: vector indexes only, enough to size a program)."""
    key = (nodes, None if slots is None else tuple(sorted(slots.items())))
    name = f"srctab{family}"
    cached = tables._derived.get(name)
    if cached is None or cached[0] != key:
        codes = None if slots is None else _derived(tables, ("codes", key[1]),
                                                    lambda: srctab_codes(tables, slots))
        cached = tables._derived[name] = (key, srctab_plan(tables, family, nodes, codes))
    return cached[1]


def srctab_trie(tables, family: int, nodes: int, slots: dict[str, int] | None = None) -> list:
    """The trie entries that go with a family's table: the same whatever
    the entries' codes, so any plan of that size answers."""
    cached = tables._derived.get(f"srctab{family}")
    if cached is not None and cached[0][0] == nodes:
        return cached[1][1]
    return srctab(tables, family, nodes, slots)[1]


def srctab_plan(tables, family: int, nodes: int, codes: list[int] | None = None):
    """One generation of a family's source table in `nodes` nodes, and the
    trie entries of that family that must go with it.

    Returns (table, trie): table is the region's entries (array of u32,
    nodes x 256, node 0 first): codes[vec] (srctab_codes) for each vector,
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
    from array import array
    NODE, TRIE, SRC = C.XG_DIR_NODE, C.XG_DIR_TRIE, C.XG_DIM_SRC
    MASK = NODE - 1
    bits, depth = _BITS[family], _TABLE_BITS[family]
    table = array("I", bytes(1024 * nodes))
    trie = []
    fills: dict[int, array] = {}       # value -> a node of it (most nodes share a few)
    free = C.XG_DIR_ROOT_NODES
    # room[L]: nodes that may still be made at levels L and deeper, with
    # every node the levels above L need kept for them.
    need = _levels(tables, family)
    room = [nodes - free - sum(need[:lv]) for lv in range(len(need))]
    trie_until = -1                    # last address under the newest XG_DIR_TRIE slot
    # code -> a vector with that code (the trie needs vectors, not codes).
    vec_of = {} if codes is None else {c: v for v, c in enumerate(codes)}
    keep_all = family == 6
    for e in tables.lpm[family]:
        dim, value, plen, vec = e
        if dim != SRC or value <= trie_until:
            keep_all or trie.append(e)
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
                        trie.append((SRC, value >> (bits - d) << (bits - d), d, vec_of.get(cur, cur)))
                        trie.append(e)
                    table[slot] = TRIE
                    trie_until = value | ((1 << (bits - d)) - 1)
                    break
                n, free = free, free + 1
                room[0] -= 1
                for lv in range(1, level + 1):
                    room[lv] -= 1
                fill = fills.get(cur)
                if fill is None:
                    fill = fills[cur] = array("I", [cur]) * 256
                table[n << 8:(n + 1) << 8] = fill
                table[slot] = cur = NODE | n
            d += 8
            slot = (cur & MASK) << 8 | (value >> (bits - d)) & 255
        else:
            width = 1 << (d - plen)
            if width == 1:
                table[slot] = vec
            else:
                table[slot:slot + width] = array("I", [vec]) * width
    return table, (list(tables.lpm[family]) if keep_all else trie)
