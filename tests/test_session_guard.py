"""The test session's guard of the machine's own interfaces, and the skip
of a feature the kernel refuses (tests/conftest.py). Snapshots and kernel
log lines are made up here: no real interface is touched."""
from __future__ import annotations

import errno

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
