"""Helpers for the tests that run the real XDP program under
BPF_PROG_TEST_RUN (loader.TestRig): the rig, runs checked for a coherent
debug record, expected outcomes written short, buckets and bans.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress

import pytest

from conftest import require_kernel
from xdpguard import bans as xgbans, bpfsys
from xdpguard.bpfsys import XDP_DROP, XDP_PASS
from xdpguard.compiler import compile_policy
from xdpguard.layout import SLOT_REASONS, C
from xdpguard.lookup import NON_IP, RULE, Outcome
from xdpguard.policy import load

_REASONS = set(SLOT_REASONS.values()) | {NON_IP}
_RETVAL = {"drop": XDP_DROP, "pass": XDP_PASS}


def compile_text(text: str, name: str = "t.toml"):
    policy = load(name, text=text)
    return policy, compile_policy(policy)


def make_rig(tables, **shape):
    require_kernel()
    from xdpguard.loader import Shape, TestRig
    return TestRig(tables, Shape(**shape) if shape else None)


def rig_fixture(text: str, name: str):
    """A module-scoped fixture: a rig with this policy loaded."""
    @pytest.fixture(scope="module")
    def rig():
        r = make_rig(compile_text(text, name)[1])
        yield r
        r.close()
    return rig


def outcome(verdict: str, why: str | None = None) -> Outcome:
    """An expected Outcome written short: ("drop", "ssh-deny") for a rule,
    ("pass", None) for the default, ("drop", "vlans") for a reason."""
    if why is None:
        return Outcome(_RETVAL[verdict], "default")
    if why in _REASONS:
        return Outcome(_RETVAL[verdict], why)
    return Outcome(_RETVAL[verdict], RULE, why)


def run(rig, frame: bytes, repeat: int = 1) -> Outcome | None:
    """rig.run, with the kernel's slot checked against the outcome's: the
    deciding rule's own slot, or the reason's. None for a frame under 14
    bytes, which the kernel refuses (BPF_PROG_TEST_RUN needs ETH_HLEN bytes;
    XDP never sees a shorter frame)."""
    if len(frame) < 14:
        with pytest.raises(OSError) as ei:
            bpfsys.prog_test_run(rig.fn.fd, frame, repeat=repeat)
        assert ei.value.errno == errno.EINVAL
        return None
    res = rig.run(frame, repeat)
    assert res.slot == res.counter_slot(rig.slots), f"{res}: slot {res.slot} is not {res.reason}'s"
    return res


def reset_buckets(rig) -> None:
    zero = bytes(ctypes.sizeof(rig.maps["rbuckets"].Leaf))
    for slot in rig.slots.values():
        for name in ("rbuckets", "nbuckets"):     # nbuckets: the new-source budgets
            bpfsys.map_update(rig.maps[name].fd, bytes(ctypes.c_uint32(slot)), zero)
    sb = rig.maps["sbuckets"]
    for k in list(bpfsys.map_keys(sb.fd, ctypes.sizeof(sb.Key))):
        bpfsys.map_delete(sb.fd, k)


def fixed_counters(rig) -> dict:
    """Every fixed slot's and every rule's counters, by slot."""
    return {s: rig.counter(s) for s in [*SLOT_REASONS, *rig.slots.values()]}


def ban_key(m, cidr: str):
    net = ipaddress.ip_network(cidr)
    k = m.Key()
    k.prefixlen = net.prefixlen
    raw = net.network_address.packed
    ctypes.memmove(ctypes.addressof(k) + type(k).addr.offset, raw, len(raw))
    return k


class Bans:
    """Bans written into a rig's ban maps as `xdpguard ban` writes them (a
    test rig has no pin lock), and taken out again by clear(); entries()
    gives them as lookup.verdict takes them."""

    def __init__(self, rig):
        self.rig, self.keys, self.nets = rig, [], []

    def add(self, cidr: str, expires_ns: int = 0, reason: int = C.XG_BAN_MANUAL):
        fam = 6 if ":" in cidr else 4
        m = self.rig.maps[f"ban{fam}"]
        k = ban_key(m, cidr)
        v = m.Leaf()
        v.expires_ns, v.reason = expires_ns, reason
        xgbans.insert(m, self.rig.maps["banstate"], fam, k, v)
        self.keys.append((m, fam, k))
        self.nets.append((ipaddress.ip_network(cidr), expires_ns))
        return k

    def entries(self) -> list:
        return list(self.nets)

    def get(self, cidr: str):
        m = self.rig.maps["ban4" if ":" not in cidr else "ban6"]
        return m.lookup(ban_key(m, cidr))

    def clear(self):
        for m, fam, k in self.keys:
            xgbans.delete(m, self.rig.maps["banstate"], fam, k)
        self.keys, self.nets = [], []
