"""The fast lane (xg_fast in bpf/xdpguard.c) under BPF_PROG_TEST_RUN.

A flood frame whose source alone decides an allow or deny skips the
general parser. These tests pin down which frames take that lane (the test
build records it in the debug map) and that every frame, in the lane or
not, gets the verdict, rule and counters of the Python reference, the
same as the general path gives it: the fixture and fuzz tests check the
verdicts over many more frames.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
from contextlib import contextmanager

import pytest

from conftest import require_kernel
from testrun import make_rig, outcome, run
from xdpguard import bans as xgbans, bpfsys, lookup, packet
from xdpguard.compiler import compile_policy
from xdpguard.layout import C
from xdpguard.packet import build
from xdpguard.policy import load

pytestmark = pytest.mark.kernel

POLICY = """
[policy]
name = "fastlane"
default = "allow"

[[rule]]
name = "blocklist"
src = ["198.51.100.0/24", "203.0.113.0/25", "2001:db8:bad::/48", "2001:db8:bad:1::42/128"]
action = "deny"

[[rule]]
name = "trusted"
src = ["192.0.2.0/28", "2001:db8:600d::/48"]
action = "allow"

[[rule]]
name = "logged"
src = "192.0.2.64/26"
action = "deny"
log = true

[[rule]]
name = "limited"
src = ["203.0.113.128/25", "2001:db8:11::/48"]
action = "limit"
rate = "1000/s"
burst = 1000

[[rule]]
name = "limited-logged"
src = "192.0.2.32/27"
action = "limit"
rate = "1000/s"
burst = 1000
log = true

