"""Rates and durations (xdpguard.units): every written form, the refusals,
and property tests against plain arithmetic and the formatters."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xdpguard.units import Rate, format_duration, format_rate, parse_duration, parse_rate


@pytest.mark.parametrize("text, per_second, unit", [
    ("200/s", 200, "packets"),
    ("2k/s", 2000, "packets"),
    ("1M/s", 1e6, "packets"),
    ("10/m", 10 / 60, "packets"),
    ("10/min", 10 / 60, "packets"),
    ("600/h", 600 / 3600, "packets"),
    ("5/sec", 5, "packets"),
    ("86400/d", 1, "packets"),
    ("20kpps", 20000, "packets"),
    (" 200 / s ", 200, "packets"),
    ("10Mbit/s", 1.25e6, "bytes"),
    ("100mbit", 12.5e6, "bytes"),          # tc
    ("100Mbit", 12.5e6, "bytes"),
    ("1gbit", 125e6, "bytes"),
    ("100kbit", 12.5e3, "bytes"),
    ("100Mbps", 12.5e6, "bytes"),          # bits, as links are rated
    ("64kbps", 8000, "bytes"),
    ("1.5MB/s", 1.5e6, "bytes"),
    ("64KiB/s", 65536, "bytes"),
    ("1MiB/s", 1 << 20, "bytes"),
    ("60MB/min", 1e6, "bytes"),
])
def test_rate_forms(text, per_second, unit):
    r = parse_rate(text)
    assert r.per_second == pytest.approx(per_second)
    assert r.unit == unit
    assert r.text == text.strip()


@pytest.mark.parametrize("text, needles", [
    ("100mbps", ["ambiguous", "tc", "\"100Mbit/s\"", "\"100MB/s\""]),
    ("100MBps", ["ambiguous", "\"100MB/s\""]),
    ("5kBps", ["ambiguous", "\"5kbit/s\"", "\"5kB/s\""]),
    ("100Mbps/s", ["already per second", "\"100Mbps\""]),
    ("200", ["'200' is not a rate", "\"10/min\""]),
    ("fast", ["'fast' is not a rate"]),
    ("10Tbit/s", ["'10Tbit/s' is not a rate"]),
    ("1M/ms", ["'/ms' is not a time unit"]),
    ("3/fortnight", ["'/fortnight' is not a time unit"]),
    ("10mB/s", ["'m' is not a multiplier"]),
    ("1/d", ["too small", "3.6/h"]),
    ("0/s", ["above zero"]),
    ("1/s/s", ["not a rate"]),
])
def test_rate_refused(text, needles):
    with pytest.raises(ValueError) as e:
        parse_rate(text)
    for n in needles:
        assert n in str(e.value), str(e.value)


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("3s", 3), ("10m", 600), ("10min", 600), ("2 minutes", 120), ("24h", 86400),
    ("7d", 604800), ("1w", 604800), ("1h30m", 5400), ("1h 30m", 5400), ("1d12h", 129600),
    ("1.5h", 5400), ("30", 30), (" 2d ", 172800), (3, 3), (0.25, 0.25),
])
def test_duration_forms(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, needle", [
    ("soon", "'soon' is not a duration"), ("-5m", "'-5m' is not a duration"), ("0s", "above zero"),
    ("1h30", "'1h30' is not a duration"), ("3x", "'x' is not a time unit"), ("", "is not a duration"),
    ("10M", "is not a duration"), (0, "is not a duration"), (True, "is not a duration"),
])
def test_duration_refused(text, needle):
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert needle in str(e.value)


# ---------------------------------------------------------------- properties

_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "w": 604800}


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(_UNITS)), st.sampled_from(["", " "])),
                min_size=1, max_size=5))
def test_duration_parts_add_up(parts):
    text = "".join(f"{n}{unit}{sp}" for n, unit, sp in parts)
    total = sum(n * _UNITS[unit] for n, unit, _ in parts)
    if not 0 < total < 1e12:
        with pytest.raises(ValueError):
            parse_duration(text)
    else:
        assert parse_duration(text) == pytest.approx(total)


@given(st.integers(1, 10**12))
def test_duration_format_round_trips(ms):
    text = format_duration(ms / 1000)
    assert round(parse_duration(text) * 1000) == ms
    assert format_duration(parse_duration(text)) == text


_PER = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_COUNT = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}
_BYTES = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _parsed(text: str, want: float, least: float):
    """parse_rate(text) checked against want, or None where want is out
    of range (then the text is refused)."""
    if not least <= want <= 1e12:
        with pytest.raises(ValueError):
            parse_rate(text)
        return None
    r = parse_rate(text)
    assert r.per_second == pytest.approx(want)
    return r


@given(st.integers(1, 10**6), st.sampled_from(sorted(_COUNT)), st.sampled_from(sorted(_PER)))
def test_packet_rate_is_arithmetic(n, mult, per):
    r = _parsed(f"{n}{mult}/{per}", n * _COUNT[mult] / _PER[per], 0.001)
    assert r is None or r.unit == "packets"


@given(st.integers(1, 10**6), st.sampled_from(sorted(_BYTES)), st.sampled_from(["bit", "B"]),
       st.sampled_from(sorted(_PER)))
def test_byte_rate_is_arithmetic(n, mult, unit, per):
    r = _parsed(f"{n}{mult}{unit}/{per}", n * _BYTES[mult] / (8 if unit == "bit" else 1) / _PER[per], 1)
    if r is None:
        return
    assert r.unit == "bytes"
    if per == "s" and unit == "bit" and mult in ("k", "M", "G"):
        # "Mbps" and tc's "mbit" are the same rate as "Mbit/s"
        assert parse_rate(f"{n}{mult}bps").per_second == r.per_second
        assert parse_rate(f"{n}{mult.lower()}bit").per_second == r.per_second


@given(st.one_of(st.floats(0.001, 1e12).map(lambda v: Rate(v, "packets", "")),
                 st.floats(1, 1e12).map(lambda v: Rate(v, "bytes", ""))))
def test_rate_format_round_trips(rate):
    back = parse_rate(format_rate(rate))
    assert back.unit == rate.unit
    assert back.per_second == rate.per_second
