"""What every command of the CLI shares: exit codes, the usage error,
name checks, the --netns argument, applied interfaces, tables and JSON.

Command modules import this, never xdpguard.cli (which imports them).
"""
from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager

# The one time format (RFC 3339, UTC unless XDPGUARD_TIME=local), for the
# command modules that take their helpers from here.
from xdpguard.logline import WARNING, journal_stream, rfc3339, syslog_prefix  # noqa: F401

EXIT_OK, EXIT_SYSTEM, EXIT_USAGE, EXIT_NOT_CONFIRMED = 0, 1, 2, 3


class CliError(Exception):
    """A message for the operator and the exit status (default: usage, 2)."""

    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


def interruptible() -> None:
    """SIGINT ends this command with KeyboardInterrupt (130, as the man page
    says) also when it was started with SIGINT ignored: a non-interactive
    shell's `cmd &` starts it so, and Python then never raises it."""
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)


def duration_type(least: float = 0.0):
    """An argparse type: a duration as units.parse_duration reads it ("10m",
    "1h30m", a number of seconds), in seconds, at least `least`."""
    import argparse

    def parse(text: str) -> float:
        from xdpguard.units import format_duration, parse_duration
        try:
            s = parse_duration(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if s < least:
            raise argparse.ArgumentTypeError(f"{text!r} is shorter than {format_duration(least)}")
        return s
    parse.__name__ = "duration"
    return parse


def int_type(lo: int, hi: int):
    """An argparse type: an integer lo..hi."""
    import argparse

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{n} is out of range (expected {lo}..{hi})")
        return n
    parse.__name__ = "integer"
    return parse


def host_port(text: str) -> str:
    """An argparse type: HOST:PORT with a port 1..65535 (the text itself)."""
    import argparse
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT with a port 1..65535, "
                                         f"e.g. 127.0.0.1:9101")
    return text


def load_policy(path):
    from xdpguard.policy import load
    return load(path)


def warn(policy) -> None:
    """The policy's warnings on stderr (at warning priority in the journal)."""
    p = syslog_prefix(WARNING, journal_stream(sys.stderr))
    for w in policy.warnings:
        print(f"{p}warning: {w}", file=sys.stderr)


def netns_of(args) -> str | None:
    """--netns as the loader takes it: None for the host's namespace."""
    return None if args.netns in (None, "host") else args.netns


def check_names(args) -> None:
    """--iface and --netns, if given, are names the kernel could have."""
    from xdpguard.netns import check_name
    try:
        if getattr(args, "iface", None):
            check_name(args.iface, "iface")
        if getattr(args, "netns", None):
            check_name(args.netns, "netns")
    except ValueError as e:
        raise CliError(str(e))


def applied(args) -> list:
    """(pin directory, record) of each interface --iface / --netns select
    that xdpguard runs on; a usage error if there is none."""
    from xdpguard import pins, stats
    targets = stats.select(args.netns, args.iface)
    out = []
    for ns, ifc, d in targets:
        with still_applied(ns, ifc):
            rec = pins.read_record(d)
        if rec is not None:        # detached since it was listed
            out.append((d, rec))
    if not out:
        where = f" on {args.iface}" if args.iface else ""
        raise CliError(f"xdpguard is not applied{where} (see 'xdpguard status')")
    return out


@contextmanager
def still_applied(netns: str, iface: str):
    """For readers of the pins (stats, top): pins that went away while they
    read (a detach) end them with one line, not bpf_obj_get's error."""
    import errno
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        raise CliError(f"{netns}/{iface}: xdpguard is no longer applied there (detached?); "
                       "see 'xdpguard status'", EXIT_SYSTEM) from None


# ---------------------------------------------------------------- output

def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Plain aligned table; numeric columns (by index in right) align right.
    Cells may carry colour (paint): widths count what shows."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(_shown(r[i]) for r in cells) for i in range(len(headers))]
    right = right if right is not None else {i for i, c in enumerate(rows[0]) if isinstance(c, (int, float))} if rows else set()

    def pad(i: int, c: str, w: int) -> str:
        fill = " " * (w - _shown(c))
        return fill + c if i in right else c + fill
    return "\n".join("  ".join(pad(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in cells)


def emit_json(obj) -> None:
    """One JSON object on a line of its own (--json)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def human_duration(s: float) -> str:
    s = int(max(0, s))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


# ---------------------------------------------------------------- numbers

class Numbers:
    """How tables show counts, sizes and rates: at a glance by default
    (10.8k, 570 KiB, 4.6 Mbit/s: rates in bits per second, as thresholds
    and links are written), exact integers with --exact. JSON never goes
    through here: it always carries the exact numbers."""

    def __init__(self, exact: bool = False):
        self.exact = exact

    def count(self, n: float) -> str:
        """Packets, entries, events: 950, 10.8k, 1.2M."""
        return str(int(n)) if self.exact else _si(n, "")

    def rate(self, per_second: float) -> str:
        """Packets or events per second: 0.8, 950, 10.8k (exact: one decimal)."""
        return f"{per_second:.1f}" if self.exact else _si(per_second, "")

    def size(self, n: float) -> str:
        """Bytes: 512 B, 570 KiB, 5.6 MiB (exact: the integer)."""
        if self.exact:
            return str(int(n))
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            # Three digits at most: 1009 KiB is 0.99 MiB, shown 1.0 MiB.
            if abs(n) < 999.5 or unit == "TiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{_digits(n)} {unit}"
            n /= 1024
        return str(n)

    def bits(self, bytes_per_second: float) -> str:
        """A byte rate in bits per second: 4.6 Mbit/s (exact: integer bit/s)."""
        b = bytes_per_second * 8
        return f"{round(b)} bit/s" if self.exact else f"{_si(b, ' ')}bit/s"


def _digits(n: float) -> str:
    """One decimal below 100 (10.8, 4.6), none from 100 (570)."""
    return f"{n:.1f}" if abs(n) < 99.95 else f"{n:.0f}"


def _si(n: float, sep: str) -> str:
    """n with k, M, G, T (powers of 1000); below 1000 an integer as
    itself and a fraction to one decimal (0.8 pps is no 1)."""
    if abs(n) < 999.5:
        if sep:
            return f"{_digits(n) if n != int(n) else int(n)}{sep}"
        return str(int(n)) if n == int(n) else _digits(n)
    for unit in ("k", "M", "G", "T"):
        n /= 1000
        if abs(n) < 999.5 or unit == "T":
            return f"{_digits(n)}{sep}{unit}"
    return str(n)


# ---------------------------------------------------------------- terminal

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STYLES = {"bold": "1", "red": "31", "yellow": "33", "green": "32", "dim": "2"}


def _shown(text: str) -> int:
    """Width of text on a terminal: colour codes take none."""
    return len(_ANSI.sub("", text)) if "\x1b" in text else len(text)


def colour(stream=None) -> bool:
    """Colour only on a terminal, and never where NO_COLOR is set (no-color.org)."""
    stream = stream or sys.stdout
    return not os.environ.get("NO_COLOR") and stream.isatty()


def paint(text: str, style: str, on: bool) -> str:
    """text in a style (bold, red, yellow, green, dim) when on."""
    return f"\x1b[{_STYLES[style]}m{text}\x1b[0m" if on and text else text


def new_frame(first: bool, stream=None) -> None:
    """Before each frame of a refreshing view (top, stats --watch): clear
    the screen on a terminal; elsewhere (a pipe, a file, a log) frames are
    appended, a blank line between them."""
    stream = stream or sys.stdout
    if stream.isatty():
        stream.write("\x1b[H\x1b[2J")
    elif not first:
        stream.write("\n")