[[rule]]
name = "web-only"
src = "192.0.2.128/25"
proto = "tcp"
dport = 80
action = "deny"
"""

MITIGATION = """
[mitigation]
enabled = true
syn_rate = "100/s"
"""

BLOCKED, TRUSTED, LOGGED, LIMITED, WEB = "198.51.100.7", "192.0.2.3", "192.0.2.70", "203.0.113.200", "192.0.2.130"
DST = "10.9.9.9"
BLOCKED6, TRUSTED6, DST6 = "2001:db8:bad:7::1", "2001:db8:600d::3", "2001:db8:9::9"
LIMITED6, LIMITED_LOGGED = "2001:db8:11::5", "192.0.2.40"
# Past the IPv6 table's depth (/64): the trie decides, on the general path.
BLOCKED6_HOST = "2001:db8:bad:1::42"


def udp(src, **kw):
    return build(src, DST, "udp", sport=40000, dport=5000, **kw)


def tcp(src, flags="syn", **kw):
    return build(src, DST, "tcp", dport=80, tcp_flags=flags, **kw)


def udp6(src, **kw):
    return build(src, DST6, "udp", sport=40000, dport=5000, **kw)


def _with_byte(frame: bytes, at: int, value: int) -> bytes:
    return frame[:at] + bytes([value]) + frame[at + 1:]


@pytest.fixture(scope="module")
def rig():
    require_kernel()
    r = make_rig(compile_policy(load("fastlane.toml", text=POLICY)))
    yield r
    r.close()


LANE = [
    # (description, frame, takes the fast lane)
    ("blocklisted v4 UDP", udp(BLOCKED), True),
    ("blocklisted v4 TCP SYN", tcp(BLOCKED), True),
    ("blocklisted v4 ICMP", build(BLOCKED, DST, "icmp"), True),
    ("blocklisted v4 GRE", build(BLOCKED, DST, "gre", payload=bytes(32)), True),
    ("blocklisted v4, a later fragment", udp(BLOCKED, fragment=(3, False), payload=bytes(32)), True),
    ("blocklisted v4 GRE, under 8 bytes after IP", build(BLOCKED, DST, "gre"), False),
    ("blocklisted v4, a later fragment, under 8 bytes", udp(BLOCKED, fragment=(3, False)), False),
    ("blocklisted v4, 1,400 bytes of payload", udp(BLOCKED, payload=bytes(1400)), True),
    ("trusted v4 (allow decided by the source)", tcp(TRUSTED, flags="ack"), True),
    ("blocklisted, VLAN-tagged", udp(BLOCKED, vlans=(7,)), False),
    ("blocklisted v6 UDP", udp6(BLOCKED6), True),
    ("blocklisted v6 TCP SYN", build(BLOCKED6, DST6, "tcp", dport=80), True),
    ("blocklisted v6 GRE", build(BLOCKED6, DST6, "gre", payload=bytes(32)), True),
    ("blocklisted v6 ICMPv6 (could be ND)", build(BLOCKED6, DST6, "icmpv6"), False),
    ("blocklisted v6 with a hop-by-hop header", udp6(BLOCKED6, ipv6_exthdrs=[("hop",)]), False),
    ("blocklisted v6, a fragment", udp6(BLOCKED6, fragment=(0, True)), False),
    ("blocklisted v6, VLAN-tagged", udp6(BLOCKED6, vlans=(7,)), False),
    ("blocklisted v6 TCP, header cut short", build(BLOCKED6, DST6, "tcp", dport=80)[:14 + 40 + 12], False),
    ("blocklisted v6 UDP, header cut short", udp6(BLOCKED6)[:14 + 40 + 6], False),
    ("blocklisted v6 /128, past the table", udp6(BLOCKED6_HOST), False),
    ("trusted v6 (allow decided by the source)", build(TRUSTED6, DST6, "tcp", tcp_flags="ack"), True),
    ("no rule v6: the default", udp6("2001:db8:1::1"), False),
    ("blocklisted v4 with IP options", None, False),
    ("blocklisted v4 TCP, header cut short", None, False),
    ("deny that logs", udp(LOGGED), False),
    ("limit rule its source decides", udp(LIMITED), True),
    ("limit rule its source decides, v6", udp6(LIMITED6), True),
    ("limit rule that logs", udp(LIMITED_LOGGED), False),
    ("source vector that does not decide alone", tcp(WEB), False),
    ("no rule: the default", udp("10.1.2.3"), False),
]


def _frame(desc, frame):
    if desc.endswith("with IP options"):
        from scapy.layers.inet import IP, UDP, IPOption_NOP
        from scapy.layers.l2 import Ether
        # Both MACs explicit: without them scapy resolves one through the
        # default route, touching the machine's own interface.
        eth = Ether(src=packet._MAC_SRC.hex(":"), dst=packet._MAC_DST.hex(":"))
        return bytes(eth / IP(src=BLOCKED, dst=DST, options=[IPOption_NOP()] * 4) / UDP(dport=5000))
    if desc.endswith("header cut short"):
        return tcp(BLOCKED)[:14 + 20 + 12]
    return frame


@pytest.mark.parametrize("desc,frame,fast", LANE, ids=[r[0] for r in LANE])
def test_lane_and_verdict(rig, desc, frame, fast):
    frame = _frame(desc, frame)
    res = run(rig, frame)
    assert res.fast == fast, desc
    # One packet of a limit rule is within its burst.
    assert res == lookup.verdict(frame, rig.tables), desc


def test_lane_counts_like_the_general_path(rig):
    """Packets and bytes (all, and dropped) in the deciding rule's slot."""
    for name, frame, n, dropped in (("blocklist", udp(BLOCKED, payload=bytes(333)), 5, True),
                                    ("trusted", tcp(TRUSTED, flags="ack"), 3, False)):
        slot = rig.slots[name]
        before = rig.counter(slot)
        res = run(rig, frame, repeat=n)
        assert res.fast
        after = rig.counter(slot)
        assert after["packets"] - before["packets"] == n
        assert after["bytes"] - before["bytes"] == n * len(frame)
        assert after["dropped_packets"] - before["dropped_packets"] == (n if dropped else 0)
        assert after["dropped_bytes"] - before["dropped_bytes"] == (n * len(frame) if dropped else 0)


def _ban(rig, addr):
    fam = ipaddress.ip_address(addr).version
    m = rig.maps[f"ban{fam}"]
    raw = ipaddress.ip_address(addr).packed
    key = m.Key()
    key.prefixlen = 8 * len(raw)
    key.addr = (ctypes.c_uint8 * len(raw))(*raw)
    xgbans.insert(m, rig.maps["banstate"], fam, key, m.Leaf())   # a test rig has no pin lock
    return key


