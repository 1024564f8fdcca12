"""The source tables (map srctab: per family a 16-8-8-... multibit trie of
arrays, with the classifier trie behind it) give exactly the trie's
answer: in Python for random nested prefixes, IPv4 and IPv6, and every
table size down to one that overflows at every level, and in the real
program against the Python lookup, in both generations."""
import ipaddress
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testrun import make_rig
from xdpguard import compiler, loader, lookup, packet, plan, policy
from xdpguard.layout import C

ROOT = C.XG_DIR_ROOT_NODES
BITS = {4: 32, 6: 128}
# Lengths that reach every level of a table, and past an IPv6 table (/64).
PLENS = {4: [0, 8, 12, 16, 17, 20, 23, 24, 24, 25, 28, 30, 32, 32, 32],
         6: [0, 12, 16, 19, 24, 29, 32, 32, 40, 44, 48, 48, 56, 60, 64, 64, 65, 96, 127, 128]}


def _prefixes(rng, family, n):
    bits = BITS[family]
    out = []
    base = [rng.randrange(1 << bits) for _ in range(6)]    # clustered, so prefixes nest
    spread = [8, 12, 20, 32] if family == 4 else [8, 24, 48, 80, 100, 128]
    for _ in range(n):
        plen = rng.choice(PLENS[family])
        a = rng.choice(base) ^ rng.randrange(1 << rng.choice(spread))
        out.append((a & ~((1 << (bits - plen)) - 1) if plen else 0, plen))
    return out


def _text(family, a, p):
    return f"{ipaddress.IPv6Address(a) if family == 6 else ipaddress.IPv4Address(a)}/{p}"


def _policy(rng, family=4, nrules=40, per_rule=30, default="deny"):
    pfx = _prefixes(rng, family, nrules * per_rule)
    text = f'[policy]\ndefault = "{default}"\n'
    for i in range(nrules):
        srcs = ", ".join(f'"{_text(family, a, p)}"' for a, p in pfx[i * per_rule:(i + 1) * per_rule] if p)
        act = rng.choice(["allow", "deny"])
        text += f'[[rule]]\nname = "r{i}"\nsrc = [{srcs}]\nproto = "udp"\naction = "{act}"\n'
    return compiler.compile_policy(policy.load("srctab.toml", text=text)), pfx


def _addresses(rng, family, pfx, n):
    top = 1 << BITS[family]
    out = []
    for a, p in pfx:
        size = 1 << (BITS[family] - p)
        out += [a, a + rng.randrange(size), (a - 1) % top, (a + size) % top]
    rng.shuffle(out)
    return out[:n]


def _walk(family, table, trie, addr):
    """The program's lookup (bpf/xdpguard.c xg_srctab + the trie behind it)."""
    bits = BITS[family]
    b = addr.to_bytes(bits // 8, "big")
    e = table[b[0] * 256 + b[1]]
    nbytes = C.XG_DIR_V4_BYTES if family == 4 else C.XG_DIR_V6_BYTES
    for byte in b[2:nbytes]:
        if not e & C.XG_DIR_NODE:
            break
        e = table[256 * (e & (C.XG_DIR_NODE - 1)) + byte]
    if e & C.XG_DIR_NODE or e == C.XG_DIR_TRIE:
        best = None
        for dim, value, plen, vec in trie:
            if dim != C.XG_DIM_SRC or (plen and addr >> (bits - plen) != value >> (bits - plen)):
                continue
            if best is None or plen > best[0]:
                best = (plen, vec)
        return best[1]
    return e


@pytest.mark.parametrize("family", [4, 6])
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32), spare=st.integers(0, 120))
def test_table_and_trie_agree_with_lookup(family, seed, spare):
    rng = random.Random(seed)
    t, pfx = _policy(rng, family, nrules=6, per_rule=25)
    need = plan.measure(t).nodes_needed(family)
    nodes = ROOT + min(spare, need - ROOT)        # from no node at all to every node
    table, trie = plan.source_table(t, family, nodes)
    assert len(table) == 256 * nodes
    if family == 6:
        assert trie == t.lpm[6]                  # every entry, whatever the table holds
    elif nodes == need:
        assert not [e for e in trie if e[0] == C.XG_DIM_SRC]
    for a in _addresses(rng, family, pfx, 300):
        want = lookup._lpm(t, family, C.XG_DIM_SRC, a)
        assert t.vecs[_walk(family, table, trie, a)] == want, (_text(family, a, BITS[family]), nodes)


