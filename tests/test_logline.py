"""One time format, and lines for the journal (issue 17, conventions),
without a kernel: tests/test_operations.py has them from a running watch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import pytest

from testing.lab import REPO
from xdpguard import daemon, logline
from xdpguard.logline import rfc3339

T = 1_765_079_000.123456           # 2025-12-07T03:43:20.123456Z


@pytest.fixture
def zone(monkeypatch):
    """Set TZ (and XDPGUARD_TIME) for one test; restored after."""
    def set_zone(tz, mode=None):
        monkeypatch.setenv("TZ", tz)
        if mode is None:
            monkeypatch.delenv("XDPGUARD_TIME", raising=False)
        else:
            monkeypatch.setenv("XDPGUARD_TIME", mode)
        time.tzset()
    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_rfc3339_is_utc_with_offset_by_default(zone):
    zone("Asia/Kolkata")              # the local zone does not leak in
    assert rfc3339(T) == "2025-12-07T03:43:20+00:00"
    assert rfc3339(T, 3) == "2025-12-07T03:43:20.123+00:00"
    assert rfc3339(T, 6) == "2025-12-07T03:43:20.123456+00:00"
    assert rfc3339(None) is None
    for digits in (0, 3, 6):
        assert datetime.fromisoformat(rfc3339(T, digits)).timestamp() == pytest.approx(T, abs=1)
    assert datetime.fromisoformat(rfc3339(T, 6)).timestamp() == pytest.approx(T, abs=1e-6)


def test_rfc3339_local_on_request(zone):
    zone("Asia/Kolkata", "local")
    assert rfc3339(T, 6) == "2025-12-07T09:13:20.123456+05:30"
    zone("America/St_Johns", "local")
    assert rfc3339(T) == "2025-12-07T00:13:20-03:30"


def test_rfc3339_orders_across_a_second_boundary(zone):
    """Seconds and fraction from one number: times straddling a second
    keep their order as text, and a fraction never rounds past .999999."""
    zone("UTC")
    base = 1_765_079_000
    ts = sorted([base + 0.87 + i * 0.05 for i in range(6)] + [base + 0.9999996])
    got = [rfc3339(t, 6) for t in ts]
    assert got == sorted(got) and len(set(got)) == len(got), got
    assert rfc3339(base + 0.9999996, 6) == "2025-12-07T03:43:21.000000+00:00"   # rounded to the µs, once
    assert [rfc3339(t, 0) for t in (T + 0.87, T + 0.88)] == ["2025-12-07T03:43:20+00:00",
                                                             "2025-12-07T03:43:21+00:00"]


def _stream_of(f) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_is_the_named_file(tmp_path, monkeypatch):
    a, b = open(tmp_path / "a", "w"), open(tmp_path / "b", "w")
    try:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not logline.journal_stream(a)
        monkeypatch.setenv("JOURNAL_STREAM", _stream_of(a))
        assert logline.journal_stream(a) and not logline.journal_stream(b)
        for bad in ("", "12", "x:y", ":"):
            monkeypatch.setenv("JOURNAL_STREAM", bad)
            assert not logline.journal_stream(a)
        import io
        monkeypatch.setenv("JOURNAL_STREAM", _stream_of(a))
        assert not logline.journal_stream(io.StringIO())
    finally:
        a.close()
        b.close()


def _watch(out, err) -> daemon.Watch:
    # Its lines only: nothing of the policy is read.
    return daemon.Watch(SimpleNamespace(source="p.toml"), "eth9", None, 1.0, False, out=out, err=err)


def test_watch_lines_in_the_journal_and_outside(tmp_path, monkeypatch, zone):
    """stderr is the journal: notes carry <6>/<4>/<3> and no time; stdout
    is not: decisions keep their RFC 3339 time. Then the other way round."""
    zone("UTC")
    out_p, err_p = tmp_path / "out", tmp_path / "err"
    with open(out_p, "w") as out, open(err_p, "w") as err:
        monkeypatch.setenv("JOURNAL_STREAM", _stream_of(err))
        w = _watch(out, err)
        w.note("watching host/eth9")
        w.warn("max_bans (3) reached: not banning 10.0.0.9/32")
        w.note("reload (SIGHUP) failed: bad; keeping policy 'p'", logline.ERROR)
        t0 = time.time()
        w.log(daemon.Decision("ban", "10.0.0.9/32", "pps", 900.0, 100, 60.0, 1))
        w.log(daemon.Decision("unban", "10.0.0.9/32", reason="expired"))
    assert err_p.read_text().splitlines() == [
        "<6>xdpguard watch: watching host/eth9",
        "<4>xdpguard watch: max_bans (3) reached: not banning 10.0.0.9/32",
        "<3>xdpguard watch: reload (SIGHUP) failed: bad; keeping policy 'p'"]
    lines = out_p.read_text().splitlines()
    stamps = [datetime.fromisoformat(ln.split(" ", 1)[0]) for ln in lines]
    assert all(ln.split(" ", 1)[0].endswith("+00:00") for ln in lines), lines
    assert all(abs(s.timestamp() - t0) < 5 for s in stamps) and stamps == sorted(stamps)
    assert [ln.split(" ", 2)[1] for ln in lines] == ["ban", "unban"]

    with open(out_p, "w") as out, open(err_p, "w") as err:
        monkeypatch.setenv("JOURNAL_STREAM", _stream_of(out))
        w = _watch(out, err)
        w.note("watching host/eth9")
        w.log(daemon.Decision("ban", "10.0.0.9/32", "pps", 900.0, 100, 60.0, 1))
        w.log(daemon.Decision("unban", "10.0.0.9/32", reason="expired"))
    assert out_p.read_text().splitlines() == [
        "<5>ban 10.0.0.9/32: pps 900/s over 100/s; 60s (offence 1)",
        "<6>unban 10.0.0.9/32: expired"]
    note = err_p.read_text()
    assert note.endswith(" xdpguard watch: watching host/eth9\n") and not note.startswith("<")
    datetime.fromisoformat(note.split(" ", 1)[0])


def test_watch_json_has_both_times(zone):
    zone("UTC")
    d = daemon.Decision("ban", "10.0.0.9/32", "pps", 900.0, 100, 60.0, 1, time=T).as_json()
    assert d["time"] == "2025-12-07T03:43:20+00:00" and d["time_epoch"] == pytest.approx(T, abs=1e-3)


def test_an_error_line_in_the_journal(tmp_path):
    """A command's final error (watch refused at start, apply of a unit's
    reload) is at error priority when stderr is the journal."""
    err_p = tmp_path / "err"
    with open(err_p, "w") as err:
        env = dict(os.environ, PYTHONPATH=str(REPO), JOURNAL_STREAM=_stream_of(err))
        cp = subprocess.run([sys.executable, "-m", "xdpguard.cli", "watch", str(tmp_path / "none.toml"),
                             "--iface", "eth9"], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                            cwd=REPO, timeout=60)
    assert cp.returncode == 2
    text = err_p.read_text()
    assert text.startswith("<3>error: ") and text.count("\n") == 1, text
