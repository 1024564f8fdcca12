"""The pinned record (pins.Record): its JSON, the layout check, and
modify_record, the one way to change it, under the pin lock."""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import require_kernel
from xdpguard import bpfsys, pins
from xdpguard.layout import C

# A record as xdpguard wrote it before the record had a type (loader._record
# as a dict, `previous` and `confirm` added by apply, `probes` by watch).
# The layout number is the current one: another is refused by design.
OLD = {
    "layout": C.XG_LAYOUT_VERSION, "netns": "lab", "iface": "veth0", "ifindex": 7,
    "mode": "generic", "prog_id": 4242,
    "policy": {"name": "web", "sha256": "ab" * 32, "source": "/etc/xdpguard/web.toml",
               "applied_at": 1700000000.25, "default": "deny", "rules": 2},
    "shape": {"nwords": 1, "vec_per_gen": 256, "dir4_nodes": 1024, "dir6_nodes": 1024},
    "rules": [{"name": "ssh", "action": "allow", "slot": 8},
              {"name": "syn", "action": "limit", "slot": 9}],
    "slots": {"ssh": 8, "syn": 9},
    "lpm": {"4": 3, "6": 0},
    "types": {"counters": {"key": "unsigned int",
                           "leaf": ["xg_counter", [["packets", "unsigned long long"]], "struct"]}},
    "mitigation": {"enabled": True, "prefix4": 24, "prefix6": 64, "allow": ["192.0.2.0/24"]},
    "protect": [{"prefix": "198.51.100.7/32", "port": 22}, {"prefix": "2001:db8::/32", "port": None}],
    "previous": {
        "layout": C.XG_LAYOUT_VERSION, "netns": "lab", "iface": "veth0", "ifindex": 7,
        "mode": "generic", "prog_id": 4242,
        "policy": {"name": "web-old", "sha256": "cd" * 32, "source": "/etc/xdpguard/old.toml",
                   "applied_at": 1699999000.5, "default": "allow", "rules": 1},
        "shape": {"nwords": 1, "vec_per_gen": 256, "dir4_nodes": 1024, "dir6_nodes": 1024},
        "rules": [{"name": "ssh", "action": "allow", "slot": 8}],
        "slots": {"ssh": 8}, "lpm": {"4": 1, "6": 0},
        "mitigation": {"enabled": False, "prefix4": 32, "prefix6": 64, "allow": []},
        "protect": [], "probes": "tracepoints", "kind": "gen", "gen": 0},
    "confirm": {"deadline": 1700000060.25},
    "probes": "tracepoints",
}


def test_old_format_loads_and_writes_back_the_same():
    rec = pins.Record.from_json(copy.deepcopy(OLD))
    assert (rec.ns, rec.iface, rec.mode, rec.prog_id) == ("lab", "veth0", "generic", 4242)
    assert rec.policy.name == "web" and rec.policy.default == "deny"
    assert [(r.name, r.action, r.slot) for r in rec.rules] == [("ssh", "allow", 8), ("syn", "limit", 9)]
    assert rec.mitigation.prefix4 == 24 and rec.protect[1].port is None
    assert rec.confirm.deadline == 1700000060.25 and rec.probes == "tracepoints"
    assert (rec.previous.kind, rec.previous.gen) == ("gen", 0)
    assert rec.previous.record.policy.name == "web-old" and rec.previous.record.types == {}
    assert rec.to_json() == OLD


def test_previous_of_a_reload_and_no_options():
    doc = {k: v for k, v in copy.deepcopy(OLD).items() if k not in ("confirm", "probes")}
    doc["previous"].pop("gen")
    doc["previous"]["kind"] = "dir"
    rec = pins.Record.from_json(doc)
    assert rec.confirm is None and rec.probes is None
    assert (rec.previous.kind, rec.previous.gen) == ("dir", None)
    assert rec.to_json() == doc


