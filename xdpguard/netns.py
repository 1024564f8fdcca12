"""Network namespace helpers (named namespaces of /run/netns, as `ip netns`).

setns(2) moves only the calling *thread*: everything that resolves an
ifindex or opens a netlink socket (bpfsys.xdp_attach / xdp_query,
prog_test_run with live frames) must run inside ``in_netns`` in the same
thread. BPF objects themselves (program and map fds, pins) belong to no
namespace.

Never ``ip netns exec`` for BPF work: it remounts /sys and so hides bpffs.
"""
from __future__ import annotations

import os
import re
import socket
from contextlib import contextmanager
from typing import Iterator

from xdpguard.errors import NetnsError  # noqa: F401 (re-exported)

NETNS_DIR = "/run/netns"
HOST = "host"  # the name xdpguard uses for the initial namespace
IFNAMSIZ = 16  # kernel limit including the NUL: 15 characters
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_NETNS_NAME_MAX = 255  # a file name in /run/netns



def check_name(name: str, kind: str = "netns") -> str:
    """Validate a netns name (kind "netns") or an interface name ("iface").

    Allowed: [A-Za-z0-9_.-], not "." or ".."; interfaces at most 15
    characters. Returns name; raises ValueError.
    """
    if kind not in ("netns", "iface"):
        raise ValueError(f"unknown name kind {kind!r}")
    what = "network namespace" if kind == "netns" else "interface"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty string, not {name!r}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use only letters, digits, '_', '.' and '-'"
        )
    if name in (".", ".."):
        raise ValueError(f"invalid {what} name {name!r}")
    limit = IFNAMSIZ - 1 if kind == "iface" else _NETNS_NAME_MAX
    if len(name) > limit:
        raise ValueError(f"{what} name {name!r} is longer than {limit} characters")
    return name


def is_host(name: str | None) -> bool:
    """None and "host" mean the namespace we started in."""
    return name is None or name == HOST


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, check_name(name))


def exists(name: str | None) -> bool:
    return is_host(name) or os.path.exists(netns_path(name))


CLONE_NEWNET = 0x40000000


def _setns(fd: int, what: str) -> None:
    # libc's setns(2): Python 3.11 has no os.setns, and pyroute2.netns
    # (which wraps the same call) costs 0.15-0.2 s to import, a fifth of
    # a re-apply.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"cannot enter network namespace {what}: {os.strerror(err)}")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with the calling thread in /run/netns/NAME.

    The thread's own namespace (/proc/thread-self, not /proc/self: setns
    is per thread) is restored on exit, also on error. None or "host":
    no-op. Missing namespace: NetnsError.
    """
    if is_host(name):
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name!r} does not exist ({path})") from None
    except OSError as e:
        raise NetnsError(f"cannot open network namespace {name!r} ({path}): {e.strerror}") from e
    try:
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, repr(name))
            try:
                yield
            finally:
                _setns(orig, "of origin (restoring)")
        finally:
            os.close(orig)
    finally:
        os.close(target)


def ifindex(iface: str, netns: str | None = None) -> int:
    """ifindex of iface in netns (None / "host": the current namespace)."""
    check_name(iface, "iface")
    with in_netns(netns):
        try:
            return socket.if_nametoindex(iface)
        except OSError:
            where = "the host namespace" if is_host(netns) else f"network namespace {netns!r}"
            raise NetnsError(f"no interface {iface!r} in {where}") from None


def call_in_new_netns(fn):
    """fn() in a new network namespace (nothing in it but a down lo), run
    in a thread of its own so that the namespace goes when fn returns:
    for work that must not reach this host's interfaces, such as live XDP
    test frames. Returns fn's result or raises its exception."""
    import ctypes
    import threading
    out: dict = {}

    def run():
        try:
            # unshare(2) moves only this thread, as setns(2) does.
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise NetnsError(f"cannot make a network namespace: {os.strerror(ctypes.get_errno())}")
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, name="xdpguard-newns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")
