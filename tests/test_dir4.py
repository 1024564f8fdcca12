"""The IPv4 source table (map dir4: a 16-8-8 multibit trie of arrays with
the classifier trie behind it) gives exactly the trie's answer: in Python
for random nested prefixes and every table size down to one that
overflows at both levels, and in the real program against the Python
lookup, in both generations."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpguard import compiler, layout, loader, lookup, packet, policy
from xdpguard.layout import C

ROOT = C.XG_DIR_ROOT_NODES


def _prefixes(rng, n):
    out = []
    base = [rng.randrange(1 << 32) for _ in range(6)]    # clustered, so prefixes nest
    for _ in range(n):
        plen = rng.choice([0, 8, 12, 16, 17, 20, 23, 24, 24, 25, 28, 30, 32, 32, 32])
        a = rng.choice(base) ^ rng.randrange(1 << rng.choice([8, 12, 20, 32]))
        out.append((a & ~((1 << (32 - plen)) - 1) if plen else 0, plen))
    return out


def _text(a, p):
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/{p}"


def _policy(rng, nrules=40, per_rule=30, default="deny"):
    pfx = _prefixes(rng, nrules * per_rule)
    text = f'[policy]\ndefault = "{default}"\n'
    for i in range(nrules):
        srcs = ", ".join(f'"{_text(a, p)}"' for a, p in pfx[i * per_rule:(i + 1) * per_rule] if p)
        act = rng.choice(["allow", "deny"])
        text += f'[[rule]]\nname = "r{i}"\nsrc = [{srcs}]\nproto = "udp"\naction = "{act}"\n'
    return compiler.compile_policy(policy.load("dir4.toml", text=text)), pfx


def _addresses(rng, pfx, n):
    out = []
    for a, p in pfx:
        size = 1 << (32 - p)
        out += [a, a + rng.randrange(size), (a - 1) % (1 << 32), (a + size) % (1 << 32)]
    rng.shuffle(out)
    return out[:n]


def _walk(table, trie4, addr):
    """The program's lookup (bpf/xdpguard.c xg_dir4 + the trie behind it)."""
    b = addr.to_bytes(4, "big")
    e = table[b[0] * 256 + b[1]]
    for byte in (b[2], b[3]):
        if not e & C.XG_DIR_NODE:
            break
        e = table[256 * (e & (C.XG_DIR_NODE - 1)) + byte]
    if e & C.XG_DIR_NODE or e == C.XG_DIR_TRIE:
        best = None
        for dim, value, plen, vec in trie4:
            if dim != C.XG_DIM_SRC or (plen and addr >> (32 - plen) != value >> (32 - plen)):
                continue
            if best is None or plen > best[0]:
                best = (plen, vec)
        return best[1]
    return e


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32), spare=st.integers(0, 60))
def test_table_and_trie_agree_with_lookup(seed, spare):
    rng = random.Random(seed)
    t, pfx = _policy(rng, nrules=6, per_rule=25)
    need = layout.dir4_nodes_needed(t)
    nodes = ROOT + min(spare, need - ROOT)        # from no node at all to every node
    table, trie4 = layout.dir4_plan(t, nodes)
    assert len(table) == 256 * nodes
    if nodes == need:
        assert not [e for e in trie4 if e[0] == C.XG_DIM_SRC]
    for a in _addresses(rng, pfx, 300):
        want = lookup._lpm(t, 4, C.XG_DIM_SRC, a)
        assert t.vecs[_walk(table, trie4, a)] == want, (_text(a, 32), nodes)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32), spare=st.integers(0, 60))
def test_table_with_verdict_codes_agrees_with_lookup(seed, spare):
    """With codes (what the loader writes), an entry is the verdict the
    vector would have given (XG_DIR_FAST) or that vector; the trie behind
    an overflowed slot still gets a vector that decides alike."""
    rng = random.Random(seed)
    t, pfx = _policy(rng, nrules=6, per_rule=25)
    slots, _ = loader.assign_slots(t, None)
    need = layout.dir4_nodes_needed(t)
    nodes = ROOT + min(spare, need - ROOT)
    table, trie4 = layout.dir4_plan(t, nodes, layout.dir4_codes(t, slots))
    plain_table, plain_trie4 = layout.dir4_plan(t, nodes)
    assert len(trie4) == len(plain_trie4)
    universal = layout.universal_rules(t)
    for a in _addresses(rng, pfx, 300):
        want = lookup._lpm(t, 4, C.XG_DIM_SRC, a)
        e = _walk(table, trie4, a)
        if e & C.XG_DIR_FAST:
            d = layout.decides(want, universal)
            r = t.rules[d - 1]
            assert d and (e >> C.XG_DIR_RULE_SHIFT) & C.XG_DIR_RULE_MASK == d - 1
            assert e & C.XG_DIR_SLOT_MASK == slots[r.name]
            assert bool(e & C.XG_DIR_DROP) == (r.action != C.XG_ACT_ALLOW)
        else:
            got = t.vecs[e]
            assert got == want or layout.decides(got, universal) == layout.decides(want, universal) != 0