def test_round_trip_through_json_text():
    rec = pins.Record(netns="host", iface="eth1", ifindex=2, mode="native", prog_id=9,
                      policy=pins.PolicyInfo("p", "00" * 32, "p.toml", time.time(), "allow", 1),
                      shape={"nwords": 1, "vec_per_gen": 256, "dir4_nodes": 16, "dir6_nodes": 16},
                      rules=[pins.RuleSlot("r", "deny", 8)], slots={"r": 8}, lpm={"4": 1, "6": 0},
                      types={"x": {"key": "int", "leaf": "int"}},
                      mitigation=pins.MitigationInfo(True, 24, 48, ["10.0.0.0/8"]),
                      protect=[pins.Protect("10.0.0.1/32", 22)], confirm=pins.Confirm(1.5),
                      history=[pins.PolicyInfo("o", "11" * 32, "p.toml", 1.25, "deny", 3),
                               pins.PolicyInfo("oo", "22" * 32, "q.toml", 0.5, "allow", 0)])
    rec.previous = rec.as_previous("gen", gen=1)
    back = pins.Record.from_json(json.loads(json.dumps(rec.to_json())))
    assert back == rec and [p.name for p in back.history] == ["o", "oo"]
    assert back.previous.record.previous is None and back.previous.record.confirm is None
    assert back.previous.record.history == []          # the running record keeps it, once
    assert "types" not in rec.to_json()["previous"]


@pytest.mark.parametrize("layout", [C.XG_LAYOUT_VERSION - 1, C.XG_LAYOUT_VERSION + 1, None])
def test_another_layout_is_refused(layout):
    doc = copy.deepcopy(OLD)
    doc["layout"] = layout
    with pytest.raises(pins.PinError, match="another xdpguard version") as e:
        pins.Record.from_json(doc, "/sys/fs/bpf/xdpguard/host/eth1")
    assert f"this one reads {C.XG_LAYOUT_VERSION}" in str(e.value)


def test_unreadable_record_is_a_pin_error():
    doc = copy.deepcopy(OLD)
    doc["rules"] = [8]
    with pytest.raises(pins.PinError, match="unreadable record"):
        pins.Record.from_json(doc)


# ---------------------------------------------------------------- on bpffs

@pytest.fixture
def pinned(monkeypatch):
    """A pin directory with a meta map whose prog_id serves as a counter,
    under a root of its own: the lock is the root's, and xdpguard's own
    root is held for seconds by applies running elsewhere."""
    require_kernel()
    root = Path("/sys/fs/bpf") / f"xg-test-record-{os.getpid()}"
    pins.remove_dir(root)
    monkeypatch.setattr(pins, "ROOT", root)
    d = root / "host" / "eth1"
    d.mkdir(parents=True)
    try:
        fd = pins.create_meta(pins.Record.from_json(copy.deepcopy(OLD)))
        with bpfsys.closing_fd(fd):
            bpfsys.obj_pin(fd, str(d / "meta"))
        yield d
    finally:
        pins.remove_dir(root)


def _bump(directory: Path, n: int) -> None:
    def slow_increment(rec):
        time.sleep(0.005)      # between read and write: where an unlocked writer loses
        return replace(rec, prog_id=rec.prog_id + 1)
    for _ in range(n):
        pins.modify_record(directory, slow_increment)


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_concurrent_modifiers_lose_no_update(pinned, kind):
    # Not both at once: a process forked while a thread holds the lock
    # would hold it too (flock belongs to the open file, which fork shares).
    if kind == "threads":
        workers = [threading.Thread(target=_bump, args=(pinned, 8), daemon=True) for _ in range(3)]
    else:
        workers = [multiprocessing.get_context("fork").Process(target=_bump, args=(pinned, 8), daemon=True)
                   for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers)
    if kind == "processes":
        assert [p.exitcode for p in workers] == [0, 0, 0]
    assert pins.read_record(pinned).prog_id == OLD["prog_id"] + 24


@pytest.mark.kernel
def test_modify_record_under_the_lock_and_without_a_record(pinned):
    with pins.locked():        # apply and rollback hold it, then modify
        got = pins.modify_record(pinned, lambda r: replace(r, confirm=None))
    assert got.confirm is None and pins.read_record(pinned) == got
    with pytest.raises(pins.NotPinned):
        pins.modify_record(pinned.parent / "eth2", lambda r: r)


@pytest.mark.kernel
def test_pinned_record_of_another_layout_is_refused(pinned):
    pins.remove_dir(pinned)
    pinned.mkdir()
    fd = pins.create_meta(replace(pins.Record.from_json(copy.deepcopy(OLD)), layout=C.XG_LAYOUT_VERSION + 1))
    with bpfsys.closing_fd(fd):
        bpfsys.obj_pin(fd, str(pinned / "meta"))
    with pytest.raises(pins.PinError, match="another xdpguard version"):
        pins.read_record(pinned)
    with pytest.raises(pins.PinError):
        pins.modify_record(pinned, lambda r: r)