@pytest.mark.parametrize("family", [4, 6])
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32), spare=st.integers(0, 120))
def test_table_with_verdict_codes_agrees_with_lookup(family, seed, spare):
    """With codes (what the loader writes), an entry is the verdict the
    vector would have given (XG_DIR_FAST) or that vector; the trie behind
    an overflowed slot still gets a vector that decides alike."""
    rng = random.Random(seed)
    t, pfx = _policy(rng, family, nrules=6, per_rule=25)
    slots, _ = loader.assign_slots(t, None)
    need = plan.measure(t).nodes_needed(family)
    nodes = ROOT + min(spare, need - ROOT)
    table, trie = plan.source_table(t, family, nodes, plan.codes(t, slots))
    plain_table, plain_trie = plan.source_table(t, family, nodes)
    assert len(trie) == len(plain_trie)
    universal = t.universal
    for a in _addresses(rng, family, pfx, 300):
        want = lookup._lpm(t, family, C.XG_DIM_SRC, a)
        e = _walk(family, table, trie, a)
        if e & C.XG_DIR_FAST:
            d = compiler.decides(want, universal)
            r = t.rules[d - 1]
            assert d and (e >> C.XG_DIR_RULE_SHIFT) & C.XG_DIR_RULE_MASK == d - 1
            assert e & C.XG_DIR_SLOT_MASK == slots[r.name]
            assert bool(e & C.XG_DIR_DROP) == (r.action != C.XG_ACT_ALLOW)
        else:
            got = t.vecs[e]
            assert got == want or compiler.decides(got, universal) == compiler.decides(want, universal) != 0


def test_verdict_codes():
    text = """
[[rule]]
name = "deny"
src = ["10.0.0.0/8", "2001:db8::/32"]
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
    codes = plan.codes(t, slots)
    table, _ = plan.source_table(t, 4, ROOT, codes)
    F, D, S = C.XG_DIR_FAST, C.XG_DIR_DROP, C.XG_DIR_RULE_SHIFT
    assert table[10 * 256] == F | D | (0 << S) | 100
    assert table[11 * 256] == F | (1 << S) | 101
    for first in (12, 13, 14, 15):        # logs, limits, needs the port; no rule
        e = table[first * 256]
        assert not e & F and e < len(t.vecs)
    # IPv6: 2001:db8::/32 needs nodes below 2001::/16 and 2001:d00::/24;
    # its entry is the deny's code.
    need6 = plan.measure(t).nodes_needed(6)
    assert need6 == ROOT + 2
    table6, trie6 = plan.source_table(t, 6, need6, codes)
    e = table6[0x2001]
    assert e & C.XG_DIR_NODE
    e = table6[256 * (e & (C.XG_DIR_NODE - 1)) + 0x0d]
    assert e & C.XG_DIR_NODE
    assert table6[256 * (e & (C.XG_DIR_NODE - 1)) + 0xb8] == F | D | (0 << S) | 100
    assert trie6 == t.lpm[6]                 # the IPv6 trie keeps every entry (ND needs them)


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
    assert plan.measure(t).nodes_needed(4) == ROOT + 2          # one /16 node, one /24 node
    table, trie4 = plan.source_table(t, 4, ROOT + 2)
    e = table[10 * 256 + 1]
    assert e & C.XG_DIR_NODE
    n16 = e & (C.XG_DIR_NODE - 1)
    assert t.vecs[table[256 * n16 + 7]] & 1                  # 10.1.7.0/24: net
    n24 = table[256 * n16 + 2] & (C.XG_DIR_NODE - 1)
    assert t.vecs[table[256 * n24 + 3]] & 2                  # 10.1.2.3: host
    assert t.vecs[table[256 * n24 + 4]] == t.vecs[table[256 * n16 + 7]]
    assert trie4 == []
    # One node short: the /24 goes to the trie, with its own vector.
    table, trie4 = plan.source_table(t, 4, ROOT + 1)
    assert table[256 * n16 + 2] == C.XG_DIR_TRIE
    assert sorted((p, v) for _d, v, p, _vec in trie4) == [(24, (10 << 24) | (1 << 16) | (2 << 8)),
                                                          (32, (10 << 24) | (1 << 16) | (2 << 8) | 3)]


def test_ipv6_prefixes_past_the_table_go_to_the_trie():
    """An IPv6 table resolves the first 64 bits: a /128 inside a /48 makes
    nodes down to its /56 and leaves its /64 slot to the trie (which holds
    every IPv6 entry), so the rest of the /48 never walks the trie."""
    text = """
