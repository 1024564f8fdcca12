"""Counters of the real program: every frame lands in the slot of what
decided it (a rule, the default, ND, a ban, a malformed frame's cause, a
missing map entry) with its packets and bytes, dropped or not; non-IP
frames nowhere."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
from scapy.layers.l2 import ARP

from dataplane_fixtures import (ADMIN4, ALLOW_POLICY, D6, DENY_POLICY, EXT6, S6, E, set_ihl, tcp, udp,
                                with_byte)
from testrun import fixed_counters, outcome, reset_buckets, rig_fixture, run
from xdpguard import bpfsys, lookup, pins
from xdpguard.bpfsys import XDP_DROP
from xdpguard.layout import C
from xdpguard.lookup import Outcome
from xdpguard.packet import build

pytestmark = pytest.mark.kernel

allow_rig = rig_fixture(ALLOW_POLICY, "dp-allow.toml")
deny_rig = rig_fixture(DENY_POLICY, "dp-deny.toml")


def test_counters_count_what_was_sent(allow_rig):
    r = allow_rig
    seq = [  # (frame, repeat, slot, dropped)
        (tcp(dport=22), 3, r.slots["ssh-deny"], True),
        (tcp(S6, D6, dport=22, payload=bytes(999)), 2, r.slots["ssh-deny"], True),
        (tcp(ADMIN4, dport=22, vlans=(5,)), 4, r.slots["ssh-admin"], False),
        (udp(sport=53, dport=5353, payload=bytes(1400)), 1, r.slots["dns-replies"], False),
        (tcp(), 5, C.XG_SLOT_DEFAULT, False),
        (build(S6, D6, "icmpv6", icmp_type=135), 2, C.XG_SLOT_ND, False),
        # A malformed frame in its cause's slot.
        (set_ihl(tcp(), 2), 3, C.XG_SLOT_BAD_HEADER, True),
        (with_byte(udp(S6, D6), 14, 0x45), 1, C.XG_SLOT_BAD_HEADER, True),
        (tcp(dport=22)[:40], 1, C.XG_SLOT_TRUNCATED, True),
        (udp(S6, D6)[:14 + 40 + 4], 2, C.XG_SLOT_TRUNCATED, True),
        (tcp(vlans=(1, 2, 3)), 2, C.XG_SLOT_VLANS, True),
        (udp(S6, D6, ipv6_exthdrs=EXT6 + [("dst",)], payload=bytes(100)), 3, C.XG_SLOT_EXTHDRS, True),
        (bytes(E() / ARP()), 6, None, False),             # non-IP: counted nowhere
    ]
    before = fixed_counters(r)
    want = {s: {"packets": 0, "bytes": 0, "dropped_packets": 0, "dropped_bytes": 0} for s in before}
    for frame, n, slot, dropped in seq:
        reset_buckets(r)
        res = run(r, frame, n)
        assert res == lookup.verdict(frame, r.tables)
        if slot is None:
            continue
        w = want[slot]
        w["packets"] += n
        w["bytes"] += n * len(frame)
        if dropped:
            w["dropped_packets"] += n
            w["dropped_bytes"] += n * len(frame)
    after = fixed_counters(r)
    for s in before:
        delta = {k: after[s][k] - before[s][k] for k in after[s]}
        assert delta == want[s], f"slot {s} ({r.by_slot.get(s, 'fixed')}): {delta} != {want[s]}"


def test_a_missing_bucket_drops_counted_apart(deny_rig):
    """A limit rule whose bucket cannot be had (here: a rule record whose
    slot lies past the bucket array; in production a per-source bucket the
    LRU could not insert) drops, never fails open, and counts the drop in
    the no-entry slot, not among the rule's drops over its rate."""
    r = deny_rig
    name = "per-rule-limit"
    idx = next(i for i, x in enumerate(r.tables.rules) if x.name == name)
    rules = r.maps["rules"]
    key = ctypes.c_uint32(r.gen * r.shape.rules_per_gen + idx)
    rec = rules.lookup(key)
    frame = tcp(dst="198.51.100.61", dport=9000)
    before, rule_before = r.counter(C.XG_SLOT_NO_ENTRY), r.counter(r.slots[name])
    broken = type(rec).from_buffer_copy(rec)
    broken.slot = C.XG_MAX_SLOTS
    rules.update(key, broken)
    try:
        res = r.run(frame, repeat=3)
    finally:
        rules.update(key, rec)
    assert (res, res.slot) == (Outcome(XDP_DROP, "no_entry", name), C.XG_SLOT_NO_ENTRY)
    after, rule_after = r.counter(C.XG_SLOT_NO_ENTRY), r.counter(r.slots[name])
    assert {k: after[k] - before[k] for k in after} == {
        "packets": 3, "bytes": 3 * len(frame), "dropped_packets": 3, "dropped_bytes": 3 * len(frame)}
    assert rule_after == rule_before
    reset_buckets(r)
    assert run(r, frame) == outcome("pass", name)


