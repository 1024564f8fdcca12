"""The probe set in use is the one this machine should give. The VM guests
(vm/run.py) set XDPGUARD_EXPECT_PROBES=kprobe: Debian's kernels have
kprobes, so there the feedback loop must run on the kprobe set; elsewhere
the set follows what the kernel offers."""
from __future__ import annotations

import os

import pytest

from xdpguard.probes import detect
from xdpguard.probes.collector import ProbeSet

pytestmark = pytest.mark.kernel


def expected_mode() -> str:
    want = os.environ.get("XDPGUARD_EXPECT_PROBES")
    return want or ("kprobe" if detect.kprobes_available() else "tracepoint")


def test_expected_set():
    ps = ProbeSet.open("auto")
    try:
        assert ps.mode == expected_mode()
    finally:
        ps.close()
