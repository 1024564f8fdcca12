"""Bans survive what empties the pins (a reboot, a detach): the records in
the state directory put the unexpired ones back, with the time they have
left, when a policy is applied on new ban maps and when `watch` starts.

The planning is checked alone; the rest on the real CLI in a veth lab
(testing/lab.py) with real packets: ping from a banned address must not get
through, from an unbanned one it must.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from testing.lab import CLIENT4, EXTRA4, EXTRA6, REPO, SERVER4, SERVER6, Lab
from testing.webpolicy import web_policy
from xdpguard import bans
from xdpguard.bans import BanRecord, plan_restore
from xdpguard.layout import C

NOW = 1_800_000_000.0


# ---------------------------------------------------------------- planning

def test_record_round_trip_and_older_records():
    r = BanRecord("credential stuffing", C.XG_BAN_MANUAL, NOW, None)
    assert BanRecord.from_json(json.loads(json.dumps(r.as_json()))) == r
    r = BanRecord("syn_rate 900/s > 200/s", C.XG_BAN_SYN_RATE, NOW, NOW + 60)
    assert BanRecord.from_json(r.as_json()) == r
    # Before records kept expiry: reason text and time only.
    old = BanRecord.from_json({"reason": "conn_rate 80/s > 40/s", "since": NOW})
    assert (old.code, old.expiry_known) == (C.XG_BAN_CONN_RATE, False)
    assert BanRecord.from_json({"reason": "manual", "since": NOW}).code == C.XG_BAN_MANUAL


def _rec(code=C.XG_BAN_MANUAL, expires=None, known=True):
    return BanRecord("x", code, NOW - 10, expires, known)


def test_plan_keeps_unexpired_drops_expired_protected_and_over_max_bans():
    import ipaddress
    records = {
        "192.0.2.1/32": _rec(),                                        # manual, permanent
        "192.0.2.2/32": _rec(expires=NOW + 5),                         # manual, 5 s left
        "192.0.2.3/32": _rec(expires=NOW - 1),                         # expired
        "198.51.100.1/32": _rec(C.XG_BAN_SYN_RATE, NOW + 7200),        # automatic, 2 h
        "198.51.100.2/32": _rec(C.XG_BAN_PPS, NOW + 60),               # automatic, 1 min
        "198.51.100.3/32": _rec(C.XG_BAN_PPS, NOW + 30, known=False),  # older record, in watch.json
        "198.51.100.4/32": _rec(C.XG_BAN_PPS, known=False),            # older record, not there
        "203.0.113.0/24": _rec(expires=NOW + 60),                      # covers an allowlisted address
        "2001:db8::/64": _rec(C.XG_BAN_BPS, NOW + 60),
    }
    protected = [(ipaddress.ip_network("203.0.113.9/32"), "allowlisted in [mitigation] allow")]
    order, done = plan_restore(records, {"198.51.100.3/32": NOW + 30}, NOW, protected, max_bans=4)
    # Manual bans first (no limit applies to them), then automatic ones by
    # time left while the total stays under max_bans.
    assert [p for p, _ in order] == ["192.0.2.1/32", "192.0.2.2/32", "198.51.100.1/32",
                                     "198.51.100.2/32"]
    assert dict(order)["192.0.2.1/32"].expires is None
    assert done.expired == ["192.0.2.3/32"]
    assert done.unknown == ["198.51.100.4/32"]
    assert done.refused == {
        "203.0.113.0/24": "covers 203.0.113.9/32, allowlisted in [mitigation] allow",
        "198.51.100.3/32": "max_bans (4) reached",
        "2001:db8::/64": "max_bans (4) reached"}
    # The older record takes watch.json's end when it is restored.
    order, _ = plan_restore(records, {"198.51.100.3/32": NOW + 30}, NOW, [], max_bans=100)
    assert dict(order)["198.51.100.3/32"] == BanRecord("x", C.XG_BAN_PPS, NOW - 10, NOW + 30)


def test_restore_line():
    from pathlib import Path
    done = bans.Restored(["192.0.2.1/32", "192.0.2.2/32"], ["192.0.2.3/32"],
                         {"203.0.113.0/24": "covers 203.0.113.9/32, allowlisted"}, [])
    assert done.line("eth1", Path("/var/lib/xdpguard/host/eth1/bans.json")) == (
        "eth1: restored 2 bans from /var/lib/xdpguard/host/eth1/bans.json; dropped 1 expired, "
        "203.0.113.0/24 (covers 203.0.113.9/32, allowlisted)")


# ---------------------------------------------------------------- the lab

MANUAL_FOREVER, MANUAL_HOUR, AUTOMATIC, EXPIRED, ALLOWED_LATER = EXTRA4[0:5]
MANUAL6 = EXTRA6[0]

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from tests.conftest import require_kernel
    require_kernel()
    # Bans, watch state and every xdpguard the tests start share one state
    # directory of this module's own.
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDPGUARD_STATE_DIR", str(state))
        mp.setattr(bans, "STATE_ROOT", state)
        with Lab() as lab:
            yield lab


def _policy(lab, name, allow=()):
    return lab.write_policy(name, web_policy(name, syn_rate="100k/s", allow=[f"{a}/32" for a in allow]))


def _where(lab):
    return ["--iface", lab.server_if, "--netns", lab.server_ns]


def _bans(lab) -> dict:
    cp = lab.xdpguard("bans", *_where(lab), "--json")
    return {b["prefix"]: b for b in json.loads(cp.stdout)["bans"]}


def _gets_through(lab, src) -> bool:
    """Whether one of three pings from src (a client address) is answered."""
    dst = SERVER6 if ":" in src else SERVER4
    cp = lab.run("client", ["ping", "-6" if ":" in src else "-4", "-n", "-q", "-c", "3", "-i", "0.2",
                            "-W", "1", "-I", src, dst], timeout=30)
    return cp.returncode == 0


def _ban_all(lab):
    """The bans of the first policy: manual ones through the CLI, an
    automatic one as `watch` makes it (ban map + bans.json, and its
    offence in watch.json through watch's own writer), and one that has
    run out by the time of the next apply."""
    import ipaddress
    from xdpguard import pins
    from xdpguard.daemon import Watch
    lab.xdpguard("ban", MANUAL_FOREVER, "--ttl", "0", *_where(lab))
    lab.xdpguard("ban", MANUAL_HOUR, "--ttl", "1h", "--reason", "scanner", *_where(lab))
    lab.xdpguard("ban", MANUAL6, "--ttl", "1h", *_where(lab))
    lab.xdpguard("ban", ALLOWED_LATER, "--ttl", "1h", *_where(lab))
    directory = pins.iface_dir(lab.server_ns, lab.server_if)
    with pins.locked():
        rec = pins.read_record(directory)
        with bans.BanMaps(directory, rec) as bm:
            bm.add(ipaddress.ip_network(f"{AUTOMATIC}/32"), 7200, C.XG_BAN_SYN_RATE, "syn_rate 900/s > 200/s")
            bm.add(ipaddress.ip_network(f"{EXPIRED}/32"), 1e-3, C.XG_BAN_PPS, "pps 30000/s > 20000/s")
    state = {"offenders": {f"{AUTOMATIC}/32": {"offences": 1, "last_ban": time.time()}},
             "bans": {f"{AUTOMATIC}/32": {"until": time.time() + 7200, "metric": "syn_rate", "offence": 1},
                      f"{EXPIRED}/32": {"until": time.time() - 1, "metric": "pps", "offence": 1}}}
    Watch._save_state(bans.watch_state_path(lab.server_ns, lab.server_if), state)
    assert not _gets_through(lab, MANUAL_FOREVER)


RESTORED = {f"{MANUAL_FOREVER}/32", f"{MANUAL_HOUR}/32", f"{AUTOMATIC}/32", f"{MANUAL6}/128"}


def _check_in_force(lab):
    got = _bans(lab)
    assert set(got) == RESTORED, got
    assert got[f"{MANUAL_FOREVER}/32"]["remaining_s"] is None           # still permanent
    assert 3000 < got[f"{MANUAL_HOUR}/32"]["remaining_s"] <= 3600
    assert got[f"{MANUAL_HOUR}/32"]["reason"] == "scanner"
    auto = got[f"{AUTOMATIC}/32"]
    assert (auto["source"], auto["metric"]) == ("metric", "syn_rate") and 6600 < auto["remaining_s"] <= 7200
    records = json.loads((bans.state_dir(lab.server_ns, lab.server_if) / "bans.json").read_text())
    assert set(records) == RESTORED          # the expired and the refused are dropped
    # Real packets: the restored bans drop them, others pass.
    for src in (MANUAL_FOREVER, MANUAL_HOUR, AUTOMATIC, MANUAL6):
        assert not _gets_through(lab, src), f"{src} is banned but got through"
    assert _gets_through(lab, CLIENT4)
    assert _gets_through(lab, EXPIRED)


def test_bans_come_back_after_detach_and_apply(lab):
    lab.detach(check=False)
    lab.apply(_policy(lab, "before"))
    _ban_all(lab)
    lab.detach()
    assert _gets_through(lab, MANUAL_FOREVER)            # the pins, and the bans, are gone
    # The next policy allowlists a banned address: that ban stays out.
    cp = lab.xdpguard("apply", _policy(lab, "after", allow=[ALLOWED_LATER]), *_where(lab))
    line = [ln for ln in cp.stdout.splitlines() if "restored" in ln]
    assert len(line) == 1 and "restored 4 bans" in line[0] and "1 expired" in line[0], cp.stdout
    assert f"{ALLOWED_LATER}/32 (covers {ALLOWED_LATER}/32, allowlisted" in line[0]
    _check_in_force(lab)
    assert not _gets_through(lab, MANUAL_FOREVER) and _gets_through(lab, ALLOWED_LATER)
    # A re-apply on ban maps that hold bans changes nothing.
    cp = lab.xdpguard("apply", _policy(lab, "again", allow=[ALLOWED_LATER]), *_where(lab))
    assert "restored" not in cp.stdout and set(_bans(lab)) == RESTORED


def test_watch_start_restores(lab):
    lab.detach(check=False)
    lab.apply(_policy(lab, "before"))
    _ban_all(lab)
    lab.detach()
    # An apply that does not see the state (another state directory) leaves
    # the new ban maps empty: watch, which does see it, fills them.
    policy = _policy(lab, "watched", allow=[ALLOWED_LATER])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDPGUARD_STATE_DIR", str(lab.dir / "another-state"))
        lab.apply(policy)
    assert _bans(lab) == {}
    p = subprocess.Popen([*lab.xg, "watch", str(policy), *_where(lab), "--interval", "0.5s", "--json"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         start_new_session=True)
    err: list[str] = []
    ready = threading.Event()

    def read():
        for ln in p.stderr:
            err.append(ln)
            if "watching" in ln:
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "watch did not start: " + "".join(err)
        line = [ln for ln in err if "restored" in ln]
        assert len(line) == 1 and "restored 4 bans" in line[0], err
        _check_in_force(lab)
        # watch.json keeps only automatic bans in force; offences stay.
        state = json.loads(bans.watch_state_path(lab.server_ns, lab.server_if).read_text())
        assert set(state["bans"]) == {f"{AUTOMATIC}/32"}
        assert state["offenders"][f"{AUTOMATIC}/32"]["offences"] == 1
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        lab.detach(check=False)
