"""What every command of the CLI shares: exit codes, the usage error,
name checks, the --netns argument, applied interfaces, tables and JSON.

Command modules import this, never xdpguard.cli (which imports them).
"""
from __future__ import annotations

import json
import sys

EXIT_OK, EXIT_SYSTEM, EXIT_USAGE, EXIT_NOT_CONFIRMED = 0, 1, 2, 3


class CliError(Exception):
    """A message for the operator and the exit status (default: usage, 2)."""

    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


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
    """The policy's warnings on stderr."""
    for w in policy.warnings:
        print(f"warning: {w}", file=sys.stderr)


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
    if not targets:
        where = f" on {args.iface}" if args.iface else ""
        raise CliError(f"xdpguard is not applied{where} (see 'xdpguard status')")
    return [(d, pins.read_record(d)) for _n, _i, d in targets]


# ---------------------------------------------------------------- output

def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Plain aligned table; numeric columns (by index in right) align right."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right if right is not None else {i for i, c in enumerate(rows[0]) if isinstance(c, (int, float))} if rows else set()
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def emit_json(obj) -> None:
    """One JSON object on a line of its own (--json)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_duration(s: float) -> str:
    s = int(max(0, s))
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"
