"""Where a flood receiver's time goes (`bench/run.py --flood-profile`).

perf samples (cpu-clock: a VM often has no hardware counters) of the
receiver's NAPI threads while a flood runs, attributed to kernel functions
and, inside xdpguard's program, to the source lines of its C through the
JIT's line info: `bpf_prog_info.jited_line_info` says where the code of each
line-info record starts, `bpftool prog dump xlated linum` which line each
record is. A sample lands on the instruction waiting to retire, so a line's
share is mostly the cache misses it waits for (the frame's first read, a
map's random line), not its instruction count.

    .venv/bin/python bench/run.py --sections flood --flood-modes xdpguard-native,xdpguard-limit \\
        --flood-pools 10000000 --flood-rounds 1 --flood-profile
"""
from __future__ import annotations

import bisect
import errno
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bench.common import log
from xdpguard import bpfsys

PERF_HZ = 4999
PROGRAM = "xdpguard program"
_LINE = re.compile(r"; (.*) \[file:\S+ line_num:(\d+)")
_INSN = re.compile(r"\s*(\d+): ")


def available() -> str | None:
    """None when perf can profile here, else why not."""
    return None if shutil.which("perf") else "perf is not installed (Debian: linux-perf)"


class ProgLines:
    """The C source line of an address in a loaded program's JIT code."""

    def __init__(self, prog_id: int):
        fd = bpfsys.prog_get_fd_by_id(prog_id)
        try:
            self.tag = bpfsys.prog_info(fd)["tag"]
            pairs = bpfsys.prog_jited_lines(fd)
        finally:
            bpfsys.close_fd(fd)
        out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        text: dict[int, str] = {}
        cur = "(no line)"
        for line in out.splitlines():
            m = _LINE.match(line)
            if m:
                # bcc's line numbers are of its own rewritten main.c: the
                # text is what names the line.
                cur = " ".join(m.group(1).split())[:100] or "(no line)"
                continue
            m = _INSN.match(line)
            if m:
                text[int(m.group(1))] = cur
        self.addrs = [a for a, _ in pairs]
        self.lines = [text.get(insn, "(no line)") for _, insn in pairs]

    def where(self, ip: int) -> str:
        i = bisect.bisect_right(self.addrs, ip) - 1
        return self.lines[i] if i >= 0 else "(prologue)"


@contextmanager
def recording(pids: list[int], ready_s: float = 60.0) -> Iterator[dict]:
    """perf record of the threads `pids` for the body; the dict gets
    `path` (the perf data, removed with its directory by `attribute`).
    perf starts with its events off and the body runs once perf has
    acknowledged turning them on: its start-up takes a second or more
    in an emulated guest, longer than a test's run."""
    tmp = Path(tempfile.mkdtemp(prefix="xgb-perf-"))
    out: dict = {"path": tmp / "perf.data"}
    ctl, ack = tmp / "ctl", tmp / "ack"
    os.mkfifo(ctl)
    os.mkfifo(ack)
    # Our read end first: perf's write-only open of the ack fifo waits for it.
    ack_fd = os.open(ack, os.O_RDONLY | os.O_NONBLOCK)
    ctl_fd = None
    body_ok = False
    p = subprocess.Popen(["perf", "record", "-q", "-F", str(PERF_HZ), "-t", ",".join(map(str, pids)),
                          "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(out["path"])],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + ready_s
        while ctl_fd is None:
            try:
                ctl_fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:    # ENXIO: perf has not opened it yet
                if e.errno != errno.ENXIO or p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"perf record did not start: {e}") from None
                time.sleep(0.02)
        os.write(ctl_fd, b"enable\n")
        got = b""
        while b"ack" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or p.poll() is not None:
                raise RuntimeError("perf record did not turn its events on")
            if select.select([ack_fd], [], [], min(left, 0.5))[0]:
                got += os.read(ack_fd, 64)
        yield out
        body_ok = True
    finally:
        for fd in (ctl_fd, ack_fd):
            if fd is not None:
                os.close(fd)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode not in (0, -signal.SIGINT):
            log(f"perf record: exit {p.returncode}: {err.decode(errors='replace').strip()[-300:]}")
        if not body_ok:     # else attribute() reads and removes it
            shutil.rmtree(tmp, ignore_errors=True)


def attribute(path: Path, progs: dict[str, ProgLines]) -> dict:
    """Sample counts of one recording: by kernel function (the program
    under one name) and, for programs in `progs` (by tag), by C line."""
    funcs: Counter = Counter()
    lines: Counter = Counter()
    try:
        out = subprocess.run(["perf", "script", "-i", str(path), "-F", "ip,sym"],
                             capture_output=True, text=True, timeout=300).stdout
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    for row in out.splitlines():
        f = row.split(None, 1)
        if len(f) != 2:
            continue
        ip, sym = int(f[0], 16), f[1].strip()
        prog = next((pl for tag, pl in progs.items() if sym.startswith(f"bpf_prog_{tag}")), None)
        if prog is None:
            funcs[sym] += 1
            continue
        funcs[PROGRAM] += 1
        lines[prog.where(ip)] += 1
    return {"samples": sum(funcs.values()), "functions": dict(funcs), "lines": dict(lines)}


def merge(a: dict | None, b: dict) -> dict:
    """Two recordings' counts as one (the rounds of a mode)."""
    if not a:
        return b
    return {"samples": a["samples"] + b["samples"],
            "functions": dict(Counter(a["functions"]) + Counter(b["functions"])),
            "lines": dict(Counter(a["lines"]) + Counter(b["lines"]))}


def rows(p: dict, top_funcs: int = 8, top_lines: int = 12) -> tuple[list, list]:
    """(function rows, line rows): share of the receiver's samples, and of
    the program's."""
    n = p["samples"] or 1
    prog = p["functions"].get(PROGRAM, 0) or 1
    f = [(k, f"{100 * v / n:.1f}") for k, v in Counter(p["functions"]).most_common(top_funcs)]
    lines = [(k, f"{100 * v / prog:.1f}") for k, v in Counter(p["lines"]).most_common(top_lines)]
    return f, lines
