"""Times and log lines the way an operator's other tools write them.

Every time xdpguard prints (watch lines, `log`, `status`, `bans`, JSON) is
RFC 3339 with an explicit offset, from rfc3339(): UTC unless
XDPGUARD_TIME=local asks for the local zone. JSON keeps epoch seconds
beside each such time.

When standard error is the journal (systemd sets JOURNAL_STREAM to the
device and inode of the stream it connected), lines carry a syslog
priority prefix (`<4>`) that journald turns into the entry's priority,
and no time of their own: the journal stamps every entry.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

ERROR, WARNING, NOTICE, INFO = 3, 4, 5, 6


def _local() -> bool:
    # Read at each call: a test, or a long-running watch, sees a change.
    return os.environ.get("XDPGUARD_TIME", "utc").lower() == "local"


def rfc3339(seconds: float | None, digits: int = 0) -> str | None:
    """Epoch seconds as RFC 3339 with offset, e.g. 2026-12-07T03:40:09+00:00;
    digits: decimals of the second (0, 3 or 6), truncated. None stays None."""
    if seconds is None:
        return None
    # One number, rounded to the microsecond once: the fraction and the
    # seconds cannot disagree (a float's noise would make .123456 .123455).
    whole, frac = divmod(round(seconds * 1_000_000), 1_000_000)
    t = datetime.fromtimestamp(whole, timezone.utc)
    if _local():
        t = t.astimezone()
    text = t.isoformat(timespec="seconds")
    if digits:
        # isoformat ends in +HH:MM; the fraction goes before it.
        text = f"{text[:19]}.{frac // 10 ** (6 - digits):0{digits}d}{text[19:]}"
    return text


def journal_stream(stream) -> bool:
    """Whether stream is the one systemd connected to the journal
    (JOURNAL_STREAM=dev:ino names it; stdout and stderr may differ)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = want.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False     # not a file (a test's StringIO), or closed
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def syslog_prefix(priority: int, journal: bool) -> str:
    """The syslog priority prefix of a line for the journal, else nothing."""
    return f"<{priority}>" if journal else ""