def test_verdict_codes():
    text = """
[[rule]]
name = "deny"
src = "10.0.0.0/8"
action = "deny"
[[rule]]
name = "allow"
src = "11.0.0.0/8"
action = "allow"
[[rule]]
name = "logged"
src = "12.0.0.0/8"
action = "deny"
log = true
[[rule]]
name = "limited"
src = "13.0.0.0/8"
action = "limit"
rate = "10/s"
[[rule]]
name = "web"
src = "14.0.0.0/8"
proto = "tcp"
dport = 80
action = "deny"
"""
    t = compiler.compile_policy(policy.load("codes.toml", text=text))
    slots = {"deny": 100, "allow": 101, "logged": 102, "limited": 103, "web": 104}
    codes = layout.dir4_codes(t, slots)
    table, _ = layout.dir4_plan(t, ROOT, codes)
    F, D, S = C.XG_DIR_FAST, C.XG_DIR_DROP, C.XG_DIR_RULE_SHIFT
    assert table[10 * 256] == F | D | (0 << S) | 100
    assert table[11 * 256] == F | (1 << S) | 101
    for first in (12, 13, 14, 15):        # logs, limits, needs the port; no rule
        e = table[first * 256]
        assert not e & F and e < len(t.vecs)


def test_longer_prefixes_get_nodes_or_the_trie():
    text = """
[[rule]]
name = "net"
src = "10.1.0.0/16"
action = "deny"
[[rule]]
name = "host"
src = "10.1.2.3/32"
action = "allow"
"""
    t = compiler.compile_policy(policy.load("x.toml", text=text))
    assert layout.dir4_nodes_needed(t) == ROOT + 2          # one /16 node, one /24 node
    table, trie4 = layout.dir4_plan(t, ROOT + 2)
    e = table[10 * 256 + 1]
    assert e & C.XG_DIR_NODE
    n16 = e & (C.XG_DIR_NODE - 1)
    assert t.vecs[table[256 * n16 + 7]] & 1                  # 10.1.7.0/24: net
    n24 = table[256 * n16 + 2] & (C.XG_DIR_NODE - 1)
    assert t.vecs[table[256 * n24 + 3]] & 2                  # 10.1.2.3: host
    assert t.vecs[table[256 * n24 + 4]] == t.vecs[table[256 * n16 + 7]]
    assert trie4 == []
    # One node short: the /24 goes to the trie, with its own vector.
    table, trie4 = layout.dir4_plan(t, ROOT + 1)
    assert table[256 * n16 + 2] == C.XG_DIR_TRIE
    assert sorted((p, v) for _d, v, p, _vec in trie4) == [(24, (10 << 24) | (1 << 16) | (2 << 8)),
                                                          (32, (10 << 24) | (1 << 16) | (2 << 8) | 3)]


def test_table_size_follows_the_policy():
    small = loader.Shape.for_tables(compiler.compile_policy(policy.load(
        "s.toml", text='[[rule]]\nname = "a"\nsrc = "10.0.0.0/8"\naction = "deny"\n')))
    assert small.dir_nodes == 512                            # the root, doubled for headroom
    assert "-DXG_DIR_NODES=512" in small.cflags()


@pytest.mark.kernel
def test_program_agrees_with_lookup_in_both_generations(monkeypatch):
    """Tables that overflow into the trie at both levels: the largest size
    is made small here, so the program meets every kind of entry."""
    rng = random.Random(24)
    t1, p1 = _policy(rng)
    t2, p2 = _policy(rng, default="allow")
    cap = ROOT + 60
    monkeypatch.setattr(C, "XG_DIR_MAX_NODES", cap)
    for t in (t1, t2):
        assert layout.dir4_nodes_needed(t) > cap
        assert [e for e in layout.dir4(t, cap)[1] if e[0] == C.XG_DIM_SRC]
    shape = loader.Shape(nwords=2, vec_per_gen=8192, lpm4_max=16384, lpm6_max=4096, dir_nodes=cap)
    rig = loader.TestRig(t1, shape)
    try:
        for tables, pfx in ((t1, p1), (t2, p2)):
            if tables is not t1:
                rig.load(tables)       # the other generation
            for a in _addresses(rng, pfx, 3000):
                frame = packet.from_fields({"src": _text(a, 32).split("/")[0], "proto": "udp"})
                pk = packet.parse(frame)
                want = lookup.decide(tables, 4, a, int(pk.dst), pk.l4, pk.sport, pk.dport)
                got = rig.run(frame)
                name = None if got["rule"] is None else tables.rules[got["rule"]].name
                assert name == want.rule, (_text(a, 32), name, want)
    finally:
        rig.close()
