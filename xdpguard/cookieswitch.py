"""[mitigation] syncookies = "auto": SYN cookies switched per port by `watch`.

The XDP program counts the SYNs that rules with "auto" cookies pass, per
destination port (map `synports`), and sends a port's packets down the
cookie path while the port's bit in map `cookieports` is set (struct
xg_rule.cookies, XG_COOKIES_AUTO). `watch` sets the bit when the port's
SYN rate goes over syn_rate_total and clears it once the rate has stayed
at or under it for syncookies_hold: a map write each way, no reload. Map
`cookiewhy` keeps, for `status`, when and at what rate a port's cookies
went on. The nftables table and sysctls the cookie path needs are in
place from apply to detach (xdpguard/syncookies.py).
"""
from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdpguard import bpfsys, pins
from xdpguard.layout import C
from xdpguard.logline import INFO, NOTICE, rfc3339

NAMES = ("cookieports", "synports", "cookiewhy")
_U32, _U64 = 4, 8


def _key(port: int) -> bytes:
    return int(port).to_bytes(_U32, sys.byteorder)


class PortSwitch:
    """The per-port switches and SYN counts in the program's maps."""

    def __init__(self, maps: dict[str, pins.Map]):
        self.maps = maps

    @classmethod
    def open(cls, directory: Path, record: pins.Record) -> "PortSwitch":
        maps = {}
        try:
            for n in NAMES:
                maps[n] = pins.open_map(directory, n, record)
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        return cls(maps)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()

    def syn_counts(self) -> dict[int, int]:
        """{port: SYNs since the entry was made}, summed over CPUs."""
        fd = self.maps["synports"].fd
        pvs = bpfsys.percpu_value_size(_U64)
        out = {}
        for k in list(bpfsys.map_keys(fd, _U32)):
            raw = bpfsys.map_lookup(fd, k, pvs)
            if raw is not None:
                out[int.from_bytes(k, sys.byteorder)] = sum(memoryview(raw).cast("Q"))
        return out

    def _word(self, w: int) -> int:
        raw = bpfsys.map_lookup(self.maps["cookieports"].fd, _key(w), _U64)
        return int.from_bytes(raw, sys.byteorder) if raw else 0

    def _set_word(self, w: int, v: int) -> None:
        bpfsys.map_update(self.maps["cookieports"].fd, _key(w), v.to_bytes(_U64, sys.byteorder))

    def on_ports(self) -> dict[int, dict | None]:
        """{port: why (since, syn_rate, threshold) or None} of the ports
        whose cookies are on."""
        whys = {}
        why = self.maps["cookiewhy"]
        for k in list(bpfsys.map_keys(why.fd, _U32)):
            v = why.lookup(ctypes.c_uint32(int.from_bytes(k, sys.byteorder)))
            if v is not None:
                whys[int.from_bytes(k, sys.byteorder)] = {"since": v.since, "syn_rate": v.syn_rate,
                                                          "threshold": v.threshold}
        out = {}
        for w in range(C.XG_COOKIEPORT_WORDS):
            bits = self._word(w)
            while bits:
                low = bits & -bits
                port = w * 64 + low.bit_length() - 1
                out[port] = whys.get(port)
                bits ^= low
        return out

    def turn_on(self, port: int, syn_rate: float, threshold: float, since: float | None = None) -> None:
        """Why first, then the bit the program reads."""
        why = self.maps["cookiewhy"]
        v = why.Leaf()
        v.since, v.syn_rate, v.threshold = int(since or time.time()), int(syn_rate), int(threshold)
        try:
            why.update(ctypes.c_uint32(port), v)
        except OSError:
            pass          # cookiewhy full: the switch matters, the note does not
        w = port // 64
        self._set_word(w, self._word(w) | (1 << (port & 63)))

    def turn_off(self, port: int) -> None:
        w = port // 64
        self._set_word(w, self._word(w) & ~(1 << (port & 63)))
        self.maps["cookiewhy"].delete(ctypes.c_uint32(port))

    def clear(self) -> None:
        """Every port off."""
        for port in self.on_ports():
            self.turn_off(port)
        for k in list(bpfsys.map_keys(self.maps["cookiewhy"].fd, _U32)):
            bpfsys.map_delete(self.maps["cookiewhy"].fd, k)


