"""Helpers for the tests that run the real XDP program under
BPF_PROG_TEST_RUN (loader.TestRig): the rig, runs checked for a coherent
debug record, expected outcomes written short, buckets and bans.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import sys

import pytest

from conftest import require_kernel
from xdpguard import bans as xgbans, bpfsys
from xdpguard.bpfsys import XDP_DROP, XDP_PASS
from xdpguard.compiler import compile_policy
from xdpguard.layout import SLOT_REASONS, C
from xdpguard.loader import Shape, TestRig
from xdpguard.lookup import NON_IP, RULE, Outcome
from xdpguard.policy import load

_REASONS = set(SLOT_REASONS.values()) | {NON_IP}
_RETVAL = {"drop": XDP_DROP, "pass": XDP_PASS}


def compile_text(text: str, name: str = "t.toml"):
    policy = load(name, text=text)
    return policy, compile_policy(policy)


# Programs of each shape that their tests have closed, ready for the next
# make_rig of that shape (SharedRig).
_FREE: dict = {}


def make_rig(tables, shape=None, **fields):
    """A TestRig with this policy loaded, as a new one has it (shape: a
    loader.Shape, or its fields; default Shape.for_tables). The program
    of the same shape (the same cflags) that an earlier test closed is
    emptied and reused instead of compiled again: a compile takes seconds
    here and a minute or more in an emulated guest (vm/)."""
    require_kernel()
    if shape is None:
        shape = Shape(**fields) if fields else Shape.for_tables(tables)
    free = _FREE.get(shape)
    if not free:
        return SharedRig(tables, shape)
    rig = free.pop()
    rig.renew(tables)
    return rig



def _empty_map(fd: int) -> None:
    """A map as the kernel creates it: arrays zeroed, hashes, tries and
    arrays of maps without entries, a ring buffer with nothing to read."""
    info = bpfsys.map_info(fd)
    mtype, ks, vs, n = info["type"], info["key_size"], info["value_size"], info["max_entries"]
    if mtype in (bpfsys.BPF_MAP_TYPE_ARRAY, bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY):
        size = bpfsys.percpu_value_size(vs) if mtype in bpfsys.PERCPU_MAP_TYPES else vs
        keys = b"".join(i.to_bytes(4, sys.byteorder) for i in range(n))
        bpfsys.map_update_batch(fd, keys, bytes(size * n), n)
    elif mtype == bpfsys.BPF_MAP_TYPE_ARRAY_OF_MAPS:
        for i in range(n):
            bpfsys.map_delete(fd, i.to_bytes(4, sys.byteorder))
    elif mtype == bpfsys.BPF_MAP_TYPE_RINGBUF:
        rb = bpfsys.RingBuffer(fd, lambda _rec: None)
        try:
            rb.consume()
        finally:
            rb.close()
    elif mtype != bpfsys.BPF_MAP_TYPE_PROG_ARRAY:     # the SYN cookie path stays, set at load
        for k in list(bpfsys.map_keys(fd, ks)):     # hashes (LRU, per-CPU), LPM tries
            bpfsys.map_delete(fd, k)


class SharedRig(TestRig):
    """A TestRig whose close() hands its program to the next make_rig of
    its shape; renew() gives it the state of a new one."""

    __test__ = False

    def close(self) -> None:
        free = _FREE.setdefault(self.shape, [])
        if self not in free:        # closed twice: still one user at a time
            free.append(self)

    def renew(self, tables) -> None:
        ids = {i for fn in self.b.funcs.values() for i in bpfsys.prog_info(fn.fd)["map_ids"]}
        for map_id in sorted(ids):
            with bpfsys.closing_fd(bpfsys.map_get_fd_by_id(map_id)) as fd:
                _empty_map(fd)
        self.gen, self.slots = 0, {}
        self.load(tables)


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