def test_bans_in_the_lane(rig):
    """While IPv4 bans exist the lane checks the ban trie first, as the
    general path does: a banned trusted source is dropped (ban slot, ban
    counters), an unbanned blocklisted one still gets its rule."""
    ban4, state = rig.maps["ban4"], rig.maps["banstate"]
    key = _ban(rig, TRUSTED)
    try:
        before = rig.counter(C.XG_SLOT_BAN)
        frame = tcp(TRUSTED, flags="ack")
        res = run(rig, frame, repeat=4)
        assert (res.fast, res) == (True, outcome("drop", "ban"))
        after = rig.counter(C.XG_SLOT_BAN)
        assert after["dropped_packets"] - before["dropped_packets"] == 4
        assert after["dropped_bytes"] - before["dropped_bytes"] == 4 * len(frame)
        v = ban4.lookup(key)
        assert (v.packets, v.bytes) == (4, 4 * len(frame))
        res = run(rig, udp(BLOCKED))
        assert (res.fast, res) == (True, outcome("drop", "blocklist"))
        # A frame the lane leaves walks the ban trie once, on the general path.
        res = run(rig, udp(TRUSTED, vlans=(3,)))
        assert (res.fast, res) == (False, outcome("drop", "ban"))
        assert ban4.lookup(key).packets == 5
    finally:
        xgbans.delete(ban4, state, 4, key)
    assert state.lookup(ctypes.c_uint32(0)).v4 == 0
    assert run(rig, tcp(TRUSTED, flags="ack")) == outcome("pass", "trusted")


def test_ipv6_bans_in_the_lane(rig):
    """The same for IPv6: while IPv6 bans exist the lane checks ban6; IPv4
    frames do not (their family has no bans)."""
    ban6, state = rig.maps["ban6"], rig.maps["banstate"]
    key = _ban(rig, TRUSTED6)
    try:
        assert state.lookup(ctypes.c_uint32(0)).v4 == 0
        frame = build(TRUSTED6, DST6, "tcp", tcp_flags="ack")
        res = run(rig, frame, repeat=3)
        assert (res.fast, res) == (True, outcome("drop", "ban"))
        v = ban6.lookup(key)
        assert (v.packets, v.bytes) == (3, 3 * len(frame))
        res = run(rig, udp6(BLOCKED6))
        assert (res.fast, res) == (True, outcome("drop", "blocklist"))
        res = run(rig, tcp(TRUSTED, flags="ack"))
        assert (res.fast, res) == (True, outcome("pass", "trusted"))
    finally:
        xgbans.delete(ban6, state, 6, key)
    assert state.lookup(ctypes.c_uint32(0)).v6 == 0
    res = run(rig, build(TRUSTED6, DST6, "tcp", tcp_flags="ack"))
    assert (res.fast, res) == (True, outcome("pass", "trusted"))


def test_logged_bans_leave_the_lane():
    """Banned drops that log need the packet record: with log_bans and an
    IPv4 ban in the map, IPv4 frames take the general path; IPv6 frames,
    whose family has no bans, keep the lane."""
    require_kernel()
    text = POLICY.replace('default = "allow"', 'default = "allow"\nlog_bans = true', 1)
    r = make_rig(compile_policy(load("fastlane-logbans.toml", text=text)))
    try:
        assert run(r, udp(BLOCKED)).fast             # no ban yet
        key = _ban(r, TRUSTED)
        try:
            res = run(r, tcp(TRUSTED, flags="ack"))
            assert (res.fast, res) == (False, outcome("drop", "ban"))
            assert not run(r, udp(BLOCKED)).fast
            assert run(r, udp6(BLOCKED6)).fast
        finally:
            xgbans.delete(r.maps["ban4"], r.maps["banstate"], 4, key)
    finally:
        r.close()


def test_mitigation_turns_the_lane_off():
    """A generation that counts per-source stats for the daemon sends every
    frame through the general path, which counts it."""
    require_kernel()
    r = make_rig(compile_policy(load("fastlane-mit.toml", text=POLICY + MITIGATION)))
    try:
        assert r.tables.flags & C.XG_GEN_MITIGATE
        res = run(r, udp(BLOCKED))
        assert (res.fast, res) == (False, outcome("drop", "blocklist"))
        m = r.maps["srcstat"]
        assert len(list(bpfsys.map_keys(m.fd, ctypes.sizeof(m.Key)))) >= 1
    finally:
        r.close()