@pytest.fixture
def pinned_counters(allow_rig):
    """The rig's counters pinned in a bpffs directory of the test's own,
    with the record fields `stats` reads."""
    from xdpguard import loader
    d = Path(f"/sys/fs/bpf/xgtest-counters-{os.getpid()}")
    d.mkdir()
    r = allow_rig
    try:
        bpfsys.obj_pin(r.maps["counters"].fd, str(d / "counters"))
        record = pins.Record(iface="test", netns="test", policy=pins.PolicyInfo(name="dp-allow", default="allow"),
                             rules=[pins.RuleSlot(n, "deny", s) for n, s in r.slots.items()],
                             types=loader.bcc_types(r.b, ["counters"]))
        yield d, record
    finally:
        (d / "counters").unlink(missing_ok=True)
        d.rmdir()


def test_stats_shows_every_drop_reason(allow_rig, pinned_counters):
    """`stats` (JSON and table) counts malformed frames in all and by
    cause, next to bans and drops for want of a map entry."""
    from xdpguard import cli, stats
    from xdpguard.cliutil import Numbers
    r = allow_rig
    sent = {"truncated": (tcp()[:40], 2), "bad_header": (set_ihl(tcp(), 3), 3),
            "vlans": (tcp(vlans=(1, 2, 3)), 4), "exthdrs": (udp(S6, D6, ipv6_exthdrs=EXT6 + [("dst",)]), 5)}
    before = stats.read_stats(*pinned_counters)
    for cause, (frame, n) in sent.items():
        assert run(r, frame, n) == outcome("drop", cause)
    after = stats.read_stats(*pinned_counters)
    causes = {c: {k: after["malformed"]["causes"][c][k] - before["malformed"]["causes"][c][k]
                  for k in ("packets", "bytes")} for c in sent}
    assert causes == {c: {"packets": n, "bytes": n * len(f)} for c, (f, n) in sent.items()}
    total = sum(n for _f, n in sent.values())
    assert after["malformed"]["packets"] - before["malformed"]["packets"] == total
    assert after["no_entry"] == before["no_entry"] and after["bans"] == before["bans"]
    exact = Numbers(exact=True)

    def rates(row):                                                # pps, drop/s (bit/s between)
        return [row[-3], row[-1]]
    rows = {row[0]: row for row in cli._stats_rows(after, exact, before, 1.0)}
    for cause, (_f, n) in sent.items():
        assert rates(rows[f"(malformed: {cause})"]) == [f"{n:.1f}", f"{n:.1f}"]
    assert rates(rows["(malformed)"]) == [f"{total:.1f}", f"{total:.1f}"]
    assert rates(rows["(no map entry)"]) == ["0.0", "0.0"] and "(bans)" in rows
    assert [row[0] for row in cli._stats_rows(after, exact)] == list(rows)