def in_ranges(port: int, ranges) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


@dataclass
class Change:
    """One switch of one port's cookies, as `watch` logs it."""
    port: int
    on: bool
    syn_rate: float
    threshold: float
    hold: float = 0.0
    time: float = field(default_factory=time.time)

    @property
    def priority(self) -> int:
        """Its syslog priority in the journal."""
        return NOTICE if self.on else INFO

    def as_json(self) -> dict:
        return {"time": rfc3339(self.time), "time_epoch": round(self.time, 3),
                "action": "syncookies_on" if self.on else "syncookies_off", "port": self.port,
                "syn_rate": round(self.syn_rate, 1), "threshold": self.threshold}

    def human(self, stamped: bool = True) -> str:
        """One line; stamped=False leaves the time out (the journal has it)."""
        t = f"{rfc3339(self.time)} " if stamped else ""
        if self.on:
            return (f"{t}syncookies on for tcp port {self.port}: SYN rate {self.syn_rate:.0f}/s "
                    f"over syn_rate_total {self.threshold:g}/s")
        return (f"{t}syncookies off for tcp port {self.port}: SYN rate {self.syn_rate:.0f}/s, at or under "
                f"syn_rate_total {self.threshold:g}/s for {self.hold:g}s")


class AutoCookies:
    """The decisions: on as soon as a port's SYN rate is over the
    threshold, off once it has stayed at or under it for the hold time
    (so that a flood with pauses does not flap them)."""

    def __init__(self, mitigation, ranges, switch: PortSwitch):
        self.threshold = mitigation.syn_rate_total.per_second
        self.hold = mitigation.syncookies_hold
        self.ranges = [tuple(r) for r in ranges]
        self.switch = switch
        self.prev: dict[int, int] | None = None
        self.prev_t: float | None = None
        self.rates: dict[int, float] = {}
        self.under_since: dict[int, float] = {}
        # Ports left on (a watch before this one, killed): kept on, and
        # switched off by the same rule.
        self.on = set(switch.on_ports())

    def tick(self, now: float | None = None) -> list[Change]:
        """Sample the SYN counts and switch; the changes made."""
        now = time.monotonic() if now is None else now
        counts = self.switch.syn_counts()
        out: list[Change] = []
        if self.prev is not None and now > self.prev_t:
            dt = now - self.prev_t
            self.rates = {}
            for port, n in counts.items():
                before = self.prev.get(port, 0)
                self.rates[port] = (n - before if n >= before else n) / dt   # evicted and made anew
            for port, rate in self.rates.items():
                if rate > self.threshold and port not in self.on and in_ranges(port, self.ranges):
                    self.switch.turn_on(port, rate, self.threshold)
                    self.on.add(port)
                    out.append(Change(port, True, rate, self.threshold))
            for port in sorted(self.on):
                rate = self.rates.get(port, 0.0)
                if rate > self.threshold:
                    self.under_since.pop(port, None)
                    continue
                start = self.under_since.setdefault(port, now - dt)
                if now - start + 1e-6 >= self.hold:
                    self.switch.turn_off(port)
                    self.on.discard(port)
                    self.under_since.pop(port, None)
                    out.append(Change(port, False, rate, self.threshold, self.hold))
        self.prev, self.prev_t = counts, now
        return out


def status(directory: Path, record: pins.Record) -> list[dict]:
    """The ports whose cookies `watch` has on: port, since, syn_rate,
    threshold (what `status` shows)."""
    try:
        sw = PortSwitch.open(directory, record)
    except (OSError, KeyError):
        return []
    try:
        return [{"port": p, **(why or {"since": None, "syn_rate": None, "threshold": None})}
                for p, why in sorted(sw.on_ports().items())]
    finally:
        sw.close()
