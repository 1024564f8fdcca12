"""The drop log's journal and times, without a kernel (issue 16.11, 16.12);
tests/test_operations.py runs them on the real program."""
from __future__ import annotations

import os
import signal
import time

import pytest

from xdpguard import droplog


def test_time_from_one_number_across_a_second_boundary(monkeypatch):
    """Seconds and fraction come from one wall-clock instant: a boot-time
    offset with a fraction of .9 s used to give the seconds of the instant
    and the fraction of the boot time (x.912, then x.012 for x+1.012)."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        offset = 1_700_000_000_900_000_000
        boot = [1_012_000_000, 1_062_000_000, 1_112_000_000, 1_162_000_000]
        got = [droplog.wall_time(offset + b) for b in boot]
        assert got == ["2023-11-14T22:13:21.912000+00:00", "2023-11-14T22:13:21.962000+00:00",
                       "2023-11-14T22:13:22.012000+00:00", "2023-11-14T22:13:22.062000+00:00"]
        assert got == sorted(got)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


class _Ring:
    """One reader's view of the ring buffer: consume() hands what the ring
    holds to this reader, and it is gone for all."""

    def __init__(self, taken, records):
        self.taken, self.records = taken, records

    def consume(self):
        self.taken.extend(self.records)
        n = len(self.records)
        self.records.clear()
        return n


def _reader(tmp_path, ring: list) -> droplog.DropLog:
    d = droplog.DropLog.__new__(droplog.DropLog)
    d.path = tmp_path / droplog.JOURNAL
    d._taken = []
    d.rb = _Ring(d._taken, ring)
    d._pos = None
    d.event = lambda raw, _offset: {"src": raw.decode()}
    return d


def test_every_reader_sees_every_event_across_rotation(tmp_path, monkeypatch):
    monkeypatch.setattr(droplog, "JOURNAL_BYTES", 200)
    ring: list[bytes] = []
    a, b = _reader(tmp_path, ring), _reader(tmp_path, ring)
    a.recent(10)
    b.recent(10)
    seen_a, seen_b = [], []
    for i in range(12):
        ring.append(f"10.0.0.{i}".encode())
        (a if i % 2 else b).drain()    # whoever reads first moves it
        seen_a += a.follow()
        if i % 3 == 0:
            seen_b += b.follow()
    seen_b += b.follow()
    assert [e["seq"] for e in seen_a] == list(range(1, 13))
    assert seen_b == seen_a
    assert (tmp_path / (droplog.JOURNAL + ".1")).exists(), "the journal rotated"
    # A late reader gets the most recent ones, from both files.
    assert [e["src"] for e in _reader(tmp_path, ring).recent(4)] == [f"10.0.0.{i}" for i in range(8, 12)]


def test_ctrl_c_while_draining_loses_no_event(tmp_path):
    """A SIGINT that arrives while a reader moves the ring into the journal
    (the events are gone from the ring then) takes effect once they are
    journalled: every reader still sees them."""
    class _Interrupted(_Ring):
        def consume(self):
            n = super().consume()
            os.kill(os.getpid(), signal.SIGINT)     # Ctrl-C now, mid-drain
            for _ in range(1000):                   # Python would act on it here
                pass
            return n

    ring = [b"10.0.0.1", b"10.0.0.2"]
    a = _reader(tmp_path, ring)
    a.rb = _Interrupted(a._taken, ring)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            a.drain()
    finally:
        signal.signal(signal.SIGINT, old)
    assert [e["src"] for e in _reader(tmp_path, []).recent(10)] == ["10.0.0.1", "10.0.0.2"]
