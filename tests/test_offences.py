"""Offence decay (issue 16, item 8): a source's offences stop counting
[mitigation] forget after its last ban ended; `watch` then bans it as a
first offender and drops it from watch.json. The decisions alone here
(daemon.Mitigator, days in a test's instant); tests/test_mitigation.py
runs it in watch with real floods."""
from __future__ import annotations

import pytest

from xdpguard.daemon import Decision, Mitigator
from xdpguard.policy import PolicyError, load

T0 = 1_800_000_000.0
DAY = 86400.0


def _policy(extra: str = ""):
    return load("m.toml", '[policy]\ndefault = "allow"\n[mitigation]\nenabled = true\nsyn_rate = "100/s"\n'
                          f'window = "1s"\nban = "10m"\nban_max = "1d"\n{extra}')


def _ban(mit, offence=1, duration=600.0, at=T0):
    mit.record_ban(Decision("ban", "192.0.2.1/32", "syn_rate", 500.0, 100.0, duration, offence, time=at))


def _due(mit, wall):
    """The ban evaluate makes of a flood from 192.0.2.1 at wall time `wall`."""
    sources = {"192.0.2.1/32": {"syn_rate": 500.0}}
    mit.over_since.clear()
    (d,) = mit.evaluate(10.0, 2.0, sources, set(), wall=wall)
    return d.offence, d.duration


def test_offences_decay_after_forget():
    mit = Mitigator(_policy('forget = "1d"'), [])
    _ban(mit)
    end = T0 + 600
    assert mit.offences("192.0.2.1/32", end + DAY - 1) == 1
    assert _due(mit, end + DAY - 1) == (2, 1200.0)         # doubled: still remembered
    assert mit.offences("192.0.2.1/32", end + DAY) == 0
    assert _due(mit, end + DAY) == (1, 600.0)              # forgotten: a first offence
    assert mit.forget_old(end + DAY - 1) == [] and mit.forget_old(end + DAY) == ["192.0.2.1/32"]
    assert mit.state["offenders"] == {}


def test_forget_counts_from_the_end_of_the_last_ban():
    mit = Mitigator(_policy('forget = "1h"'), [])
    _ban(mit, offence=5, duration=DAY)                      # a day-long ban
    assert mit.offences("192.0.2.1/32", T0 + DAY + 3599) == 5
    assert mit.offences("192.0.2.1/32", T0 + DAY + 3600) == 0
    # watch.json of an older version: the start of the last ban only.
    mit.state["offenders"]["192.0.2.1/32"] = {"offences": 3, "last_ban": T0}
    assert mit.offences("192.0.2.1/32", T0 + 3599) == 3 and mit.offences("192.0.2.1/32", T0 + 3600) == 0


def test_default_a_week_and_never():
    assert _policy().mitigation.forget == 7 * DAY
    mit = Mitigator(_policy('forget = "never"'), [])
    assert mit.m.forget is None
    _ban(mit, offence=4)
    assert mit.offences("192.0.2.1/32", T0 + 1000 * DAY) == 4 and mit.forget_old(T0 + 1000 * DAY) == []


@pytest.mark.parametrize("value", ['"soon"', '"0"', "-1", "true"])
def test_bad_forget_is_a_policy_error(value):
    with pytest.raises(PolicyError, match=r"\[mitigation\]: forget"):
        _policy(f"forget = {value}")
