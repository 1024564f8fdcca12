"""Shared fixtures. Kernel tests need root, bcc and bpffs: they skip on a
developer machine without them, and FAIL in CI (CI=true), where a skipped
kernel test would hide a broken data plane."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Daemon and ban state of the tests' xdpguard runs stays out of /var/lib.
_STATE = tempfile.mkdtemp(prefix="xdpguard-test-state-")
os.environ.setdefault("XDPGUARD_STATE_DIR", _STATE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (python3-bpfcc) is not importable"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf"
    return None


def require_kernel() -> None:
    why = _kernel_unavailable()
    if why:
        if IN_CI:
            pytest.fail(f"kernel test cannot run in CI: {why}", pytrace=False)
        pytest.skip(why)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        if IN_CI:
            pytest.fail(f"{name} is missing in CI (scripts/setup.sh installs it)", pytrace=False)
        pytest.skip(f"{name} not installed")
    return path


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("kernel") or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.usefixtures("_kernel_guard"))


@pytest.fixture
def _kernel_guard():
    require_kernel()


@pytest.fixture(scope="session")
def policies_dir():
    from pathlib import Path
    return Path(__file__).resolve().parent.parent / "policies"


@pytest.fixture(scope="session")
def blocklists_dir():
    """The bench's blocklists (bench.common.BLOCKLISTS)."""
    from bench.common import BLOCKLISTS as d
    if not d.is_dir():
        if IN_CI:
            pytest.fail(f"blocklist data missing at {d} (set XDPGUARD_BLOCKLISTS)", pytrace=False)
        pytest.skip("blocklist data not found")
    return d
