"""How long tests may wait, on the machine they run on.

The suite also runs in emulated guests (QEMU TCG: about ten times slower
than the development VM, a first bcc compile of a minute or more). A
deadline written for the development VM fails there although nothing is
wrong; a deadline written for the guest would make a real hang on the
development VM take minutes to show. So deadlines are written for the
development VM and stretched by ``slowdown()``, and every wait returns as
soon as its condition holds: a generous deadline costs nothing when the
machine is fast.

``slowdown()`` is XDPGUARD_TEST_SLOWDOWN when set (a VM harness that knows
its guest is emulated can say so), else measured once: the best of a few
runs of a pure-Python loop against its time on the development VM. The
measured value is put into the environment, so that this module imported
under a second name, and the tools the tests start, use the same one.
"""
from __future__ import annotations

import os
import time

ENV = "XDPGUARD_TEST_SLOWDOWN"

# Best time of _loop() on the development VM (Xeon 2.8 GHz, Python 3.11).
_REFERENCE_S = 0.015


def _loop() -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(300_000):
        x += i * i % 7
    return time.perf_counter() - t0


def _measure() -> float:
    # The best of several runs: another process taking the CPU for a while
    # must not make the machine look slow.
    return max(1.0, min(_loop() for _ in range(5)) / _REFERENCE_S)


def slowdown() -> float:
    """How many times slower than the development VM this machine runs the
    tests (at least 1)."""
    raw = os.environ.get(ENV)
    if raw:
        try:
            return max(1.0, float(raw))
        except ValueError:
            raise ValueError(f"{ENV}={raw!r}: expected a number like 10") from None
    factor = _measure()
    os.environ[ENV] = f"{factor:.2f}"
    return factor


def contention() -> float:
    """How many times slower than the development VM Python runs here at
    this moment (at least 1): the median of a few runs of the loop, so
    that what other processes take from the CPUs now counts, which
    slowdown() (the best run, measured once) leaves out on purpose. For
    waits on what a daemon does in its ticks: it gets what is left."""
    runs = sorted(_loop() for _ in range(5))
    return max(1.0, runs[2] / _REFERENCE_S)


def scaled_now(seconds: float, cap: float | None = None) -> float:
    """scaled(), stretched by the contention at this moment too."""
    t = seconds * max(slowdown(), contention())
    if cap is not None:
        t = min(t, max(cap, seconds))
    return t


def scaled(seconds: float, cap: float | None = None) -> float:
    """A deadline of `seconds` on the development VM, on this machine
    (at most `cap`, but never below `seconds`)."""
    t = seconds * slowdown()
    if cap is not None:
        t = min(t, max(cap, seconds))
    return t


def wait_until(cond, timeout: float, interval: float = 0.05):
    """cond()'s first true value, polled until `timeout` seconds have
    passed; then its last value (false)."""
    end = time.monotonic() + timeout
    while True:
        hit = cond()
        if hit or time.monotonic() >= end:
            return hit
        time.sleep(interval)
