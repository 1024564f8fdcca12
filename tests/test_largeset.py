"""Large sets: the compact path (integer columns instead of an object per
prefix) gives exactly the maps the object-per-prefix code gave, on a
generated policy small enough for a unit test; map memory and progress.
Timing and peak memory of millions of prefixes: bench/largeset.py."""
from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import json
import os
import random
from array import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdpguard import layout, loader, plan
from xdpguard.compiler import LpmEntries, compile_policy
from xdpguard.layout import C
from xdpguard.policy import PrefixSet, load, parse_prefix

# sha256 of the maps' contents (see _digest) for _write_policy(seed 17),
# computed by the code before the compact representation (commit 8461bf0,
# where every prefix was a Prefix tuple and every trie entry a 4-tuple).
DIGEST_BEFORE = "0cba85cb8a3f5c3b44054441cec9c418c1ba6e7f1a9f5aff4d928dd419dc1151"


def _write_policy(d, seed: int = 17, n: int = 60_000):
    """A policy with two generated set files: plain IPv4 lines (the fast
    reader), and one with IPv6, comments, blank lines, host bits and
    duplicates (the per-line reader); prefixes nest and repeat."""
    rng = random.Random(seed)
    clusters = [rng.getrandbits(32) for _ in range(40)]
    plain = []
    for _ in range(n):
        plen = rng.choice((8, 12, 16, 20, 23, 24, 24, 25, 28, 30, 32, 32, 32, 32))
        v = (rng.choice(clusters) ^ rng.getrandbits(rng.choice((8, 16, 24, 32)))) >> (32 - plen) << (32 - plen)
        plain.append(str(ipaddress.IPv4Address(v)) + ("" if plen == 32 and rng.random() < 0.5 else f"/{plen}"))
    plain += rng.sample(plain, n // 20)                 # duplicates
    rng.shuffle(plain)
    mixed = ["# a netset header", ""]
    for i in range(n // 4):
        r = rng.random()
        if r < 0.3:
            plen = rng.choice((32, 40, 48, 56, 64, 65, 96, 128))
            v = (0x2001_0db8 << 96 | rng.getrandbits(96)) >> (128 - plen) << (128 - plen)
            mixed.append(f"{ipaddress.IPv6Address(v)}/{plen}")
        elif r < 0.35:
            mixed.append(f"{ipaddress.IPv4Address(rng.getrandbits(32))}/24  # host bits")
        else:
            mixed.append(rng.choice(plain) + (" # listed twice" if i % 7 == 0 else ""))
    (d / "plain.netset").write_text("\n".join(plain) + "\n")
    (d / "mixed.netset").write_text("\n".join(mixed) + "\n")
    p = d / "large.toml"
    p.write_text("""[policy]
default = "allow"
[sets]
plain = { file = "plain.netset" }
mixed = { file = "mixed.netset" }
admin = ["192.0.2.0/24", "2001:db8:a::/48", "10.1.2.3"]
sites = ["198.51.100.0/24", "2001:db8:5::/48"]

[[rule]]
name = "admin"
src = "@admin"
proto = "tcp"
dport = 22
action = "allow"

[[rule]]
name = "plain"
src = "@plain"
action = "deny"

[[rule]]
name = "mixed"
src = ["@mixed", "203.0.113.0/24", "@admin"]
proto = ["tcp", "udp"]
action = "deny"

[[rule]]
name = "sites"
src = "@plain"
dst = "@sites"
proto = "tcp"
dport = [80, 443]
action = "limit"
rate = "100/s"
""")
    return p


def _digest(tables, plans) -> str:
    """sha256 of what the loader writes: every trie entry of the compiler
    and of the plans, the source tables, vectors and what they decide."""
    h = hashlib.sha256()
    for fam in (4, 6):
        for e in tables.lpm[fam]:
            h.update(repr(tuple(e)).encode())
        h.update(b"|")
        for sources in plans:
            for e in sources.trie[fam]:
                h.update(repr(tuple(e)).encode())
            h.update(b"|")
            h.update(sources.table[fam].tobytes())
    h.update(repr(list(tables.vecs)).encode())
    h.update(repr(list(tables.decides)).encode())
    for dim in sorted(tables.ports):
        h.update(tables.ports[dim].tobytes())
    return h.hexdigest()


def compiled(d):
    """The policy, its tables, and two plans: the loader's, and one whose
    IPv4 table runs out of nodes (most prefixes go to the trie)."""
    policy = load(_write_policy(d))
    tables = compile_policy(policy)
    slots, _ = loader.assign_slots(tables, None)
    shape = loader.Shape.for_tables(tables)
    small = {4: C.XG_DIR_ROOT_NODES + 40, 6: C.XG_DIR_ROOT_NODES + 8}
    return policy, tables, [plan.build(tables, shape.dir_nodes, slots), plan.build(tables, small, slots)]


def test_maps_identical_to_before(tmp_path):
    _policy, tables, plans = compiled(tmp_path)
    assert len(plans[1].trie[4]) > 10_000          # the overflow path ran
    assert _digest(tables, plans) == DIGEST_BEFORE


def test_compact_path_equals_object_path(tmp_path):
    """The same rules with their prefixes as plain tuples of Prefix (the
    compiler's generic path) compile to the same tables."""
    from dataclasses import replace
    policy, tables, _ = compiled(tmp_path)
    rules = [replace(r, src=None if r.src is None else tuple(r.src),
                     dst=None if r.dst is None else tuple(r.dst)) for r in policy.rules]
    other = compile_policy(replace(policy, rules=rules))
    assert other.vecs == tables.vecs
    for fam in (4, 6):
        assert other.lpm[fam] == tables.lpm[fam]
        assert list(other.lpm[fam]) == list(tables.lpm[fam])


# ---------------------------------------------------------------- PrefixSet and its keys

@given(st.lists(st.integers(0, (1 << 40) - 1), max_size=3000), st.integers(1, 64))
def test_sorted_unique_is_sorted_set(keys, run):
    import xdpguard.policy as P
    saved = P._RUN
    P._RUN = run                    # many runs and buckets on small input
    try:
        assert list(P.sorted_unique(array("Q", keys))) == sorted(set(keys))
    finally:
        P._RUN = saved


def test_prefix_set_is_a_sequence_of_prefixes():
    items = [parse_prefix(t)[0] for t in ("10.0.0.0/8", "2001:db8::/32", "10.0.0.0/8", "192.0.2.7", "::/0")]
    s = PrefixSet.of(items)
    want = [parse_prefix(t)[0] for t in ("10.0.0.0/8", "192.0.2.7/32", "::/0", "2001:db8::/32")]
    assert list(s) == want and len(s) == 4 and s[1] == want[1] and s[-1] == want[-1]
    assert s == tuple(want) and s == PrefixSet.of(reversed(items)) and s != PrefixSet()
    assert not PrefixSet() and PrefixSet() == ()
    assert PrefixSet.union([s, s]) is s
    u = PrefixSet.union([s, PrefixSet.of([parse_prefix("10.0.0.0/8")[0], parse_prefix("198.51.100.0/24")[0]])])
    assert [str(p) for p in u] == ["10.0.0.0/8", "192.0.2.7/32", "198.51.100.0/24", "::/0", "2001:db8::/32"]


def test_set_file_read_in_chunks(tmp_path, monkeypatch):
    """Blocks of any size give the same set and the same warnings (file
    and line) as one block: lines cut at a block's end, a BOM, CRLF."""
    import xdpguard.policy as P
    lines = ["\ufeff# header", "10.0.0.0/8", "192.0.2.7", "bogus", "2001:db8::/32", "",
             "198.51.100.9/24", "203.0.113.0/24\r", "10.1.0.0/16  # comment", "192.0.2.7"] * 3
    (tmp_path / "s.txt").write_bytes("\n".join(lines).encode())      # no newline at the end
    (tmp_path / "p.toml").write_text('[sets]\ns = { file = "s.txt" }\n'
                                     '[[rule]]\nname = "s"\nsrc = "@s"\naction = "deny"\n')
    whole = load(tmp_path / "p.toml")
    assert [str(p) for p in whole.sets["s"]] == ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.7/32",
                                                 "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]
    assert any(":4: 'bogus'" in w for w in whole.warnings) and any(":24: 'bogus'" in w for w in whole.warnings)
    for size in (1, 7, 16, 64):
        monkeypatch.setattr(P, "_CHUNK", size)
        part = load(tmp_path / "p.toml")
        assert part.sets["s"] == whole.sets["s"] and part.warnings == whole.warnings, size


def test_lpm_entries_packed_like_struct_pack():
    """The column-wise packing of trie keys and values is byte for byte
    what struct packing of each entry gives (ctypes mirror of the header's
    structs, as bcc builds them)."""
    import ctypes

    class K4(ctypes.Structure):
        _fields_ = [("prefixlen", ctypes.c_uint), ("dim", ctypes.c_ubyte), ("addr", ctypes.c_ubyte * 4)]

    class K6(ctypes.Structure):
        _fields_ = [("prefixlen", ctypes.c_uint), ("dim", ctypes.c_ubyte), ("addr", ctypes.c_ubyte * 16)]

    class V(ctypes.Structure):
        _fields_ = [("vec", ctypes.c_uint)]

    assert (ctypes.sizeof(K4), ctypes.sizeof(K6)) == (layout.sizeof("xg_lpm4_key")[0], layout.sizeof("xg_lpm6_key")[0])
    rng = random.Random(3)
    for fam, K in ((4, K4), (6, K6)):
        bits = 32 if fam == 4 else 128
        cols = LpmEntries(fam)
        for _ in range(500):
            cols.append((rng.randrange(2), rng.getrandbits(bits), rng.randrange(bits + 1), rng.getrandbits(32)))
        tmpl = type("T", (), {"Key": K, "Leaf": V})
        kst, vst = layout.struct_of(K), layout.struct_of(V)
        want_k = b"".join(kst.pack(8 + p, d, v.to_bytes(bits // 8, "big")) for d, v, p, _ in cols)
        want_v = b"".join(vst.pack(x) for *_, x in cols)
        for entries in (cols, list(cols)):
            keys, vals = layout.lpm_entries(tmpl, entries, fam)
            assert bytes(keys) == want_k and vals == want_v
        part = cols[100:200]                       # a batch of the loader's
        assert isinstance(part, LpmEntries) and part == list(cols)[100:200]


# ---------------------------------------------------------------- map memory

def test_check_prints_map_memory(tmp_path, capsys):
    from xdpguard import cli
    p = _write_policy(tmp_path, n=2000)
    assert cli.main(["check", str(p), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    policy = load(p)
    tables = compile_policy(policy)
    assert s["map_memory"] == loader.policy_map_memory(tables)
    assert s["map_memory_bytes"] == sum(s["map_memory"].values())
    assert cli.main(["check", str(p)]) == 0
    out = capsys.readouterr().out
    assert "  map memory: " in out and "classifier tries" in out and "source tables" in out


@pytest.mark.kernel
def test_map_memory_is_what_the_kernel_accounts(tmp_path):
    """The estimate, made before anything is loaded, against the memlock
    the kernel reports (fdinfo) for every map the policy fills."""
    from conftest import require_kernel
    require_kernel()
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 4):
        pytest.skip("fdinfo memlock is map_mem_usage from kernel 6.4 on")
    from xdpguard import bpfsys
    tables = compile_policy(load(_write_policy(tmp_path, n=3000)))
    rig = loader.TestRig(tables)
    try:
        shape = rig.shape
        sources = plan.build(tables, shape.dir_nodes, rig.slots)
        want = loader.map_memory(shape, sources)
        assert want["lpm4"] > 0 and want["lpm6"] > 0

        def memlock(fd):
            with open(f"/proc/self/fdinfo/{fd}") as f:
                return next(int(ln.split()[1]) for ln in f if ln.startswith("memlock:"))
        got = {n: memlock(rig.maps[n].fd) for n in ("srctab", "vecs", "rules", "ports")}
        for fam in (4, 6):
            fd = bpfsys.inner_map_fd(rig.maps[f"lpm{fam}"].fd, rig.gen)
            with bpfsys.closing_fd(fd):
                got[f"lpm{fam}"] = memlock(fd)
        for name, n in want.items():
            # arrays: plus the kernel's struct bpf_array (a page for a mmap-able one)
            assert 0 <= got[name] - n <= 4096, (name, got[name], n)
        # the structs' sizes as bcc laid them out
        for name, struct in (("lpm4_inner", "xg_lpm4_key"), ("lpm6_inner", "xg_lpm6_key")):
            assert ctypes.sizeof(rig.maps[name].Key) == layout.sizeof(struct)[0]
        for name, struct in (("vecs", "xg_vec"), ("rules", "xg_rule"), ("srctab", "xg_dirnode"), ("ports", "xg_class")):
            assert ctypes.sizeof(rig.maps[name].Leaf) == layout.sizeof(struct, XG_NWORDS=shape.nwords)[0], name
    finally:
        rig.close()


@pytest.mark.kernel
def test_apply_dry_run_reports_map_memory(tmp_path, capsys):
    """apply --dry-run prints the estimate before loading, and --json has it."""
    from conftest import require_kernel
    require_kernel()
    from testing.lab import VethPair
    from xdpguard import cli
    p = _write_policy(tmp_path, n=2000)
    want = loader.policy_map_memory(compile_policy(load(p)))
    with VethPair("xgls", split=False) as lab:
        assert cli.main(["apply", str(p), "--iface", lab.b, "--netns", lab.ns_b, "--dry-run", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["dry_run"] is True and d["map_memory"] == want
        assert d["map_memory_bytes"] == sum(want.values())
        assert cli.main(["apply", str(p), "--iface", lab.b, "--netns", lab.ns_b, "--dry-run"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == loader.describe_memory(want) and out[-2].startswith("dry run:")
        assert out[-1].startswith(f"{lab.b}: would change (dry run): rules +")     # apply's summary


# ---------------------------------------------------------------- progress

def test_progress_only_on_a_terminal_after_a_second(tmp_path, monkeypatch, capsys):
    import io
    from xdpguard import cli, progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    p = _write_policy(tmp_path, n=3000)
    # not a terminal: nothing
    assert cli.main(["check", str(p), "--json"]) == 0
    assert capsys.readouterr().err == ""
    # a terminal, every step shown at once
    monkeypatch.setattr(progress, "_DELAY", 0.0)
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert cli.main(["check", str(p), "--json"]) == 0
    err = tty.getvalue()
    assert "reading set 'plain': 100%" in err and "compiling IPv4 source prefixes: 100%" in err
    assert "planning IPv4 source table: 100%" in err
    assert json.loads(capsys.readouterr().out)["valid"] is True
    # a terminal, quick steps: nothing
    monkeypatch.setattr(progress, "_DELAY", 60.0)
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert cli.main(["check", str(p)]) == 0
    assert tty.getvalue() == ""
    progress.enable(None)