def test_lane_follows_the_active_generation(rig):
    """After a re-apply that moves a source from deny to allow, the lane
    reads the new generation."""
    swapped = POLICY.replace('name = "blocklist"', 'name = "blocklist-old"', 1)
    swapped = swapped.replace('action = "deny"\n\n[[rule]]\nname = "trusted"',
                              'action = "allow"\n\n[[rule]]\nname = "trusted"', 1)
    old = rig.tables
    rig.load(compile_policy(load("fastlane2.toml", text=swapped)))
    try:
        res = run(rig, udp(BLOCKED))
        assert res.fast
        assert res == outcome("pass", "blocklist-old")
        res = run(rig, udp6(BLOCKED6))
        assert (res.fast, res) == (True, outcome("pass", "blocklist-old"))
    finally:
        rig.load(old)
    res = run(rig, udp(BLOCKED))
    assert (res.fast, res) == (True, outcome("drop", "blocklist"))


def test_nd_from_a_source_that_decides():
    """ND is matched by no rule that decides alone, so an ND packet from a
    blocklisted IPv6 source (whose table entry is a verdict code) is
    classified with its vector from the trie: a rule naming icmpv6
    matches it; without one it passes as ND."""
    require_kernel()
    text = POLICY + '\n[[rule]]\nname = "icmp-v6"\nproto = "icmpv6"\naction = "allow"\n'
    nd = build(BLOCKED6, DST6, "icmpv6", icmp_type=136)
    echo = build(BLOCKED6, DST6, "icmpv6")
    r = make_rig(compile_policy(load("fastlane-nd.toml", text=text)))
    try:
        res = run(r, nd)
        assert (res.fast, res) == (False, outcome("pass", "icmp-v6"))
        res = run(r, echo)
        assert (res.fast, res) == (False, outcome("drop", "blocklist"))
        assert run(r, udp6(BLOCKED6)).fast
    finally:
        r.close()
    res = None
    r = make_rig(compile_policy(load("fastlane-nd2.toml", text=POLICY)))
    try:
        res = run(r, nd)
        assert (res.fast, res, res.slot) == (False, outcome("pass", "nd"), C.XG_SLOT_ND)
    finally:
        r.close()


@contextmanager
def _one_cpu():
    """Keep this thread (and so BPF_PROG_TEST_RUN) on one CPU: the lane's
    last-source memory is per CPU."""
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, old)


def _last(r, cpu: int, family: int):
    t = r.b[b"lastsrc"]
    v = t[t.Key(0)][cpu]
    return v.v4 if family == 4 else v.v6


def _word(r) -> int:
    return int(r.maps["active"].lookup(ctypes.c_uint32(0)).value)


def test_lane_remembers_the_last_source(rig):
    """Each CPU remembers the lane's last source per family, under the
    active word; the next frame from it gets the verdict and counters the
    table gives. A source the table leaves to the general path is
    remembered as such and still goes there."""
    with _one_cpu() as cpu:
        for src, frame in ((BLOCKED, udp(BLOCKED)), (BLOCKED6, udp6(BLOCKED6))):
            fam = ipaddress.ip_address(src).version
            assert run(rig, frame).fast
            last = _last(rig, cpu, fam)
            packed = ipaddress.ip_address(src).packed
            assert bytes(last.addr)[:len(packed)] == packed
            assert last.word == _word(rig) and last.e & C.XG_DIR_FAST and last.e & C.XG_DIR_DROP
            before = rig.counter(rig.slots["blocklist"])
            res = run(rig, frame, repeat=100)
            assert (res.fast, res) == (True, outcome("drop", "blocklist"))
            after = rig.counter(rig.slots["blocklist"])
            assert after["packets"] - before["packets"] == 100
            assert after["dropped_bytes"] - before["dropped_bytes"] == 100 * len(frame)
        for _ in range(2):
            res = run(rig, udp(WEB))
            assert (res.fast, res) == (False, lookup.verdict(udp(WEB), rig.tables))
        assert not _last(rig, cpu, 4).e & C.XG_DIR_FAST


