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
import sys
from array import array
from functools import lru_cache
from importlib import resources
from itertools import repeat
from operator import add
from pathlib import Path
from types import SimpleNamespace

_DEFINE = re.compile(r"^#define\s+(XG_\w+)\s+(\d+)U?\s*(?:/\*.*)?$")


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

# Rule and default actions (struct xg_rule.action) by their policy names.
ACTION_NAMES = {C.XG_ACT_ALLOW: "allow", C.XG_ACT_DENY: "deny", C.XG_ACT_LIMIT: "limit"}

# What each fixed counter slot counts (bpf/xdpguard.h), by the name the
# reference verdict (xdpguard.lookup), `stats` and the drop log give it.
SLOT_REASONS = {
    C.XG_SLOT_DEFAULT: "default",
    C.XG_SLOT_BAN: "ban",
    C.XG_SLOT_ND: "nd",
    C.XG_SLOT_NEWSRC: "new_source_overflow",
    C.XG_SLOT_COOKIE: "syncookie_synack",
    C.XG_SLOT_BADCOOKIE: "syncookie_bad_ack",
    C.XG_SLOT_TRUNCATED: "truncated",
    C.XG_SLOT_BAD_HEADER: "bad_header",
    C.XG_SLOT_VLANS: "vlans",
    C.XG_SLOT_EXTHDRS: "exthdrs",
    C.XG_SLOT_NO_ENTRY: "no_entry",
    C.XG_SLOT_COOKIE_MOVED: "syncookie_moved_short",
    C.XG_SLOT_COOKIE_ROOM4: "syncookie_no_room4",
    C.XG_SLOT_COOKIE_ROOM6: "syncookie_no_room6",
    C.XG_SLOT_COOKIE_TRIM: "syncookie_not_trimmed",
}
# The SYN cookie path's drops that cannot happen (bpf/xdpguard.h).
COOKIE_BUG_SLOTS = (C.XG_SLOT_COOKIE_MOVED, C.XG_SLOT_COOKIE_ROOM4, C.XG_SLOT_COOKIE_ROOM6,
                    C.XG_SLOT_COOKIE_TRIM)
# The causes of a malformed frame: dropped before the ban map and the rules.
MALFORMED_SLOTS = (C.XG_SLOT_TRUNCATED, C.XG_SLOT_BAD_HEADER, C.XG_SLOT_VLANS, C.XG_SLOT_EXTHDRS)


_STRUCT = re.compile(r"struct\s+(xg_\w+)\s*\{(.*?)\};", re.S)
_FIELD = re.compile(r"(__u8|__u16|__u32|__u64|struct\s+\w+)\s+\w+\s*(?:\[(\w+)\])?\s*;")
_SCALAR = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}


def sizeof(name: str, **defines: int) -> tuple[int, int]:
    """(size, alignment) of struct `name` of bpf/xdpguard.h, as the C
    compiler lays it out (natural alignment); defines: the -D flags its
    arrays use (XG_NWORDS). For memory estimates without bcc; the loader
    takes the layouts themselves from bcc."""
    structs = _struct_bodies()
    size = align = 0
    for ftype, dim in _FIELD.findall(structs[name]):
        if ftype in _SCALAR:
            fsize = falign = _SCALAR[ftype]
        else:
            fsize, falign = sizeof(ftype.split()[1], **defines)
        count = 1 if not dim else int(dim) if dim.isdigit() else defines.get(dim, getattr(C, dim, None))
        size = -(-size // falign) * falign + fsize * count
        align = max(align, falign)
    return -(-size // align) * align, align


@lru_cache(maxsize=None)
def _struct_bodies() -> dict[str, str]:
    text = re.sub(r"/\*.*?\*/", "", (bpf_dir() / "xdpguard.h").read_text(), flags=re.S)
    return dict(_STRUCT.findall(text))


# ---------------------------------------------------------------- map entries
#
# Tables (xdpguard.compiler) -> ctypes arrays for one generation. The types
# are bcc's (``Map.Key`` / ``Map.Leaf``), never declared here.

# Maps that outlive a policy shape: reused when a new program is loaded.
PERSISTENT_MAPS = ("counters", "rbuckets", "nbuckets", "sbuckets", "seen", "ban4", "ban6", "banstate", "srcstat", "logbuckets",
                   "cookieports", "synports", "cookiewhy")
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


def lpm_entries(tmpl, entries, family: int) -> tuple[bytearray, bytes]:
    """Packed keys and values of a classifier trie of one family (tmpl:
    map lpm4_inner or lpm6_inner, for the types), from (dim, value, plen,
    vec) entries: compiler.LpmEntries columns, or tuples. Packed a field
    at a time into strided slices, never a bytes object per entry (a
    blocklist brings millions)."""
    K = tmpl.Key
    # Field order of struct xg_lpm*_key: prefixlen, dim, addr.
    assert [f[0] for f in K._fields_ if not f[0].startswith("__pad")] == ["prefixlen", "dim", "addr"]
    assert (K.prefixlen.size, K.dim.size) == (4, 1) and [f[0] for f in tmpl.Leaf._fields_] == ["vec"]
    if hasattr(entries, "vec"):
        dims, values, plens, vecs = entries.dim, entries.value, entries.plen, entries.vec
    else:
        dims, values, plens, vecs = (list(c) for c in zip(*entries)) if entries else ([], [], [], [])
    nbytes = 4 if family == 4 else 16
    if family == 4:
        addr = array("I", values)          # network byte order below
        if sys.byteorder == "little":
            addr.byteswap()
        addr = addr.tobytes()
    else:
        addr = b"".join(map(int.to_bytes, values, repeat(16), repeat("big")))
    ks = ctypes.sizeof(K)
    keys = bytearray(ks * len(vecs))
    for off, width, column in ((K.prefixlen.offset, 4, array("I", map(add, plens, repeat(8))).tobytes()),
                               (K.dim.offset, 1, bytes(dims)), (K.addr.offset, nbytes, addr)):
        for b in range(width):
            keys[off + b::ks] = column[b::width]
    vals = array("I", vecs)
    assert vals.itemsize == ctypes.sizeof(tmpl.Leaf)
    return keys, vals.tobytes()


def _rows(m, gen: int, per_gen: int, n: int):
    """Keys of generation gen's first n rows of array map m, and n zeroed values."""
    return (ctypes.c_uint32 * n)(*range(gen * per_gen, gen * per_gen + n)), (m.Leaf * n)()


def vec_entries(maps, tables, gen: int, vec_per_gen: int, slots: dict[str, int]):
    keys, vals = _rows(maps["vecs"], gen, vec_per_gen, len(tables.vecs))
    nwords = len(vals[0].w) if len(vals) else 0
    mask = (1 << 64) - 1
    for i, v in enumerate(tables.vecs):
        d = vals[i].decides = tables.decides[i]
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
    keys = array("I", range(gen * 2 * C.XG_NPORTS, (gen + 1) * 2 * C.XG_NPORTS))
    vals = tables.ports[C.XG_PORT_SPORT] + tables.ports[C.XG_PORT_DPORT]
    return keys, vals


def rule_entries(maps, tables, gen: int, rules_per_gen: int, slots: dict[str, int]):
    keys, vals = _rows(maps["rules"], gen, rules_per_gen, len(tables.rules))
    for i, r in enumerate(tables.rules):
        v = vals[i]
        v.slot = slots[r.name]
        v.action = r.action
        v.per = r.per
        v.unit = r.unit
        v.prefix4 = r.prefix4
        v.prefix6 = r.prefix6
        v.log = int(r.log)
        v.cookies = int(r.syncookies)
        v.coarse = int(r.coarse)
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
