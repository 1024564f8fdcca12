"""The /24 direct source table (large policies) gives exactly the trie's
answer: the real program with XG_DIR24 against the Python lookup, for
nested prefixes of every length around /24, in both generations."""
import random

import pytest

from xdpguard import compiler, layout, loader, lookup, packet, policy
from xdpguard.layout import C

pytestmark = pytest.mark.kernel


def _policy(rng, default, flip=False):
    pfx = []
    for _ in range(2400):
        plen = rng.choice([0, 8, 12, 16, 20, 22, 23, 24, 24, 24, 25, 28, 30, 32, 32])
        a = rng.randrange(1 << 32) & ~((1 << (32 - plen)) - 1) if plen else 0
        pfx.append((a, plen))
    text = f'[policy]\ndefault = "{default}"\n'
    for i in range(80):
        srcs = ", ".join(f'"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/{p}"'
                         for a, p in pfx[i * 30:(i + 1) * 30] if p)
        act = rng.choice(["allow", "deny"]) if not flip else rng.choice(["deny", "allow"])
        text += f'[[rule]]\nname = "r{i}"\nsrc = [{srcs}]\nproto = "udp"\naction = "{act}"\n'
    return compiler.compile_policy(policy.load("dir24.toml", text=text)), pfx


def _addresses(rng, pfx):
    out = []
    for a, p in pfx:
        size = 1 << (32 - p)
        out += [a, a + rng.randrange(size), (a - 1) % (1 << 32), (a + size) % (1 << 32)]
    return out


def test_dir24_table_agrees_with_lookup():
    rng = random.Random(24)
    t1, p1 = _policy(rng, "deny")
    shape = loader.Shape(nwords=2, vec_per_gen=8192, lpm4_max=16384, lpm6_max=4096, dir24=True)
    rig = loader.TestRig(t1, shape)
    try:
        for tables, pfx in ((t1, p1), _policy(rng, "allow", flip=True)):
            if tables is not t1:
                rig.load(tables)       # the other generation
            checked = 0
            for a in _addresses(rng, pfx)[:4000]:
                src = f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
                frame = packet.from_fields({"src": src, "proto": "udp"})
                pk = packet.parse(frame)
                want = lookup.decide(tables, 4, a, int(pk.dst), pk.l4, pk.sport, pk.dport)
                got = rig.run(frame)
                name = None if got["rule"] is None else tables.rules[got["rule"]].name
                assert name == want.rule, (src, name, want)
                checked += 1
            assert checked == 4000
    finally:
        rig.close()


def test_dir24_marks_longer_prefixes_for_the_trie():
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
    table = layout.dir24_table(t)
    net = t.vecs[table[(10 << 16) | (1 << 8) | 7]]
    assert net & 1 and not net & 2
    assert table[(10 << 16) | (1 << 8) | 2] == C.XG_DIR24_TRIE
    assert t.vecs[table[(11 << 16)]] == t.vecs[table[0]]


def test_large_policies_get_the_table():
    small = loader.Shape.for_tables(compiler.compile_policy(policy.load(
        "s.toml", text='[[rule]]\nname = "a"\nsrc = "10.0.0.0/8"\naction = "deny"\n')))
    assert not small.dir24
    assert "-DXG_DIR24=1" not in small.cflags()
