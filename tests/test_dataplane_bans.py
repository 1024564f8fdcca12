"""Bans in the real program (ban4 / ban6 LPM maps, banstate flags): which
frames a ban drops, before which rules, its expiry and its counters; every
outcome also from the Python reference given the same bans."""
from __future__ import annotations

import ctypes
import time

import pytest
from scapy.layers.l2 import ARP

from dataplane_fixtures import ADMIN4, ADMIN6, ALLOW_POLICY, BAD4, D4, D6, E, set_ihl, tcp, udp
from testrun import Bans, ban_key, outcome, rig_fixture, run
from xdpguard import bans as xgbans, lookup
from xdpguard.layout import C
from xdpguard.packet import build

pytestmark = pytest.mark.kernel

allow_rig = rig_fixture(ALLOW_POLICY, "dp-allow.toml")


@pytest.fixture
def bans(allow_rig):
    b = Bans(allow_rig)
    yield b
    b.clear()


def judge(rig, bans, frame, repeat=1):
    """The kernel's outcome, which the reference given the bans must share."""
    got = run(rig, frame, repeat)
    assert got == lookup.verdict(frame, rig.tables, bans.entries()), frame.hex()
    return got


def test_ban_drops_source_with_ban_slot(allow_rig, bans):
    r = allow_rig
    assert judge(r, bans, tcp(ADMIN4, dport=22)) == outcome("pass", "ssh-admin")
    bans.add(ADMIN4 + "/32")
    assert judge(r, bans, tcp(ADMIN4, dport=22)) == outcome("drop", "ban")
    res = judge(r, bans, udp(ADMIN4))
    assert (res.slot, res.rule, res.reason) == (C.XG_SLOT_BAN, None, "ban")
    # Another host of the same /28 is not banned.
    assert judge(r, bans, tcp("192.0.2.6", dport=22)) == outcome("pass", "ssh-admin")
    # Malformed is decided before the ban; non-IP never reaches it.
    assert judge(r, bans, set_ihl(tcp(ADMIN4), 3)) == outcome("drop", "bad_header")
    assert judge(r, bans, tcp(ADMIN4)[:40]) == outcome("drop", "truncated")
    assert judge(r, bans, bytes(E() / ARP(psrc=ADMIN4))) == outcome("pass", "non-ip")
    # The ban beats an allow rule and ND.
    bans.add(ADMIN6 + "/128")
    assert judge(r, bans, build(ADMIN6, D6, "icmpv6", icmp_type=135)) == outcome("drop", "ban")


def test_ban_prefixes(allow_rig, bans):
    r = allow_rig
    bans.add("192.0.2.0/24")
    bans.add("2001:db8:a::/64")
    for src in ("192.0.2.0", "192.0.2.5", "192.0.2.255"):
        assert judge(r, bans, tcp(src, dport=22)) == outcome("drop", "ban")
    assert judge(r, bans, tcp("192.0.3.0", dport=22)) == outcome("drop", "ssh-deny")
    assert judge(r, bans, tcp("2001:db8:a::ffff", D6, dport=22)) == outcome("drop", "ban")
    assert judge(r, bans, tcp("2001:db8:a:1::1", D6, dport=22)) == outcome("drop", "ssh-deny")
    # Fragments and VLAN-tagged frames are banned too.
    assert judge(r, bans, tcp("192.0.2.7", fragment=(3, False), vlans=(1, 2))) == outcome("drop", "ban")


def test_banstate_flags_follow_the_tries(allow_rig, bans):
    """The program skips a ban trie while its flag is down: the flag goes up
    with the first ban of a family and down when its trie is empty again."""
    r = allow_rig
    state = r.maps["banstate"]

    def flags():
        v = state.lookup(ctypes.c_uint32(0))
        return v.v4, v.v6
    assert flags() == (0, 0)
    bans.add("198.51.100.0/24")
    bans.add(ADMIN4 + "/32")
    assert flags() == (1, 0)
    assert judge(r, bans, tcp(ADMIN4, dport=22)) == outcome("drop", "ban")
    m = r.maps["ban4"]
    xgbans.delete(m, state, 4, ban_key(m, "198.51.100.0/24"))
    assert flags() == (1, 0)                    # one ban left
    bans.clear()
    assert flags() == (0, 0)
    assert judge(r, bans, tcp(ADMIN4, dport=22)) == outcome("pass", "ssh-admin")
    # A lowered flag hides an entry written behind the protocol's back:
    # that is why every writer goes through bans.insert.
    k = ban_key(m, ADMIN4 + "/32")
    m.update(k, m.Leaf())
    try:
        assert run(r, tcp(ADMIN4, dport=22)) == outcome("pass", "ssh-admin")
    finally:
        m.delete(k)


def test_ban_expiry(allow_rig, bans):
    r = allow_rig
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    bans.add(ADMIN4 + "/32", expires_ns=now - 1_000_000_000)   # expired a second ago
    assert judge(r, bans, tcp(ADMIN4, dport=22)) == outcome("pass", "ssh-admin")
    bans.add(ADMIN6 + "/128", expires_ns=now + 600_000_000_000)  # ten minutes left
    assert judge(r, bans, tcp(ADMIN6, D6, dport=22)) == outcome("drop", "ban")
    assert bans.get(ADMIN4 + "/32").packets == 0       # an ignored ban counts nothing
    assert bans.get(ADMIN6 + "/128").packets == 1
    # The longest ban holding a source decides alone: an expired /64 inside
    # a ban of its /48 lets the /64's sources through.
    bans.add("2001:db8:a::/48")
    bans.add("2001:db8:a:1::/64", expires_ns=now - 1)
    assert judge(r, bans, tcp("2001:db8:a:1::9", D6, dport=22)) == outcome("drop", "ssh-deny")
    assert judge(r, bans, tcp("2001:db8:a:2::9", D6, dport=22)) == outcome("drop", "ban")


def test_ban_counters(allow_rig, bans):
    r = allow_rig
    bans.add("203.0.113.0/24", reason=C.XG_BAN_SYN_RATE)
    before = r.counter(C.XG_SLOT_BAN)
    frames = [(tcp(BAD4), 7), (udp("203.0.113.200", payload=bytes(300)), 1), (build(BAD4, D4, "gre"), 1)]
    for f, n in frames:
        assert judge(r, bans, f, n) == outcome("drop", "ban")
    v = bans.get("203.0.113.0/24")
    want_p = sum(n for _, n in frames)
    want_b = sum(len(f) * n for f, n in frames)
    assert (v.packets, v.bytes, v.reason) == (want_p, want_b, C.XG_BAN_SYN_RATE)
    after = r.counter(C.XG_SLOT_BAN)
    assert after["packets"] - before["packets"] == want_p
    assert after["bytes"] - before["bytes"] == want_b
    assert after["dropped_packets"] - before["dropped_packets"] == want_p
    assert after["dropped_bytes"] - before["dropped_bytes"] == want_b
