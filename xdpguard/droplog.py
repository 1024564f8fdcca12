"""Reader of the drop log: sampled drops from the pinned ring buffer.

The XDP program samples drops of rules with `log = true` (and of the
default and bans when [policy] log_default / log_bans) at most
[policy] log_rate events per second per rule; the rest are counted in
`log_suppressed` of the rule's counter.

The ring buffer has one read position for all its readers: an event one
reader takes is gone for the others. So no reader prints from the ring:
each, when it reads, moves what the ring holds into a journal in the
state directory (droplog.jsonl: one JSON event a line, with a sequence
number; past JOURNAL_BYTES it becomes droplog.jsonl.1, replacing the one
before), under a lock, and prints from the journal. Every reader sees
every event the journal retains, in one order, with one time each.
"""
from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from xdpguard import bans, bpfsys, pins
from xdpguard.layout import SLOT_REASONS, C
from xdpguard.logline import rfc3339

_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
JOURNAL = "droplog.jsonl"
JOURNAL_BYTES = 4 << 20


def wall_time(ns: int) -> str:
    """A wall-clock instant in nanoseconds as RFC 3339, to the microsecond:
    seconds and fraction from the one number."""
    return rfc3339(_epoch(ns), 6)


def _epoch(ns: int) -> float:
    return round(ns / 1e9, 6)


def _shown(line: str) -> dict:
    """A journal line as readers print it: the time formatted now, from
    its epoch seconds (XDPGUARD_TIME of the reader, not of the writer)."""
    e = json.loads(line)
    if isinstance(e.get("time_epoch"), (int, float)):
        e["time"] = rfc3339(e["time_epoch"], 6)
    return e


def boot_to_wall_ns() -> int:
    """What to add to a CLOCK_BOOTTIME instant for the wall clock's."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class DropLog:
    def __init__(self, directory: Path, record: pins.Record):
        self.record = record
        self.directory = directory
        self.Ev = pins.decode_type(record.types["logfmt"]["leaf"])
        self.names = {r.slot: r.name for r in record.rules}
        self.path = bans.state_dir(record.netns, record.iface) / JOURNAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = bpfsys.obj_get(str(directory / "droplog"))
        self._taken: list[bytes] = []
        self.rb = bpfsys.RingBuffer(self.fd, self._taken.append)
        self._pos: tuple[int, int] | None = None     # (inode, offset) follow() has read to

    def close(self) -> None:
        self.rb.close()
        bpfsys.close_fd(self.fd)

    def event(self, raw: bytes, offset_ns: int) -> dict:
        """One ring buffer record as `log --json` prints it (without seq)."""
        ev = self.Ev.from_buffer_copy(raw[: ctypes.sizeof(self.Ev)])
        n = 4 if ev.family == 4 else 16
        src = ipaddress.ip_address(bytes(ev.src)[:n])
        dst = ipaddress.ip_address(bytes(ev.dst)[:n])
        return {
            "time": wall_time(offset_ns + ev.ts_ns), "time_epoch": _epoch(offset_ns + ev.ts_ns),
            "rule": self.names.get(ev.slot, SLOT_REASONS.get(ev.slot, f"slot {ev.slot}")),
            "verdict": "drop",
            "src": str(src), "dst": str(dst),
            "proto": _PROTO.get(ev.proto, str(ev.proto)),
            "sport": ev.sport if ev.proto in (6, 17) else None,
            "dport": ev.dport if ev.proto in (6, 17) else None,
            "length": ev.len, "vlan": ev.vlan or None,
        }

    @contextmanager
    def _locked(self):
        # A lock file of its own: the journal's inode changes when it rotates.
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def drain(self) -> int:
        """Move what the ring holds into the journal; returns how many."""
        with self._locked(), _signals_held():
            self._taken.clear()
            self.rb.consume()
            if not self._taken:
                return 0
            offset = boot_to_wall_ns()
            seq = _last_seq(self.path) or _last_seq(self.path.with_name(JOURNAL + ".1")) or 0
            lines = []
            for raw in self._taken:
                seq += 1
                lines.append(json.dumps({"seq": seq, **self.event(raw, offset)}) + "\n")
            with open(self.path, "a") as f:
                f.write("".join(lines))
                size = f.tell()
            if size >= JOURNAL_BYTES:
                os.replace(self.path, self.path.with_name(JOURNAL + ".1"))
            return len(lines)

    def recent(self, n: int) -> list[dict]:
        """The last n events the journal holds (after a drain); follow()
        goes on after them."""
        with self._locked():
            self._pos = _end(self.path)
            lines = _lines(self.path)
            if len(lines) < n:
                lines = _lines(self.path.with_name(JOURNAL + ".1")) + lines
        return [_shown(ln) for ln in lines[-n:]] if n > 0 else []

    def follow(self) -> list[dict]:
        """Events journalled since the last recent() or follow()."""
        ino, off = self._pos or (0, 0)
        out: list[str] = []
        with self._locked():
            cur = _end(self.path)
            if cur[0] != ino:
                # Rotated since: the rest of the file read so far, then the new one.
                old = self.path.with_name(JOURNAL + ".1")
                if _end(old)[0] == ino:
                    out += _read_from(old, off)
                off = 0
            out += _read_from(self.path, off)
            self._pos = cur
        return [_shown(ln) for ln in out]

    def suppressed(self) -> int:
        """Events dropped by the in-kernel log rate limit, all slots."""
        counters = pins.open_map(self.directory, "counters", self.record)
        try:
            total = 0
            slots = [r.slot for r in self.record.rules] + [C.XG_SLOT_DEFAULT, C.XG_SLOT_BAN, C.XG_SLOT_NEWSRC]
            for s in slots:
                vals = counters.lookup(ctypes.c_uint32(s)) or []
                total += sum(v.log_suppressed for v in vals)
            return total
        finally:
            counters.close()


@contextmanager
def _signals_held():
    """Signals wait until the block ends: a KeyboardInterrupt between taking
    events from the ring and writing them to the journal would lose them
    for every reader (one pending before is raised here, before the block)."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _end(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_ino, st.st_size)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _read_from(path: Path, offset: int) -> list[str]:
    try:
        with open(path) as f:
            f.seek(offset)
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _last_seq(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            tail = f.read().splitlines()
    except FileNotFoundError:
        return None
    for ln in reversed(tail):
        try:
            return int(json.loads(ln)["seq"])
        except (ValueError, KeyError, TypeError):
            continue
    return None
