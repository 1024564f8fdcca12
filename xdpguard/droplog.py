"""Reader of the drop log: sampled drops from the pinned ring buffer.

The XDP program samples drops of rules with `log = true` (and of the
default and bans when [policy] log_default / log_bans) at most
[policy] log_rate events per second per rule; the rest are counted in
`log_suppressed` of the rule's counter.
"""
from __future__ import annotations

import ctypes
import ipaddress
import time
from pathlib import Path

from xdpguard import bpfsys, pins
from xdpguard.layout import SLOT_REASONS, C

_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


class DropLog:
    def __init__(self, directory: Path, record: pins.Record):
        self.record = record
        self.directory = directory
        self.Ev = pins.decode_type(record.types["logfmt"]["leaf"])
        self.names = {r.slot: r.name for r in record.rules}
        self.fd = bpfsys.obj_get(str(directory / "droplog"))
        # BOOTTIME -> wall clock, for printing.
        self.offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        self.events: list[dict] = []
        self.rb = bpfsys.RingBuffer(self.fd, self._on_event)

    def close(self) -> None:
        self.rb.close()
        bpfsys.close_fd(self.fd)

    def _on_event(self, raw: bytes) -> None:
        ev = self.Ev.from_buffer_copy(raw[: ctypes.sizeof(self.Ev)])
        n = 4 if ev.family == 4 else 16
        src = ipaddress.ip_address(bytes(ev.src)[:n])
        dst = ipaddress.ip_address(bytes(ev.dst)[:n])
        self.events.append({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.offset + ev.ts_ns / 1e9))
                    + f".{int(ev.ts_ns / 1e3) % 1000000:06d}",
            "rule": self.names.get(ev.slot, SLOT_REASONS.get(ev.slot, f"slot {ev.slot}")),
            "verdict": "drop",
            "src": str(src), "dst": str(dst),
            "proto": _PROTO.get(ev.proto, str(ev.proto)),
            "sport": ev.sport if ev.proto in (6, 17) else None,
            "dport": ev.dport if ev.proto in (6, 17) else None,
            "length": ev.len, "vlan": ev.vlan or None,
        })

    def read(self, timeout_ms: int) -> list[dict]:
        self.events = []
        if timeout_ms:
            self.rb.poll(timeout_ms)
        else:
            self.rb.consume()
        return self.events

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
