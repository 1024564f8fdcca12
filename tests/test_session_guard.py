"""The test session's guard of the machine's own interfaces and of what
its labs leave behind, and the skip of a feature the kernel refuses
(tests/conftest.py). Snapshots, kernel log lines and leftovers are made up
here: no real interface is touched."""
from __future__ import annotations

import errno
import os

import pytest

import conftest
from conftest import iface_changes, promisc_switches, skip_refused

ETH0 = {"flags": 0x1003, "promiscuity": 0}
LO = {"flags": 0x9, "promiscuity": 0}


def test_same_snapshot_is_no_change():
    assert iface_changes({"eth0": ETH0, "lo": LO}, {"eth0": dict(ETH0), "lo": dict(LO)}) == []


def test_promiscuity_and_flags_changes_are_named():
    after = {"eth0": {"flags": 0x1103, "promiscuity": 1}, "lo": LO}
    assert iface_changes({"eth0": ETH0, "lo": LO}, after) == [
        "eth0: flags 0x1003 -> 0x1103", "eth0: promiscuity 0 -> 1"]


def test_gone_and_appeared_interfaces_are_named():
    assert iface_changes({"eth0": ETH0, "lo": LO}, {"lo": LO, "dummy0": ETH0}) == [
        "dummy0: appeared", "eth0: gone"]


def test_promisc_switches_of_host_interfaces_only():
    log = [
        "virtio_net virtio0 eth0: entered promiscuous mode",
        "virtio_net virtio0 eth0: left promiscuous mode",
        "device eth1 entered promiscuous mode",          # older kernels' wording
        "xgtab12cd34a: entered promiscuous mode",         # a test's veth
        "myeth0: entered promiscuous mode",                # another name ending alike
        "eth0: link up",
    ]
    assert promisc_switches(log, {"eth0", "eth1", "lo"}) == log[:3]
    assert promisc_switches(log, set()) == []


def test_session_fails_on_a_change(monkeypatch, tmp_path):
    """pytest_sessionfinish turns a passing session into a failing one and
    keeps the lines for the summary."""
    class Session:
        exitstatus = pytest.ExitCode.OK
    monkeypatch.setattr(conftest, "_machine", {"ifaces": {"eth0": ETH0}})
    monkeypatch.setattr(conftest, "host_ifaces", lambda: {"eth0": {"flags": 0x1103, "promiscuity": 1}})
    monkeypatch.setattr(conftest, "_STATE", str(tmp_path / "state"))
    monkeypatch.setattr(conftest, "_OWN_CREATED", False)      # the session's own log stays
    monkeypatch.setattr(conftest, "_leaks", lambda: [])
    s = Session()
    conftest.pytest_sessionfinish(s, s.exitstatus)
    assert s.exitstatus == pytest.ExitCode.TESTS_FAILED
    assert conftest._machine["problems"] == ["eth0: flags 0x1003 -> 0x1103", "eth0: promiscuity 0 -> 1"]


@pytest.mark.parametrize("ci", [False, True])
def test_skip_refused_names_feature_and_errno_also_in_ci(monkeypatch, ci):
    monkeypatch.setattr(conftest, "IN_CI", ci)
    skip_refused("BPF_F_TEST_XDP_LIVE_FRAMES", None)     # accepted: no skip
    with pytest.raises(pytest.skip.Exception, match="kernel refuses BPF_F_TEST_XDP_LIVE_FRAMES: EPERM"):
        skip_refused("BPF_F_TEST_XDP_LIVE_FRAMES", errno.EPERM)


def test_session_fails_on_leftovers_of_its_own_namespaces(monkeypatch, tmp_path):
    """A namespace name the session's labs logged whose pins and state
    survived: the session fails, names them and removes them; another
    run's (not logged) is left alone."""
    import testing.lab
    from xdpguard import bans
    monkeypatch.setattr(testing.lab, "PIN_ROOT", tmp_path / "pins")
    monkeypatch.setattr(bans, "STATE_ROOT", tmp_path / "state")
    monkeypatch.setattr(testing.lab, "CREATED", [])
    log = tmp_path / "created"
    log.write_text("xgfa11ed0-srv\n")
    monkeypatch.setenv(conftest._CREATED_LOG, str(log))
    monkeypatch.setattr(conftest, "_OWN_CREATED", False)
    monkeypatch.setattr(conftest, "_OWN_STATE", False)
    monkeypatch.setattr(conftest, "_machine", {})
    ours, theirs = "xgfa11ed0-srv", "xgfa11ed1-srv"
    for root in ("pins", "state"):
        for ns in (ours, theirs):
            os.makedirs(tmp_path / root / ns / "xgfa11ed0s")

    class Session:
        exitstatus = pytest.ExitCode.OK
    s = Session()
    conftest.pytest_sessionfinish(s, s.exitstatus)
    assert s.exitstatus == pytest.ExitCode.TESTS_FAILED
    assert conftest._machine["leaks"] == [f"pins of namespace {ours} left: {tmp_path / 'pins' / ours}",
                                          f"state of namespace {ours} left: {tmp_path / 'state' / ours}"]
    assert sorted(os.listdir(tmp_path / "pins")) == sorted(os.listdir(tmp_path / "state")) == [theirs]


@pytest.mark.kernel
def test_veth_pair_takes_its_pins_and_state_along(monkeypatch, tmp_path):
    """What xdpguard keeps of a namespace outlives it: the pair's close()
    removes that too, also when the test inside failed before detaching."""
    from testing.lab import PIN_ROOT, VethPair, leftovers
    from xdpguard import bans
    monkeypatch.setattr(bans, "STATE_ROOT", tmp_path / "state")
    with pytest.raises(RuntimeError):
        with VethPair("xgsg", split=False) as v:
            ns = v.name
            os.makedirs(PIN_ROOT / ns / v.a)
            os.makedirs(bans.STATE_ROOT / ns / v.a)
            assert [w for w, _n, _p in leftovers([ns])] == ["namespace", "pins", "state"]
            raise RuntimeError("the test failed")
    assert leftovers([ns]) == []
