"""Shared fixtures. Kernel tests need root, bcc and bpffs: they skip on a
developer machine without them, and FAIL in CI (CI=true), where a skipped
kernel test would hide a broken data plane. One exception: a kernel that
explicitly refuses an optional feature skips its tests, in CI too
(skip_refused).

The session fails if the machine's own interfaces changed while it ran
(host_ifaces, pytest_sessionfinish), or if a namespace it made, or that
namespace's xdpguard pins or state, survived it (_leaks)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Daemon and ban state of the tests' xdpguard runs stays out of /var/lib.
# Test modules import this file a second time (as tests.conftest): only the
# first import makes the directory, and the session's end removes it.
_OWN_STATE = "XDPGUARD_STATE_DIR" not in os.environ
if _OWN_STATE:
    os.environ["XDPGUARD_STATE_DIR"] = tempfile.mkdtemp(prefix="xdpguard-test-state-")
_STATE = os.environ["XDPGUARD_STATE_DIR"]

# The namespaces this session's labs make, also in processes it starts
# (testing.lab writes them here): none may survive it, nor their pins and
# state (_leaks). Compared by name: other runs on the machine make their own.
_CREATED_LOG = "XDPGUARD_TEST_CREATED"
_OWN_CREATED = _CREATED_LOG not in os.environ
if _OWN_CREATED:
    _fd, os.environ[_CREATED_LOG] = tempfile.mkstemp(prefix="xdpguard-test-created-")
    os.close(_fd)


# ---- the machine's own interfaces stay as they were -----------------------
#
# Every test works in namespaces it makes. The session records the flags and
# promiscuity of the interfaces of its own network namespace (the machine's,
# veths aside: those are the tests' own) and fails if they differ at the
# end, or if the kernel logged a promiscuous-mode switch of one meanwhile
# (a switch and its undo leave no other trace).

_PROMISC_LOG = re.compile(r"(\S+?):? (entered|left) promiscuous mode")


def host_ifaces() -> dict[str, dict]:
    """flags (sysfs) and promiscuity of every interface of this namespace
    that is not a veth."""
    r = subprocess.run(["ip", "-d", "-j", "link", "show"], capture_output=True, text=True, timeout=30)
    out = {}
    for link in json.loads(r.stdout or "[]"):
        if (link.get("linkinfo") or {}).get("info_kind") == "veth":
            continue
        name = link["ifname"]
        try:
            with open(f"/sys/class/net/{name}/flags") as f:
                flags = int(f.read(), 16)
        except OSError:
            continue        # gone while we looked
        out[name] = {"flags": flags, "promiscuity": link.get("promiscuity")}
    return out


def iface_changes(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """What differs between two host_ifaces() snapshots, one line each."""
    out = []
    for name in sorted(before.keys() | after.keys()):
        b, a = before.get(name), after.get(name)
        if a is None:
            out.append(f"{name}: gone")
        elif b is None:
            out.append(f"{name}: appeared")
        else:
            out += [f"{name}: {k} {b[k]:#x} -> {a[k]:#x}" if k == "flags" else f"{name}: {k} {b[k]} -> {a[k]}"
                    for k in sorted(b) if b[k] != a.get(k)]
    return out


def promisc_switches(messages: list[str], names) -> list[str]:
    """Kernel log messages that switch one of `names` into or out of
    promiscuous mode ("<driver> <bus> eth0: entered promiscuous mode",
    older "device eth0 entered promiscuous mode")."""
    names = set(names)
    return [m for m in messages if (x := _PROMISC_LOG.search(m)) and x.group(1) in names]


def _kmsg_open() -> int | None:
    """/dev/kmsg positioned after the last record (None if unreadable)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def _kmsg_read(fd: int) -> list[str]:
    """The messages logged since _kmsg_open (one read is one record)."""
    out = []
    while True:
        try:
            rec = os.read(fd, 8192)
        except BlockingIOError:
            return out
        except BrokenPipeError:
            continue        # records overwritten before we read them: go on
        if not rec:
            return out
        out.append(rec.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])


_machine: dict = {}


def _terminated(signum, _frame):
    # A run killed with SIGTERM (`timeout`, a CI runner) tears down like
    # Ctrl-C: fixtures remove their namespaces. A second SIGTERM kills.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def created_names() -> list[str]:
    """The namespaces this session's labs made (this process's and those
    its children logged)."""
    names = []
    if "testing.lab" in sys.modules:
        names += sys.modules["testing.lab"].CREATED
    try:
        with open(os.environ[_CREATED_LOG]) as f:
            names += f.read().split()
    except (KeyError, OSError):
        pass
    return list(dict.fromkeys(names))


def _leaks() -> list[str]:
    """What of the session's namespaces is left (namespace, pins, state),
    removed now, one line each."""
    names = created_names()
    if not names:
        return []
    from testing.lab import leftovers
    out = []
    for what, ns, path in leftovers(names):
        if what == "namespace":
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            out.append(f"namespace {ns} left" + (f" with processes {' '.join(pids)}" if pids else ""))
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        else:
            out.append(f"{what} of namespace {ns} left: {path}")
            shutil.rmtree(path, ignore_errors=True)
    return out


def pytest_sessionstart(session):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        _machine["ifaces"] = host_ifaces()
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        _machine["unchecked"] = f"cannot list interfaces: {e}"
    _machine["kmsg"] = _kmsg_open()


@pytest.hookimpl(trylast=True)      # after pytest's own, which tears the fixtures down
def pytest_sessionfinish(session, exitstatus):
    leaks = _leaks()
    if leaks:
        _machine["leaks"] = leaks
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _OWN_STATE:
        shutil.rmtree(_STATE, ignore_errors=True)
    if _OWN_CREATED:
        try:
            os.unlink(os.environ[_CREATED_LOG])
        except OSError:
            pass
    before, fd = _machine.get("ifaces"), _machine.pop("kmsg", None)
    if before is None:
        return
    problems = iface_changes(before, host_ifaces())
    if fd is not None:
        try:
            problems += [f"kernel log: {m}" for m in promisc_switches(_kmsg_read(fd), before)]
        finally:
            os.close(fd)
    if problems:
        _machine["problems"] = problems
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _machine.get("leaks"):
        terminalreporter.section("the session left namespaces, pins or state behind (removed now)", red=True)
        for p in _machine["leaks"]:
            terminalreporter.line(p, red=True)
    if _machine.get("problems"):
        terminalreporter.section("the machine's own interfaces changed during the session", red=True)
        for p in _machine["problems"]:
            terminalreporter.line(p, red=True)
    elif _machine.get("unchecked"):
        terminalreporter.line(f"interfaces not checked: {_machine['unchecked']}", yellow=True)


def skip_refused(feature: str, err: int | None) -> None:
    """Skip because the kernel refused an optional feature with errno `err`
    (no-op when err is None). The one skip also taken under CI: the
    kernel's explicit answer, which no setup of the machine changes, and a
    skip that names it, not a hidden failure."""
    if err is not None:
        pytest.skip(f"kernel refuses {feature}: {errno.errorcode.get(err, err)}")


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


def require_lab(*tools: str) -> None:
    """What a lab test needs: the kernel, and these tools."""
    require_kernel()
    for name in tools:
        require_tool(name)


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
    """The blocklist data (testing.blocklists)."""
    from testing.blocklists import BLOCKLISTS as d
    if not d.is_dir():
        if IN_CI:
            pytest.fail(f"blocklist data missing at {d} (set XDPGUARD_BLOCKLISTS)", pytrace=False)
        pytest.skip("blocklist data not found")
    return d
