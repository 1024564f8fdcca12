"""Rates and durations as operators write them: the one parser of each,
for the policy and for every command-line flag that takes one.

The forms (README "Units" and the man page list the same table):

    rate      "200/s" "2k/s" "10/m" "10/min" "600/h" "20kpps"       packets
              "10Mbit/s" "100mbit" "100Mbps" "1.5MB/s" "64KiB/s"   bytes
    duration  "500ms" "3s" "10m" "10min" "24h" "7d" "1w" "1h30m"

"bps" is bits per second, as links are rated: "100Mbps" is "100Mbit/s".
tc reads "mbps" as megabytes per second, so a lower-case "mbps" or
"gbps" (and "MBps"-style spellings) is refused as ambiguous rather than
guessed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Seconds of each time unit, by every name it may be written with.
_SECONDS = {}
for _names, _s in ((("ms", "msec"), 0.001), (("s", "sec", "secs", "second", "seconds"), 1),
                   (("m", "min", "mins", "minute", "minutes"), 60), (("h", "hr", "hour", "hours"), 3600),
                   (("d", "day", "days"), 86400), (("w", "week", "weeks"), 604800)):
    _SECONDS.update(dict.fromkeys(_names, _s))
# Multipliers of a count. "m"/"g" only in tc's "mbit"/"gbit" (see _RATE_FORMS).
_MULT = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024.0, "Mi": 1024.0 ** 2, "Gi": 1024.0 ** 3}
_TC_MULT = {"m": 1e6, "g": 1e9}

_NUM = r"(\d+(?:\.\d+)?)"
_PER = r"(?:\s*/\s*([a-z]+))?"
_RATE_FORMS = (
    # 200/s, 2k/min, 1M/s: packets (or events)
    re.compile(rf"{_NUM}\s*([kKMG]?)\s*/\s*([a-z]+)"),
    # 20kpps
    re.compile(rf"{_NUM}\s*([kKMG]?)(pps)"),
    # 10Mbit/s, 100mbit (tc), 1.5MB/s, 64KiB/s, 100Mbps
    re.compile(rf"{_NUM}\s*([kKMGmg]|[KMG]i)?(bit|B|bps){_PER}"),
)
_RATE_EXAMPLES = "\"200/s\", \"10/min\", \"2k/s\", \"10Mbit/s\", \"100mbit\", \"100Mbps\" or \"1.5MB/s\""


@dataclass(frozen=True)
class Rate:
    """A rate: ``per_second`` units, either packets or bytes."""
    per_second: float
    unit: str            # "packets" | "bytes"
    text: str

    def __str__(self) -> str:
        return self.text


def _ambiguous_bps(text: str) -> str | None:
    """Why a "bps" spelling other than k/M/G + lower-case "bps" is refused."""
    m = re.fullmatch(rf"\s*{_NUM}\s*([kKmMgG]?i?)([bB][pP][sS])\s*", text)
    if not m or m.group(3) == "bps" and m.group(2) in ("", "k", "K", "M", "G"):
        return None
    n, mult = m.group(1), {"k": "k", "K": "k", "m": "M", "g": "G"}.get(m.group(2)[:1], m.group(2)[:1])
    return (f"'{text.strip()}' is ambiguous (\"Mbps\" is megabits per second, but tc reads \"mbps\" "
            f"as megabytes): write \"{n}{mult}bit/s\" for bits, \"{n}{mult}B/s\" for bytes")


def parse_rate(text) -> Rate:
    """A packet or byte rate -> Rate; ValueError says what is expected."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a rate (expected a string like {_RATE_EXAMPLES})")
    ambiguous = _ambiguous_bps(text)
    if ambiguous:
        raise ValueError(ambiguous)
    for form in _RATE_FORMS:
        m = form.fullmatch(text.strip())
        if m:
            break
    else:
        raise ValueError(f"'{text}' is not a rate (expected {_RATE_EXAMPLES})")
    number, mult, unit = m.group(1), m.group(2) or "", m.group(3)
    per = m.group(4) if m.lastindex >= 4 else None
    if unit in ("bit", "B", "bps"):
        if mult in _TC_MULT and unit != "bit":
            raise ValueError(f"'{text}': '{mult}' is not a multiplier here (expected k, M, G, Ki, Mi or Gi)")
        if per is not None and unit == "bps":
            raise ValueError(f"'{text}': \"bps\" is already per second (write \"{number}{mult}bps\")")
        value = float(number) * _MULT.get(mult, _TC_MULT.get(mult, 1))
        kind = "bytes"
        if unit != "B":
            value /= 8.0
        seconds = _SECONDS.get(per or "s")
    else:
        kind = "packets"
        value = float(number) * _MULT[mult]
        seconds = 1 if unit == "pps" else _SECONDS.get(unit)
        per = unit
    if seconds is None or seconds < 1:
        raise ValueError(f"'{text}': '/{per}' is not a time unit (expected /s, /min, /h or /d)")
    value /= seconds
    if value <= 0:
        raise ValueError(f"'{text}': a rate must be above zero")
    # The data plane keeps ns-per-unit << 16 in 64 bits (times up to 64 KiB units).
    least, least_text = (1.0, "8bit/s") if kind == "bytes" else (0.001, "0.001/s\" or \"3.6/h")
    if value < least:
        raise ValueError(f"'{text}': rate too small (at least \"{least_text}\")")
    if value > 1e12:
        raise ValueError(f"'{text}': rate too large")
    return Rate(value, kind, text.strip())


def format_rate(rate: Rate) -> str:
    """The canonical text of a rate ("200/s", "8Mbit/s"): parses back to
    the same per_second (to float precision)."""
    if rate.unit == "packets":
        return f"{rate.per_second!r}/s"
    return f"{rate.per_second * 8.0!r}bit/s"


_DUR_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)\s*")
_DUR_EXAMPLES = "\"3s\", \"10m\", \"1h30m\", \"7d\" or \"1w\""


def parse_duration(text) -> float:
    """'500ms', '3s', '10m', '10min', '24h', '7d', '1w', '1h30m' (parts
    add up), or a number of seconds -> seconds above zero."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and 0 < text < 1e12:
        return float(text)
    s = text.strip() if isinstance(text, str) else ""
    if re.fullmatch(_NUM, s):
        s += "s"                          # a bare number is seconds, as in TOML
    if not re.fullmatch(f"(?:{_DUR_PART.pattern})+", s):
        raise ValueError(f"{text!r} is not a duration (expected {_DUR_EXAMPLES})")
    total = 0.0
    for number, unit in _DUR_PART.findall(s):
        if unit not in _SECONDS:
            raise ValueError(f"{text!r}: '{unit}' is not a time unit (expected ms, s, m or min, h, d, w)")
        total += float(number) * _SECONDS[unit]
    if not 0 < total < 1e12:
        raise ValueError(f"{text!r} is not a duration above zero (expected {_DUR_EXAMPLES})")
    return total


def format_duration(seconds: float) -> str:
    """The canonical text of a duration ("1h30m", "1w2d", "500ms"): parses
    back to the same whole milliseconds."""
    ms = round(seconds * 1000)
    out = []
    for unit, size in (("w", 604800000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            out.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(out) or "0s"
