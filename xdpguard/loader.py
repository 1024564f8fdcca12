"""Loader: compile and load the XDP program with bcc, fill its maps, attach,
pin, re-apply atomically, detach. Also the BPF_PROG_TEST_RUN rig behind
`xdpguard test`.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import socket
import time
from array import array
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from xdpguard import bans, bpfsys, history, killpoint, layout, pins, plan, progress, syncookies
from xdpguard.compiler import Tables
from xdpguard.errors import LoadError, UsageError  # noqa: F401 (re-exported)
from xdpguard.layout import C, PERSISTENT_MAPS, POLICY_MAPS
from xdpguard.lookup import Outcome, kernel_outcome
from xdpguard.netns import exists as netns_exists, in_netns
from xdpguard.policy import Policy

PROG_NAME = "xdpguard_prog"
COOKIE_PROG = "xg_cookie_prog"
MODES = {"native": bpfsys.XDP_FLAGS_DRV_MODE, "generic": bpfsys.XDP_FLAGS_SKB_MODE}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Shape:
    """The integers compiled into the program (-D flags): capacities, and
    the seen filter's epoch (tests shorten it to see bits age out)."""
    nwords: int
    vec_per_gen: int
    dir4_nodes: int = 1024  # source table nodes per generation (1 KiB each), IPv4
    dir6_nodes: int = 1024  # and IPv6
    syncookies: int = 0     # 1: SYN cookies compiled in (bpf/syncookie.h)
    seen_epoch_log2: int = C.XG_SEEN_EPOCH_LOG2

    @property
    def rules_per_gen(self) -> int:
        return 64 * self.nwords

    def cflags(self) -> list[str]:
        return ([f"-DXG_NWORDS={self.nwords}", f"-DXG_VEC_PER_GEN={self.vec_per_gen}",
                 f"-DXG_DIR4_NODES={self.dir4_nodes}", f"-DXG_DIR6_NODES={self.dir6_nodes}"]
                + (["-DXG_SYNCOOKIES=1"] if self.syncookies else [])
                + ([f"-DXG_SEEN_EPOCH_LOG2={int(self.seen_epoch_log2)}"]
                   if self.seen_epoch_log2 != C.XG_SEEN_EPOCH_LOG2 else []))

    def nodes(self, family: int) -> int:
        return self.dir4_nodes if family == 4 else self.dir6_nodes

    @property
    def dir_nodes(self) -> dict[int, int]:
        """Source table nodes per family."""
        return {4: self.dir4_nodes, 6: self.dir6_nodes}

    @classmethod
    def for_tables(cls, t: Tables, sizes: plan.Sizes | None = None) -> "Shape":
        """The shape a program for these tables gets, with headroom
        (sizes: plan.measure(t), if already known)."""
        # Headroom, so that most later policies fit without a recompile.
        # The classifier tries are no part of the shape: each generation
        # gets a new one of its own size (write_gen).
        sizes = sizes or plan.measure(t)
        nodes = {f: min(C.XG_DIR_MAX_NODES, _pow2(2 * sizes.nodes_needed(f))) for f in (4, 6)}
        return cls(nwords=min(64, _pow2(max(1, (t.nrules + 16 + 63) // 64))),
                   vec_per_gen=_pow2(max(256, 2 * len(t.vecs))),
                   dir4_nodes=nodes[4], dir6_nodes=nodes[6], syncookies=int(t.syncookies))

    def map_names(self, test: bool = False) -> tuple[str, ...]:
        """The maps a program of this shape has (bpf/xdpguard.c)."""
        return POLICY_MAPS + PERSISTENT_MAPS + (("debug",) if test else ())

    def fits(self, t: Tables, sizes: plan.Sizes | None = None) -> bool:
        """Whether a policy can be written into a program of this shape
        (sizes: plan.measure(t), if already known)."""
        if not (t.nrules <= self.rules_per_gen and len(t.vecs) <= self.vec_per_gen):
            return False
        if t.syncookies and not self.syncookies:
            return False
        sizes = sizes or plan.measure(t)
        for fam in (4, 6):
            nodes = self.nodes(fam)
            # A table at the largest size takes any policy (the trie takes
            # the rest); a smaller one must hold all of it.
            if nodes < C.XG_DIR_MAX_NODES and sizes.nodes_needed(fam) > nodes:
                return False
        return True


# ---------------------------------------------------------------- map memory

# Kernel memory of the maps a policy fills, as the kernel accounts it
# (memlock in fdinfo, map_mem_usage of kernel 6.4+; older kernels round
# differently). A classifier trie element is a struct lpm_trie_node (two
# child pointers, prefixlen, flags: 24 bytes, and an rcu_head before 6.14
# moved the trie to the BPF memory allocator) followed by the key's data
# (the key minus its prefixlen) and the value.
_LPM_PREFIXLEN = 4


def _lpm_node_bytes() -> int:
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    return 24 if release >= (6, 14) else 40


def map_memory(shape: Shape, sources: plan.Plan) -> dict[str, int]:
    """Bytes of each map the policy fills: its classifier tries (one
    generation's), and the arrays of both generations the shape sizes
    (bpf/xdpguard.c). Known before anything is loaded."""
    def row(struct: str, **defines) -> int:         # an array element: rounded to 8 bytes
        return -(-layout.sizeof(struct, **defines)[0] // 8) * 8
    out = {}
    for fam in (4, 6):
        elem = _lpm_node_bytes() + layout.sizeof(f"xg_lpm{fam}_key")[0] - _LPM_PREFIXLEN + layout.sizeof("xg_class")[0]
        out[f"lpm{fam}"] = len(sources.trie[fam]) * elem
    page = mmap.PAGESIZE
    out["srctab"] = -(-2 * (shape.dir4_nodes + shape.dir6_nodes) * row("xg_dirnode") // page) * page
    out["vecs"] = 2 * shape.vec_per_gen * row("xg_vec", XG_NWORDS=shape.nwords)
    out["rules"] = 2 * shape.rules_per_gen * row("xg_rule")
    out["ports"] = 2 * 2 * C.XG_NPORTS * row("xg_class")
    return out


def policy_map_memory(tables: Tables) -> dict[str, int]:
    """map_memory of these tables in the program a first apply loads."""
    sizes = plan.measure(tables)
    shape = Shape.for_tables(tables, sizes)
    return map_memory(shape, plan.build(tables, shape.dir_nodes, None, sizes))


def describe_memory(mem: dict[str, int]) -> str:
    """'map memory: 781.5 MiB (classifier tries 650.5 MiB, ...)': one
    unit for every part, so that they add up at a glance."""
    parts = (("classifier tries", mem["lpm4"] + mem["lpm6"]), ("source tables", mem["srctab"]),
             ("vectors", mem["vecs"]), ("rules", mem["rules"]), ("ports", mem["ports"]))
    return (f"map memory: {sum(mem.values()) / 2**20:.1f} MiB ("
            + ", ".join(f"{name} {n / 2**20:.1f}" for name, n in parts) + ")")


# ---------------------------------------------------------------- compile + load

def program_cflags(shape: Shape, stage: int | None = None, test: bool = False) -> list[str]:
    """bcc's compiler flags for bpf/xdpguard.c (see its header comment)."""
    cflags = [f"-I{layout.bpf_dir()}", "-w"] + shape.cflags()
    if stage is not None:
        cflags.append(f"-DXG_STAGE={int(stage)}")
    if test:
        cflags.append("-DXG_TEST=1")
    return cflags


def compile_program(shape: Shape, stage: int | None = None, test: bool = False):
    """Compile bpf/xdpguard.c with bcc and load the XDP program (verifier).
    `xdpguard doctor` compiles through here too, so that its verdict is
    apply's."""
    from bcc import BPF
    cflags = program_cflags(shape, stage, test)
    try:
        b = BPF(src_file=str(layout.bpf_dir() / "xdpguard.c").encode(), cflags=cflags)
        fn = b.load_func(PROG_NAME.encode(), BPF.XDP)
        if shape.syncookies:
            # The SYN cookie path, tail-called (bpf/xdpguard.c: cookieprog).
            cookie = b.load_func(COOKIE_PROG.encode(), BPF.XDP)
            b[b"cookieprog"][ctypes.c_int(0)] = ctypes.c_int(cookie.fd)
    except Exception as e:   # bcc raises bare Exception for compile and verifier errors
        raise LoadError(f"loading the XDP program failed: {e}") from None
    return b, fn


def bcc_maps(b, names) -> dict[str, pins.Map]:
    out = {}
    for n in names:
        t = b[n.encode()]
        # bcc widens per-CPU leaves to an array of CPUs; keep the struct.
        leaf = getattr(t, "sLeaf", t.Leaf)
        out[n] = pins.Map(n, t.map_fd, t.Key, leaf, t.ttype, t.max_entries, owned=False)
    return out


def bcc_types(b, names) -> dict:
    """bcc's JSON type descriptions, saved in the record for readers."""
    import json
    from bcc.libbcc import lib
    out = {}
    for n in names:
        key = lib.bpf_table_key_desc(b.module, n.encode())
        leaf = lib.bpf_table_leaf_desc(b.module, n.encode())
        out[n] = {"key": json.loads(key), "leaf": json.loads(leaf)}
    return out


# ---------------------------------------------------------------- generations

_BATCH = 1 << 18      # trie entries packed and written at a time


def _put_trie(maps: dict, family: int, gen: int, entries: list) -> None:
    """A new classifier trie of one family for one generation, filled and
    put in its slot of the per-generation array (map lpm4 / lpm6). The
    trie it replaces (the generation before the running one) is freed by
    the kernel: nothing is deleted entry by entry. Entries are packed a
    batch at a time: the keys of millions never exist at once."""
    tmpl = maps[f"lpm{family}_inner"]
    ks = ctypes.sizeof(tmpl.Key)
    # Type, flags and BTF must be the template's; the size may differ (LPM
    # tries are not inlined into the program like arrays).
    fd = bpfsys.map_create_like(tmpl.fd, f"xg_lpm{family}_g{gen}", max(1, len(entries)))
    try:
        with progress.task(f"filling IPv{family} classifier trie", len(entries)) as tick:
            for i in range(0, len(entries), _BATCH):
                part = entries[i:i + _BATCH]
                keys, vals = layout.lpm_entries(tmpl, part, family)
                bpfsys.map_update_many(fd, keys, vals, len(keys) // ks)
                tick(len(part))
        bpfsys.map_update(maps[f"lpm{family}"].fd, bytes(ctypes.c_uint32(gen)), bytes(ctypes.c_uint32(fd)))
    finally:
        os.close(fd)


def write_gen(maps: dict, tables: Tables, gen: int, shape: Shape, slots: dict[str, int],
              sources: plan.Plan) -> None:
    """Write one generation of the classifier (not yet active); sources:
    plan.build(tables, shape.dir_nodes, slots)."""
    for fam in (4, 6):
        _write_srctab(maps["srctab"], sources.table[fam], fam, gen, shape)
        _put_trie(maps, fam, gen, sources.trie[fam])
    killpoint.step("write-gen")
    keys, vals = layout.vec_entries(maps, tables, gen, shape.vec_per_gen, slots)
    maps["vecs"].update_batch(keys, vals)
    keys, vals = layout.port_entries(tables, gen)
    bpfsys.map_update_batch(maps["ports"].fd, keys.tobytes(), vals.tobytes(), len(keys))
    keys, vals = layout.rule_entries(maps, tables, gen, shape.rules_per_gen, slots)
    maps["rules"].update_batch(keys, vals)
    maps["gens"].update(ctypes.c_uint32(gen), layout.gen_value(maps, tables))


def _write_srctab(m: pins.Map, table, family: int, gen: int, shape: Shape) -> None:
    import mmap
    # Regions of the map: IPv4 gen 0, gen 1, IPv6 gen 0, gen 1 (xdpguard.h).
    # A node is an element of 256 __u32 (1 KiB, a multiple of the array's
    # 8-byte stride): the table's own bytes, node 0 first.
    nodes = shape.nodes(family)
    assert ctypes.sizeof(m.Leaf) == 1024 and len(table) == 256 * nodes
    first = gen * nodes if family == 4 else 2 * shape.dir4_nodes + gen * nodes
    total = 1024 * 2 * (shape.dir4_nodes + shape.dir6_nodes)
    with mmap.mmap(m.fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        mm[1024 * first:1024 * (first + nodes)] = memoryview(table).cast("B")


def _active_word(maps) -> int:
    v = maps["active"].lookup(ctypes.c_uint32(0))
    return int(v.value if hasattr(v, "value") else v)


def read_active(maps) -> int:
    return _active_word(maps) & 1


def set_active(maps, gen: int) -> None:
    """Switch to a written generation. One 8-byte array write, so every
    packet sees either generation whole; it carries the generation's flags
    (bpf/xdpguard.h: the active word), copied from its gens record, and
    the next epoch: a word is never written twice, so the fast lane's
    last-source memory never outlives the fill it was read from. Callers
    hold the pin lock (or own the maps), so the epoch has one writer."""
    flags = maps["gens"].lookup(ctypes.c_uint32(gen)).flags
    epoch = (_active_word(maps) >> C.XG_ACTIVE_EPOCH_SHIFT) + 1
    epoch &= (1 << (64 - C.XG_ACTIVE_EPOCH_SHIFT)) - 1
    word = gen | flags << C.XG_ACTIVE_FLAGS_SHIFT | max(epoch, 1) << C.XG_ACTIVE_EPOCH_SHIFT
    maps["active"].update(ctypes.c_uint32(0), ctypes.c_uint64(word))


def settle(maps, record: pins.Record) -> None:
    """Flip the active word to the generation the record describes, if a
    kill came between writing the record and flipping (that generation is
    whole: the record names it only once it is written). Hold the pin lock."""
    if record.generation is not None and read_active(maps) != record.generation:
        set_active(maps, record.generation)


def assign_slots(tables: Tables, previous: dict[str, int] | None) -> tuple[dict[str, int], list[int]]:
    """Stable slots by rule name; returns (slots, newly assigned slots).

    A new rule never takes a slot the running policy uses, so packets still
    counted under the old generation never land on a new rule's counter.
    """
    previous = previous or {}
    slots, fresh = {}, []
    used = set(previous.values())
    nxt = C.XG_SLOT_FIRST_RULE
    for r in tables.rules:
        if r.name in previous:
            slots[r.name] = previous[r.name]
    taken = used | set(slots.values())
    for r in tables.rules:
        if r.name in slots:
            continue
        while nxt in taken:
            nxt += 1
        if nxt >= C.XG_SLOT_END_RULES:
            # Wrap into slots the old policy used but the new one does not.
            free = sorted(set(range(C.XG_SLOT_FIRST_RULE, C.XG_SLOT_END_RULES)) - set(slots.values()))
            nxt = free[0]
        slots[r.name] = nxt
        fresh.append(nxt)
        taken.add(nxt)
    return slots, fresh


def seen_epoch(log2: int = C.XG_SEEN_EPOCH_LOG2) -> int:
    """The seen filter's epoch now, by the clock the program reads
    (CLOCK_MONOTONIC; bpf/xdpguard.h XG_SEEN_EPOCH_LOG2)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) >> log2


def seen_tag(epoch: int) -> int:
    """The tag bits of a seen word written in `epoch` (xg_seen_tag)."""
    return (epoch & ((1 << C.XG_SEEN_TAG_BITS) - 1)) << C.XG_SEEN_BITS


def seen_bits_valid(values: bytes, epoch: int) -> int:
    """How many keys' bits the seen filter's words `values` hold in
    `epoch`: per pair, the bits of its words whose tag is that epoch's or
    the one before."""
    words = array("Q", values)
    bits, valid = (1 << C.XG_SEEN_BITS) - 1, {seen_tag(epoch), seen_tag(epoch - 1)}
    live = [w & bits if w & ~bits in valid else 0 for w in words]
    return sum((a | b).bit_count() for a, b in zip(live[0::2], live[1::2]))


def seen_words(pair_bits: list[int], log2: int = C.XG_SEEN_EPOCH_LOG2) -> bytes:
    """The seen filter's words with `pair_bits[i]` (XG_SEEN_BITS bits) in
    pair i's word of this epoch and the pair's other word empty: they
    count for this epoch and the next, as bits the program sets now."""
    e = seen_epoch(log2)
    tag, words = seen_tag(e), array("Q", bytes(8 * C.XG_SEEN_WORDS))
    for i, bits in enumerate(pair_bits):
        words[2 * i + (e & 1)] = tag | bits
    return words.tobytes()


def fill_seen(seen, log2: int = C.XG_SEEN_EPOCH_LOG2) -> None:
    """Every bit of the seen-sources filter set (bpf/xdpguard.h, XG_SEEN_*)
    in this epoch's words: for buckets made by a program that had no
    filter (pins of an older xdpguard), whose keys have no bits. Every
    source's bucket is then looked up, as before the filter, until the
    bits age out (one or two epochs); by then a source that kept sending
    has its own bit. Never a wrong verdict."""
    write_seen(seen, seen_words([(1 << C.XG_SEEN_BITS) - 1] * C.XG_SEEN_PAIRS, log2))


def write_seen(seen, values: bytes) -> None:
    """Every word of the seen-sources filter at once (XG_SEEN_WORDS
    64-bit words, in order)."""
    n = C.XG_SEEN_WORDS
    bpfsys.map_update_many(seen.fd, array("I", range(n)).tobytes(), values, n)


def zero_slots(maps, slots: list[int]) -> None:
    cz = bytes(bpfsys.percpu_value_size(ctypes.sizeof(maps["counters"].Leaf)))
    bz = bytes(ctypes.sizeof(maps["rbuckets"].Leaf))
    for s in slots:
        bpfsys.map_update(maps["counters"].fd, bytes(ctypes.c_uint32(s)), cz)
        for name in ("rbuckets", "nbuckets"):
            bpfsys.map_update(maps[name].fd, bytes(ctypes.c_uint32(s)), bz)


# ---------------------------------------------------------------- apply / detach

def ifindex_of(iface: str, netns: str | None) -> int:
    try:
        with in_netns(netns):
            return socket.if_nametoindex(iface)
    except OSError:
        where = f" in network namespace '{netns}'" if netns else ""
        raise UsageError(f"no interface '{iface}'{where}") from None


@dataclass
class Site:
    """Where an apply goes and what it found there."""
    netns: str | None
    iface: str
    ifindex: int
    directory: Path
    record: pins.Record | None   # of the policy applied there, if any
    attached: dict               # bpfsys.xdp_query's answer
    ours: bool                   # the attached program is that record's


@dataclass
class Fill:
    """What one generation gets: the program's shape, the rules' slots
    (fresh: those new to the program) and the source tables."""
    shape: Shape
    slots: dict[str, int]
    fresh: list[int]
    sources: plan.Plan
    cookies: pins.Syncookies | None = None   # syncookies' table and saved sysctls
    back: bool = False                       # a rollback: see _follow


def _follow(rec: pins.Record, record: pins.Record | None, previous: pins.Previous | None,
            back: bool) -> None:
    """rec replaces record: record's policy goes first in the history, and
    previous says where rollback finds it at once. A rollback (back) goes
    the other way: record's first history entry comes off, and nothing is
    previous, so that a second rollback goes further back, never forward."""
    if back:
        rec.history, rec.previous = list(record.history[1:]), None
    elif record is not None:
        rec.history, rec.previous = ([record.policy] + record.history)[:pins.HISTORY], previous


def _record(policy: Policy, tables: Tables, fill: Fill, *, netns: str | None, iface: str,
            ifindex: int, mode: str, prog_id: int, types: dict) -> pins.Record:
    return pins.Record(
        netns=netns or "host", iface=iface, ifindex=ifindex, mode=mode, prog_id=prog_id,
        policy=pins.PolicyInfo(policy.name, policy.sha256, policy.source, time.time(),
                               policy.default, len(policy.rules)),
        shape=asdict(fill.shape),
        rules=[pins.RuleSlot(r.name, layout.ACTION_NAMES[r.action], fill.slots[r.name])
               for r in tables.rules],
        slots=fill.slots,
        # Trie entries of the generation (what the source tables left).
        lpm={str(f): len(fill.sources.trie[f]) for f in (4, 6)},
        types=types,
        mitigation=pins.MitigationInfo(policy.mitigation.enabled, policy.mitigation.prefix4,
                                       policy.mitigation.prefix6,
                                       [str(p) for p in policy.mitigation.allow],
                                       policy.mitigation.max_bans),
        protect=[pins.Protect(str(p), port) for p, port in policy.protect],
        syncookies=fill.cookies,
        # `ban` and `unban` publish with it (paths of secrets, no secret).
        fleet=asdict(policy.fleet) if policy.fleet else None)


def apply(policy: Policy, tables: Tables, iface: str, netns: str | None = None,
          mode: str = "auto", dry_run: bool = False, force: bool = False,
          log=print, memory=lambda mem: None, back: bool = False) -> pins.Record | None:
    """Apply compiled tables to an interface. Returns the new record (None
    for a dry run); the running one, untouched, when it is this policy
    already (same sha256). memory gets map_memory() before anything is
    loaded (log gets it described). back: a rollback's apply (_follow)."""
    pins.ensure_bpffs()
    ifindex = ifindex_of(iface, netns)
    if tables.syncookies:
        syncookies.require()
    if dry_run:
        slots, _ = assign_slots(tables, None)
        sizes = plan.measure(tables)
        shape = Shape.for_tables(tables, sizes)
        sources = plan.build(tables, shape.dir_nodes, slots, sizes)
        mem = map_memory(shape, sources)
        log(describe_memory(mem))
        memory(mem)
        b, fn = compile_program(shape)
        maps = bcc_maps(b, shape.map_names())
        write_gen(maps, tables, 0, shape, slots, sources)
        set_active(maps, 0)
        log(f"dry run: policy '{policy.name}' compiled, loaded and verified; nothing attached")
        b.cleanup()
        return None

    with pins.locked():
        directory = pins.iface_dir(netns, iface)
        record = pins.read_record(directory)
        with in_netns(netns):
            q = bpfsys.xdp_query(ifindex)
        ours = record is not None and q["prog_id"] != 0 and q["prog_id"] == record.prog_id
        stray = bool(q["prog_id"]) and not ours and is_xdpguard(q["prog_id"])
        if stray:
            # Ours by name but not the record's: a reload killed between
            # attach and pinning, or a removed record. Replaced like a
            # foreign program, keeping the maps pinned here.
            log(f"warning: {iface}: replacing an xdpguard program no record describes "
                f"(id {q['prog_id']}; an interrupted apply)")
        elif q["prog_id"] and not ours and not force:
            raise UsageError(f"{iface}: another XDP program is attached (id {q['prog_id']}, "
                             f"'{bpfsys.prog_name(q['prog_id'])}'); xdpguard will not replace it "
                             f"(detach it, or use --force)")
        pins.prune()
        if ours and mode != "auto" and mode != record.mode:
            # Native and generic XDP cannot be attached at once: a switch
            # would leave a moment without the filter.
            raise UsageError(f"{iface}: xdpguard runs in {record.mode} mode here; changing to "
                             f"{mode} cannot be atomic: detach first, then apply --mode {mode}")
        if ours and not back and record.policy.sha256 == policy.sha256:
            return _unchanged(directory, record, log)
        slots, fresh = assign_slots(tables, record.slots if record else None)
        # The nftables table and sysctls syncookies need come before the
        # program answers a SYN, and go after it stops.
        before = record.syncookies if record else None
        cookies = _cookies_on(policy, tables, netns, iface, ifindex, directory, before)
        try:
            rec = _apply_fill(policy, tables, Site(netns, iface, ifindex, directory, record, q, ours),
                              slots, fresh, cookies, mode, log, memory, back)
        except BaseException:
            if cookies and not before:
                _cookies_off(netns, directory, cookies)
            raise
        if before and not cookies:
            _cookies_off(netns, directory, before)
        if before and before.auto and not (cookies and cookies.auto):
            _auto_cookies_off(directory, rec)
        return rec


def _auto_cookies_off(directory: Path, record: pins.Record) -> None:
    """A policy without syncookies = "auto": no port's switch stays on
    (a later "auto" policy starts with all off)."""
    from xdpguard.cookieswitch import PortSwitch
    try:
        sw = PortSwitch.open(directory, record)
    except (OSError, KeyError):
        return        # pins of a program without the maps
    try:
        sw.clear()
    finally:
        sw.close()


def is_xdpguard(prog_id: int) -> bool:
    """Whether a loaded program is one xdpguard loaded (by its name)."""
    return bpfsys.prog_name(prog_id) == PROG_NAME


def _prog_fd(record: pins.Record) -> int:
    """An fd of the record's program, by id (its pin may be gone; the
    caller checked that this id is the one attached)."""
    return bpfsys.prog_get_fd_by_id(record.prog_id)


def _unchanged(directory: Path, record: pins.Record, log) -> pins.Record:
    """apply of the running policy: nothing changes (not the history, not
    the rollback target), but a flip a kill cut short is finished."""
    with _opened(directory, record, ("active", "gens")) as maps:
        settle(maps, record)
    log(f"{record.iface}: policy '{record.policy.name}' unchanged (sha256 {record.policy.sha256[:16]}...); "
        f"nothing done")
    return record


def _apply_fill(policy, tables, site: Site, slots, fresh, cookies, mode, log, memory,
                back=False) -> pins.Record:
    """apply's program and maps, under the pin lock: in place when the
    running program's shape fits, else a new program; and the copy of the
    policy that a later rollback may need (history.py)."""
    warning = history.save(policy, site.netns, site.iface)     # before a record names it
    if warning:
        log(f"warning: {site.iface}: {warning}")
    rec = _fill(policy, tables, site, slots, fresh, cookies, mode, log, memory, back)
    try:
        history.prune(site.netns, site.iface, rec)
    except OSError as e:
        log(f"warning: {site.iface}: old policy copies not removed: {e}")
    return rec


def _fill(policy, tables, site: Site, slots, fresh, cookies, mode, log, memory, back) -> pins.Record:
    record = site.record
    # The shape and the source tables, computed once and passed down.
    sizes = plan.measure(tables)

    def fill_of(shape: Shape) -> Fill:
        fill = Fill(shape, slots, fresh, plan.build(tables, shape.dir_nodes, slots, sizes), cookies, back)
        mem = map_memory(shape, fill.sources)
        log(describe_memory(mem))
        memory(mem)
        return fill

    if site.ours:
        shape = Shape(**record.shape)
        if shape.fits(tables, sizes):
            return _reapply_in_place(policy, tables, site.directory, record, fill_of(shape), log)
    shape = Shape.for_tables(tables, sizes)
    if record:
        shape = replace(shape, nwords=max(shape.nwords, record.shape["nwords"]))
    rec = _load_and_attach(policy, tables, site, fill_of(shape), mode, log)
    # Pins die with a reboot and with a detach; the state directory
    # keeps the bans, which go back into ban maps that came new.
    try:
        bans.restore(site.directory, rec, policy.mitigation.max_bans, log)
    except OSError as e:
        log(f"warning: {site.iface}: bans not restored: {e}")
    return rec


def _cookies_on(policy, tables, netns, iface, ifindex, directory, before) -> pins.Syncookies | None:
    """The nftables table and sysctls of syncookies in place
    (xdpguard/syncookies.py); None without syncookies."""
    if not tables.syncookies:
        return None
    return syncookies.install(netns, iface, ifindex, syncookies.port_ranges(policy), before,
                              _netns_cookies(netns, directory), syncookies.port_ranges(policy, "auto"))


def _cookies_off(netns, directory, cookies: pins.Syncookies) -> None:
    syncookies.remove(netns, cookies, others_use=_netns_cookies(netns, directory) is not None)


def _netns_cookies(netns, directory) -> pins.Syncookies | None:
    """The syncookies record of another interface of this namespace, if
    any has syncookies on (it set the sysctls and keeps their old values)."""
    ns = netns or "host"
    for n, _ifc, d in pins.all_pinned():
        if n == ns and d != directory:
            rec = pins.read_record(d)
            if rec and rec.syncookies:
                return rec.syncookies
    return None


def _open_maps(directory: Path, record: pins.Record, names) -> dict[str, pins.Map]:
    return {n: pins.open_map(directory, n, record) for n in names}


@contextmanager
def _opened(directory: Path, record: pins.Record, names):
    """_open_maps for a with block, closed at its end."""
    maps = _open_maps(directory, record, names)
    try:
        yield maps
    finally:
        for m in maps.values():
            m.close()


def _reapply_in_place(policy, tables, directory, record: pins.Record, fill: Fill,
                      log) -> pins.Record:
    t0 = time.monotonic()
    maps = _open_maps(directory, record, POLICY_MAPS + ("counters", "rbuckets", "nbuckets"))
    try:
        settle(maps, record)
        old = read_active(maps)
        new = 1 - old
        # The inactive generation holds the policy before the running one
        # (kept for rollback until now) or leftovers of an interrupted
        # apply: write_gen replaces all of it. The record stops naming it
        # as the rollback target first: a kill midway must not leave
        # rollback a half-written generation to flip to.
        if record.previous and record.previous.kind == "gen":
            record = pins.modify_record(directory, lambda r: replace(r, previous=None))
        killpoint.step("inplace-write")
        zero_slots(maps, fill.fresh)
        write_gen(maps, tables, new, fill.shape, fill.slots, fill.sources)
        rec = _record(policy, tables, fill, netns=record.ns, iface=record.iface,
                      ifindex=record.ifindex, mode=record.mode, prog_id=record.prog_id,
                      types=record.types)
        _follow(rec, record, record.as_previous("gen", gen=old), fill.back)
        rec.generation = new
        # Record, then flip: a kill between leaves a record naming a whole
        # generation, which the next writer flips to (settle).
        pins.modify_record(directory, lambda _replaced: rec)
        killpoint.step("inplace-record")
        set_active(maps, new)
        killpoint.step("inplace-flipped")
        pins.remove_dir(prev_dir(directory))   # no longer the rollback target
    finally:
        for m in maps.values():
            m.close()
    log(f"{record.iface}: policy '{policy.name}' applied in place "
        f"(generation {new}, no reload) in {time.monotonic() - t0:.2f}s")
    return rec


def prev_dir(directory: Path) -> Path:
    """Where the program replaced by a reload stays, for rollback."""
    return directory.with_name(directory.name + "@prev")


def _load_and_attach(policy, tables, site: Site, fill: Fill, mode, log) -> pins.Record:
    t0 = time.monotonic()
    directory, record, shape = site.directory, site.record, fill.shape
    stage = pins.STAGE / str(os.getpid())
    pins.remove_dir(stage)
    stage.mkdir(parents=True)
    try:
        kept = set()
        if directory.is_dir():
            # Same map objects for state that must survive: bans, buckets,
            # counters (also when the record is gone: not --force's loss).
            for name in PERSISTENT_MAPS:
                if (directory / name).exists():
                    with bpfsys.closing_fd(bpfsys.obj_get(str(directory / name))) as fd:
                        # An older xdpguard's seen filter (one word per
                        # 64 bits, no epochs): bcc would take the pin as it
                        # is and the program find no second word of a pair.
                        if name == "seen" and bpfsys.map_info(fd)["max_entries"] != C.XG_SEEN_WORDS:
                            continue
                        bpfsys.obj_pin(fd, str(stage / name))
                    kept.add(name)
        b, fn = compile_program(shape, stage=os.getpid())
        names = shape.map_names()
        maps = bcc_maps(b, names)
        if "sbuckets" in kept and "seen" not in kept:
            fill_seen(maps["seen"], shape.seen_epoch_log2)
        # Not pinned by bcc: the ring buffer, its format map, the arrays
        # of tries (bcc pins no array of maps), and the SYN cookie path's
        # program array (the kernel empties one no pin or fd holds).
        for extra in ("droplog", "logfmt", "lpm4", "lpm6") + (("cookieprog",) if shape.syncookies else ()):
            bpfsys.obj_pin(b[extra.encode()].map_fd, str(stage / extra))
        zero_slots(maps, fill.fresh)
        write_gen(maps, tables, 0, shape, fill.slots, fill.sources)
        set_active(maps, 0)
        prog_id = bpfsys.prog_info(fn.fd)["id"]
        attached = _attach(fn.fd, site, mode)
        killpoint.step("reload-attached")
        rec = _record(policy, tables, fill, netns=site.netns, iface=site.iface,
                      ifindex=site.ifindex, mode=attached, prog_id=prog_id,
                      types=bcc_types(b, names + ("logfmt",)))
        rec.generation = 0
        _follow(rec, record, record.as_previous("dir") if site.ours else None, fill.back)
        meta = pins.create_meta(rec)
        try:
            bpfsys.obj_pin(meta, str(stage / "meta"))
        finally:
            os.close(meta)
        bpfsys.obj_pin(fn.fd, str(stage / "prog"))
        if directory.exists():
            pins.exchange(stage, directory)
            killpoint.step("reload-exchanged")
            if site.ours:
                # The replaced program and its maps stay for rollback (not
                # after a rollback: it went forward from them).
                pins.remove_dir(prev_dir(directory))
                if not fill.back:
                    os.rename(stage, prev_dir(directory))
        else:
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage, directory)
    finally:
        pins.remove_dir(stage)
        pins.prune()
    b.cleanup()
    verb = "replaced the running program" if site.ours else "attached"
    log(f"{site.iface}: policy '{policy.name}' {verb} ({attached} mode, program id {prog_id}) "
        f"in {time.monotonic() - t0:.2f}s")
    return rec


def _attach(prog_fd, site: Site, mode) -> str:
    ifindex, q = site.ifindex, site.attached
    with in_netns(site.netns):
        if site.ours:
            # Atomic swap, and only if our old program is still the one attached.
            cur = site.record.mode
            with bpfsys.closing_fd(_prog_fd(site.record)) as old:
                bpfsys.xdp_attach(ifindex, prog_fd, MODES[cur], old_prog_fd=old)
            return cur
        if q["prog_id"]:
            # --force over a foreign program: replace that exact program.
            cur = _mode_of(q)
            with bpfsys.closing_fd(bpfsys.prog_get_fd_by_id(q["prog_id"])) as old:
                bpfsys.xdp_attach(ifindex, prog_fd, MODES[cur], old_prog_fd=old)
            return cur
        order = ["native", "generic"] if mode == "auto" else [mode]
        last = None
        for m in order:
            try:
                bpfsys.xdp_attach(ifindex, prog_fd, MODES[m] | bpfsys.XDP_FLAGS_UPDATE_IF_NOEXIST)
                return m
            except OSError as e:
                last = e
        raise LoadError(f"{site.iface}: cannot attach in {' or '.join(order)} mode: {last}")


def _mode_of(q: dict) -> str:
    return {"native": "native", "generic": "generic"}.get(q["attach_mode"], "native")


def detach(iface: str, netns: str | None = None, log=print) -> None:
    pins.ensure_bpffs()
    with pins.locked():
        directory = pins.iface_dir(netns, iface)
        try:
            record = pins.read_record(directory)
        except pins.PinError as e:
            # A record replaced or unreadable: the pins and our program
            # still go (by the program's name), the rest is reported.
            log(f"warning: {e}")
            record = None
        if record is None and not directory.is_dir():
            raise UsageError(f"{iface}: xdpguard is not applied here (no pins in {directory})")
        # A namespace deleted under the pins took the interface and the
        # program's attachment with it: what is left is the pins and the
        # state kept for it (bans.json, watch.json), which nothing will use.
        gone = not netns_exists(netns)
        try:
            ifindex = None if gone else ifindex_of(iface, netns)
        except UsageError:
            ifindex = None   # interface gone: only the pins are left to remove
        if ifindex is not None:
            with in_netns(netns):
                q = bpfsys.xdp_query(ifindex)
                if q["prog_id"] and (q["prog_id"] == (record and record.prog_id)
                                     or is_xdpguard(q["prog_id"])):
                    with bpfsys.closing_fd(bpfsys.prog_get_fd_by_id(q["prog_id"])) as old:
                        bpfsys.xdp_detach(ifindex, MODES[_mode_of(q)], old_prog_fd=old)
        if record and record.syncookies and not gone:
            _cookies_off(netns, directory, record.syncookies)
        pins.remove_dir(directory)
        pins.remove_dir(prev_dir(directory))
        pins.prune()
        if gone:
            state = bans.remove_state(netns or "host", iface)
    if gone:
        log(f"{iface}: network namespace '{netns}' is gone; pins and state ({state}) removed")
    else:
        log(f"{iface}: detached; pins removed")


def rollback(iface: str, netns: str | None = None, log=print,
             expect_token: float | None = None) -> pins.Record:
    """Go back one step in the record's history, keeping bans and counters:
    to the policy applied before the running one; a second rollback goes
    to the one before that, never forward again. At once (atomically) when
    the program still holds it (the other generation, the @prev pins),
    else compiled again from its kept copy (history.py). expect_token:
    only if the running policy is still the one applied at that time (used
    by `apply --confirm`)."""
    with pins.locked():
        directory = pins.iface_dir(netns, iface)
        record = pins.read_record(directory)
        if record is None:
            raise UsageError(f"{iface}: xdpguard is not applied here")
        if expect_token is not None and (record.policy.applied_at != expect_token
                                         or record.confirm is None):
            raise UsageError(f"{iface}: confirmed or changed since; not rolling back")
        prev = record.previous
        # Records of versions before the history name only `previous`.
        target = record.history[0] if record.history else prev.record.policy if prev else None
        if target is None:
            raise UsageError(f"{iface}: no earlier policy to go back to (the history is in "
                             f"'xdpguard status')")
        back = None
        if prev is not None and prev.record.policy == target:
            back = _rollback_held(iface, netns, directory, record)
            if back is not None:
                try:
                    history.prune(netns, iface, back)
                except OSError as e:
                    log(f"warning: {iface}: old policy copies not removed: {e}")
        if back is None:
            from xdpguard.compiler import compile_policy
            policy = history.load_kept(netns, iface, target)
            back = apply(policy, compile_policy(policy), iface, netns, log=log, back=True)
    log(f"{iface}: rolled back to policy '{back.policy.name}'")
    return back


def _rollback_held(iface, netns, directory, record: pins.Record) -> pins.Record | None:
    """rollback to record.previous where the program holds it: the record
    that then runs, or None when that generation is no longer whole (an
    apply that failed while writing it). Hold the pin lock."""
    prev = record.previous
    maps = None
    if prev.kind == "gen":
        maps = _open_maps(directory, record, ("active", "gens"))
        settle(maps, record)
        if prev.gen not in (0, 1) or prev.gen == read_active(maps):
            for m in maps.values():
                m.close()
            return None
    elif pins.read_record(prev_dir(directory)) is None:
        return None
    rest = list(record.history[1:])
    try:
        # The previous policy's syncookies table and sysctls, back before
        # its program answers a SYN (a re-apply without them removed them).
        want = prev.record.syncookies
        cookies = want and syncookies.install(netns, iface, record.ifindex, want.ports, record.syncookies,
                                              _netns_cookies(netns, directory), want.auto)
        if maps is not None:
            # Record, then flip (as apply in place).
            back = pins.modify_record(directory, lambda cur: replace(
                prev.record, types=cur.types, previous=None, history=rest,
                policy=replace(prev.record.policy, applied_at=time.time()), syncookies=cookies,
                generation=prev.gen))
            killpoint.step("rollback-record")
            set_active(maps, prev.gen)
        else:
            pdir = prev_dir(directory)
            ifindex = ifindex_of(iface, netns)
            with in_netns(netns):
                # Already attached: a rollback killed before it swapped the pins.
                if bpfsys.xdp_query(ifindex)["prog_id"] != pins.read_record(pdir).prog_id:
                    with bpfsys.closing_fd(bpfsys.obj_get(str(pdir / "prog"))) as new_fd, \
                            bpfsys.closing_fd(_prog_fd(record)) as old_fd:
                        bpfsys.xdp_attach(ifindex, new_fd, MODES[record.mode], old_prog_fd=old_fd)
            killpoint.step("rollback-attached")
            back = pins.modify_record(pdir, lambda b: replace(
                b, mode=record.mode, previous=None, history=rest, confirm=None,
                policy=replace(b.policy, applied_at=time.time()), syncookies=cookies))
            pins.exchange(pdir, directory)
            # What ran until now is no rollback target: gone forward from.
            pins.remove_dir(pdir)
    finally:
        for m in (maps or {}).values():
            m.close()
    if record.syncookies and not cookies:
        _cookies_off(netns, directory, record.syncookies)
    return back


# ---------------------------------------------------------------- test rig

_KEY0 = bytes(4)


class TestRig:
    """The real program, loaded but not attached, for BPF_PROG_TEST_RUN."""

    __test__ = False   # not a pytest class

    def __init__(self, tables: Tables, shape: Shape | None = None):
        self.shape = shape or Shape.for_tables(tables)
        self.b, self.fn = compile_program(self.shape, test=True)
        self.maps = bcc_maps(self.b, self.shape.map_names(test=True))
        self.gen = 0
        self.slots = {}
        self.load(tables)

    def load(self, tables: Tables) -> None:
        """Put a policy in (in place, like a re-apply)."""
        sizes = plan.measure(tables)
        if not self.shape.fits(tables, sizes):
            raise LoadError("policy does not fit the loaded program")
        new = 1 - self.gen if self.slots else 0
        self.slots, fresh = assign_slots(tables, self.slots)
        zero_slots(self.maps, fresh)
        write_gen(self.maps, tables, new, self.shape, self.slots,
                  plan.build(tables, self.shape.dir_nodes, self.slots, sizes))
        set_active(self.maps, new)
        self.gen = new
        self.tables = tables
        self.by_slot = {s: n for n, s in self.slots.items()}

    def counter(self, slot: int) -> dict:
        vals = self.maps["counters"].lookup(ctypes.c_uint32(slot))
        return {f: sum(getattr(v, f) for v in vals) for f in ("packets", "bytes", "dropped_packets", "dropped_bytes")}

    @cached_property
    def _debug(self):
        """The debug map's fd and type, and the record a run starts from."""
        dbg = self.maps["debug"]
        return dbg.fd, dbg.Leaf, bytes(dbg.Leaf(slot=C.XG_NO_SLOT, rule=C.XG_NO_RULE))

    def run(self, frame: bytes, repeat: int = 1) -> Outcome:
        """Run one frame (repeat times): the program's outcome, from its
        return value and debug record, with the lane and the kernel's
        average duration."""
        fd, leaf, empty = self._debug
        bpfsys.map_update(fd, _KEY0, empty)
        retval, duration, _ = bpfsys.prog_test_run(self.fn.fd, frame, repeat=repeat, data_out_size=0)
        d = leaf.from_buffer_copy(bpfsys.map_lookup(fd, _KEY0, ctypes.sizeof(leaf)))
        return kernel_outcome(self.tables, retval, d.slot, d.rule, fast=bool(d.fast), duration_ns=duration)

    def close(self) -> None:
        self.b.cleanup()