[[rule]]
name = "host"
src = "2001:db8:1:2::5/128"
action = "allow"
[[rule]]
name = "net"
src = "2001:db8:1::/48"
action = "deny"
"""
    t = compiler.compile_policy(policy.load("x6.toml", text=text))
    assert plan.measure(t).nodes_needed(6) == ROOT + 6          # one node below each of /16 ... /56
    table, trie6 = plan.source_table(t, 6, ROOT + 6)
    host = int(ipaddress.IPv6Address("2001:db8:1:2::5"))
    n56 = table[256 * (table[0x2001] & (C.XG_DIR_NODE - 1)) + 0x0d]
    for byte in (0xb8, 0x00, 0x01, 0x00):                  # down to the /56 node
        n56 = table[256 * (n56 & (C.XG_DIR_NODE - 1)) + byte]
    assert table[256 * (n56 & (C.XG_DIR_NODE - 1)) + 0x02] == C.XG_DIR_TRIE
    assert trie6 == t.lpm[6]
    assert t.vecs[_walk(6, table, trie6, host)] & 1
    assert t.vecs[_walk(6, table, trie6, host + 1)] == t.vecs[_walk(6, table, trie6, host + (1 << 64))]
    assert t.vecs[_walk(6, table, trie6, host + (1 << 64))] & 2


def test_table_size_follows_the_policy():
    small = loader.Shape.for_tables(compiler.compile_policy(policy.load(
        "s.toml", text='[[rule]]\nname = "a"\nsrc = "10.0.0.0/8"\naction = "deny"\n')))
    assert (small.dir4_nodes, small.dir6_nodes) == (512, 512)   # the roots, doubled for headroom
    assert "-DXG_DIR4_NODES=512" in small.cflags() and "-DXG_DIR6_NODES=512" in small.cflags()


@pytest.mark.kernel
@pytest.mark.parametrize("family", [4, 6])
def test_program_agrees_with_lookup_in_both_generations(monkeypatch, family):
    """Tables that overflow into the trie at every level: the largest size
    is made small here, so the program meets every kind of entry."""
    rng = random.Random(24 + family)
    t1, p1 = _policy(rng, family)
    t2, p2 = _policy(rng, family, default="allow")
    cap = ROOT + 60
    monkeypatch.setattr(C, "XG_DIR_MAX_NODES", cap)
    for t in (t1, t2):
        assert plan.measure(t).nodes_needed(family) > cap
        assert [e for e in plan.source_table(t, family, cap)[1] if e[0] == C.XG_DIM_SRC]
    shape = loader.Shape(nwords=2, vec_per_gen=8192,
                         dir4_nodes=cap, dir6_nodes=cap)
    dst = "10.9.9.9" if family == 4 else "2001:db8:ffff::9"
    rig = make_rig(t1, shape)
    try:
        for tables, pfx in ((t1, p1), (t2, p2)):
            if tables is not t1:
                rig.load(tables)       # the other generation
            for a in _addresses(rng, family, pfx, 3000):
                src = _text(family, a, BITS[family]).split("/")[0]
                frame = packet.from_fields({"src": src, "dst": dst, "proto": "udp"})
                pk = packet.parse(frame)
                want = lookup.decide(tables, family, a, int(pk.dst), pk.l4, pk.sport, pk.dport)
                got = rig.run(frame)
                assert got.rule == want.rule, (src, got, want)
    finally:
        rig.close()


def test_ipv6_entries_carry_codes_though_rules_match_nd():
    """A rule naming icmpv6 (which matches ND) for every source does not
    keep IPv6 sources from verdict codes: ND packets look the trie up."""
    text = """
[[rule]]
name = "block"
src = ["2001:db8:1::/48", "10.0.0.0/8"]
action = "deny"
[[rule]]
name = "allow-icmp"
proto = ["icmp", "icmpv6"]
action = "allow"
"""
    t = compiler.compile_policy(policy.load("nd.toml", text=text))
    slots = {"block": 100, "allow-icmp": 101}
    codes = plan.codes(t, slots)
    table, trie = plan.source_table(t, 6, plan.measure(t).nodes_needed(6), codes)
    v1 = int(ipaddress.IPv6Address("2001:db8:1::1"))
    assert _walk(6, table, trie, v1) == C.XG_DIR_FAST | C.XG_DIR_DROP | 100
    d = lookup.decide(t, 6, v1, int(ipaddress.IPv6Address("2001:db8:9::1")), C.XG_L4_ND, None, None)
    assert d.rule == "allow-icmp"
