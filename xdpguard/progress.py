"""Progress of long steps (a set file of millions of prefixes), on stderr
when it is a terminal.

The stages report through ``task``; nothing is shown until the command
line ``enable``s a stream, and a step shows only once it has taken a
second, so small policies print nothing.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

_stream = None
_DELAY = 1.0        # seconds before a step shows
_EVERY = 0.1        # seconds between redraws


def enable(stream) -> None:
    """Show progress on stream (the CLI passes stderr when it is a
    terminal), or nowhere (None)."""
    global _stream
    _stream = stream


class _Task:
    __slots__ = ("label", "total", "done", "t0", "shown", "next_draw")

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.t0 = time.monotonic()
        self.shown = False
        self.next_draw = self.t0 + _DELAY

    def __call__(self, n: int = 1) -> None:
        """n more units done (cheap: a clock read at most per call)."""
        self.done += n
        if _stream is None:
            return
        now = time.monotonic()
        if now >= self.next_draw:
            self.next_draw = now + _EVERY
            self.draw(now)

    def draw(self, now: float) -> None:
        pct = f" {min(100, 100 * self.done // self.total):3d}%" if self.total else ""
        _stream.write(f"\r{self.label}:{pct} ({now - self.t0:.0f}s)\x1b[K")
        _stream.flush()
        self.shown = True


@contextmanager
def task(label: str, total: int = 0):
    """A step of `total` units; yields a function to call with units done."""
    t = _Task(label, total)
    done = False
    try:
        yield t
        done = True
    finally:
        if t.shown and _stream is not None:
            if done:
                t.done = t.total
                t.draw(time.monotonic())
            _stream.write("\n")
            _stream.flush()