def test_lane_memory_never_outlives_its_fill():
    """A re-apply writes the table of the generation it switches to. A
    source remembered under generation 0, then two re-applies that end on
    generation 0 again, with the same flags and a new verdict for that
    source: the lane looks the source up afresh, because the active
    word's epoch moved on."""
    require_kernel()
    allowed = POLICY.replace('name = "blocklist"', 'name = "blocklist-old"', 1)
    allowed = allowed.replace('action = "deny"\n\n[[rule]]\nname = "trusted"',
                              'action = "allow"\n\n[[rule]]\nname = "trusted"', 1)
    r = make_rig(compile_policy(load("fastlane.toml", text=POLICY)))
    try:
        with _one_cpu() as cpu:
            for frame, fam in ((udp(BLOCKED), 4), (udp6(BLOCKED6), 6)):
                res = run(r, frame)
                assert (res.fast, res) == (True, outcome("drop", "blocklist"))
            remembered = _last(r, cpu, 4).word
            r.load(compile_policy(load("fastlane.toml", text=POLICY)))
            r.load(compile_policy(load("fastlane-allowed.toml", text=allowed)))
            word = _word(r)
            assert r.gen == 0 and word & 0xFFFFFFFF == remembered & 0xFFFFFFFF
            assert word >> C.XG_ACTIVE_EPOCH_SHIFT == (remembered >> C.XG_ACTIVE_EPOCH_SHIFT) + 2
            # Nothing ran since: the memory still holds the old fill's entry.
            assert _last(r, cpu, 4).word == remembered == _last(r, cpu, 6).word
            for frame in (udp(BLOCKED), udp6(BLOCKED6)):
                res = run(r, frame)
                assert (res.fast, res) == (True, outcome("pass", "blocklist-old"))
    finally:
        r.close()


LANE_LIMIT = """
[policy]
name = "lane-limit"
default = "allow"

[[rule]]
name = "lim"
src = ["10.77.0.0/16", "2001:db8:77::/48"]
action = "limit"
rate = "1/s"
burst = 3
new_sources = "1/s"
new_sources_burst = 2
"""


def _limit_verdicts(r, frames):
    return [(res.fast, res.retval, res.slot) for res in (run(r, f) for f in frames)]


@pytest.mark.parametrize("fam", [4, 6])
def test_lane_limits_like_the_general_path(fam):
    """A per-source limit its source decides: the lane gives each frame the
    general path's verdict and slot (a VLAN tag sends the same frames down
    the general path, with buckets reset between), the new-source budget
    before any bucket is inserted, and a ban before the rule."""
    require_kernel()
    from testrun import reset_buckets
    r = make_rig(compile_policy(load("lane-limit.toml", text=LANE_LIMIT)))
    try:
        srcs = ["10.77.0.1", "10.77.0.2", "10.77.0.3"] if fam == 4 else \
            ["2001:db8:77:1::1", "2001:db8:77:2::1", "2001:db8:77:3::1"]
        dst = DST if fam == 4 else DST6
        order = [srcs[0]] * 5 + [srcs[1], srcs[2], srcs[1]]
        lim, newsrc = r.slots["lim"], C.XG_SLOT_NEWSRC
        got = {}
        for vlans in ((), (7,)):
            reset_buckets(r)
            frames = [build(s, dst, "udp", sport=40000, dport=5000, vlans=vlans) for s in order]
            got[vlans] = _limit_verdicts(r, frames)
        # burst 3: 3 pass, 2 over; the budget (burst 2) took the first
        # source and the second; the third finds it empty.
        want = [(2, lim)] * 3 + [(1, lim)] * 2 + [(2, lim), (1, newsrc), (2, lim)]
        assert [(v, s) for _f, v, s in got[()]] == want
        assert [(v, s) for _f, v, s in got[(7,)]] == want
        assert all(f for f, _v, _s in got[()]) and not any(f for f, _v, _s in got[(7,)])
        # No bucket for the source the budget turned away (IPv6: a /64 each).
        from test_newsources import buckets
        plen = 32 if fam == 4 else 64
        assert {a for _s, a in buckets(r)} == {
            ipaddress.ip_network(f"{s}/{plen}", strict=False).network_address.packed for s in srcs[:2]}
        # A ban comes first, in the lane too.
        _ban(r, srcs[1])
        res = run(r, build(srcs[1], dst, "udp", sport=40000, dport=5000))
        assert (res.fast, res) == (True, outcome("drop", "ban"))
    finally:
        r.close()
