"""Run-time detection of the kernel's probing facilities.

Never by kernel version: a kernel may be built without kprobes
(CONFIG_KPROBES off) whatever its version, tracefs may be unmounted, a
symbol may be renamed or hidden. Everything here looks at what the running
kernel actually exposes.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import os

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
TRACEPOINT_PMU = "/sys/bus/event_source/devices/tracepoint"
KALLSYMS = "/proc/kallsyms"

# Tracepoints the tracepoint set uses (category, event).
TRACEPOINT_EVENTS = (
    ("sock", "inet_sock_set_state"),
    ("tcp", "tcp_retransmit_synack"),
    ("tcp", "tcp_receive_reset"),
    ("tcp", "tcp_send_reset"),
)


def tracefs_dir() -> str | None:
    """The mounted tracefs (the directory that has events/), or None."""
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def ensure_tracefs() -> str | None:
    """Mount tracefs on /sys/kernel/tracing if it is not mounted anywhere.

    bcc compiles TRACEPOINT_PROBE programs from the format files under
    tracefs, so the tracepoint set needs it. Returns the tracefs directory,
    or None when it is not mounted and cannot be (not root, no tracefs).
    """
    d = tracefs_dir()
    if d is not None:
        return d
    target = TRACEFS_DIRS[0]
    if not os.path.isdir(target):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p)
    if libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EBUSY,):
            return None
    return tracefs_dir()


def kprobes_available() -> bool:
    """Whether kprobes can be attached on this kernel.

    bcc attaches a kprobe through the perf "kprobe" PMU (kernel >= 4.17)
    or, failing that, through tracefs's kprobe_events; a kernel without
    CONFIG_KPROBES (or without CONFIG_KPROBE_EVENTS) has neither.
    """
    if os.path.isdir(KPROBE_PMU):
        return True
    for d in TRACEFS_DIRS:
        if os.path.exists(os.path.join(d, "kprobe_events")):
            return True
    return False


def tracepoint_exists(category: str, event: str) -> bool:
    d = tracefs_dir()
    return d is not None and os.path.exists(
        os.path.join(d, "events", category, event, "format"))


def tracepoint_format(category: str, event: str) -> str | None:
    d = tracefs_dir()
    if d is None:
        return None
    try:
        with open(os.path.join(d, "events", category, event, "format")) as f:
            return f.read()
    except OSError:
        return None


def tracepoints_available(mount: bool = True) -> bool:
    """Whether the tracepoint set can be compiled and attached.

    Needs the tracepoint PMU (CONFIG_TRACEPOINTS + perf events) and tracefs
    with the sock:inet_sock_set_state event (mounted on demand when
    ``mount``); the other events are optional, see ``missing_tracepoints``.
    """
    if not os.path.isdir(TRACEPOINT_PMU):
        return False
    if (ensure_tracefs() if mount else tracefs_dir()) is None:
        return False
    return tracepoint_exists("sock", "inet_sock_set_state")


def missing_tracepoints() -> list[str]:
    return ["%s:%s" % ce for ce in TRACEPOINT_EVENTS if not tracepoint_exists(*ce)]


def raw_tracepoints_available() -> bool:
    try:
        from bcc import BPF
    except ImportError:  # pragma: no cover - bcc is a hard dependency here
        return False
    return bool(BPF.support_raw_tracepoint())


def function_ranges(names, path: str = KALLSYMS) -> dict[str, tuple[int, int]]:
    """[start, end) of the kernel text symbols ``names`` from /proc/kallsyms.

    The end is the next symbol's address. A name that is missing, or all of
    them when addresses are hidden (kptr_restrict, not root), is absent from
    the result. Module symbols count.
    """
    wanted = set(names)
    starts: dict[str, int] = {}
    addrs = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                addr = int(parts[0], 16)
                addrs.append(addr)
                if parts[2] in wanted and parts[1] in ("t", "T") and addr:
                    starts.setdefault(parts[2], addr)
    except OSError:
        return {}
    addrs.sort()
    out = {}
    for name, start in starts.items():
        i = bisect.bisect_right(addrs, start)
        if i < len(addrs):
            out[name] = (start, addrs[i])
    return out
