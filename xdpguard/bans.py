"""The ban map: add, lift and list bans on an applied interface.

Bans live in the pinned LPM tries `ban4` / `ban6` (bpf/xdpguard.h: struct
xg_ban). Expiry is CLOCK_BOOTTIME nanoseconds, which the XDP program reads
with bpf_ktime_get_boot_ns(); 0 never expires. Reason texts and who banned
(manual or a metric) are kept beside, in the state directory.

The one-element map `banstate` (struct xg_banstate) tells the program
which trie may hold bans, so that it skips the trie while none do. Every
writer goes through `insert` / `delete` below while holding
`pins.locked()`: a flag is raised before an entry goes in and lowered only
when the trie is seen empty, so a ban never waits behind a lowered flag.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import tempfile
import time
from pathlib import Path

from xdpguard import bpfsys, pins
from xdpguard.layout import C

STATE_ROOT = Path(os.environ.get("XDPGUARD_STATE_DIR", "/var/lib/xdpguard"))
REASONS = {C.XG_BAN_MANUAL: "manual", C.XG_BAN_SYN_RATE: "syn_rate", C.XG_BAN_CONN_RATE: "conn_rate",
           C.XG_BAN_PPS: "pps", C.XG_BAN_BPS: "bps"}
REASON_CODES = {v: k for k, v in REASONS.items()}


class BanError(Exception):
    """A ban the operator asked for cannot be done (exit status 2)."""


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# ---------------------------------------------------------------- state files

def state_dir(netns: str, iface: str) -> Path:
    return STATE_ROOT / (netns or "host") / iface


def write_json_atomic(path: Path, obj) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------- protection

def protected_networks(record: dict) -> list[tuple[ipaddress._BaseNetwork, str]]:
    """Networks never to ban: the mitigation allowlist, `protect` entries,
    the interface namespace's own addresses and its gateways."""
    out = []
    for p in record.get("mitigation", {}).get("allow", []):
        out.append((ipaddress.ip_network(p), "allowlisted in [mitigation] allow"))
    for p in record.get("protect", []):
        out.append((ipaddress.ip_network(p["prefix"]), "listed in [policy] protect"))
    for addr, why in own_addresses(None if record["netns"] == "host" else record["netns"]):
        out.append((ipaddress.ip_network(addr), why))
    return out


def own_addresses(netns: str | None) -> list[tuple[str, str]]:
    """Addresses of the namespace's interfaces and its default gateways."""
    from xdpguard import rtnl
    from xdpguard.netns import in_netns
    with in_netns(netns):
        return ([(a, "an address of this host") for a in rtnl.addresses()]
                + [(g, "a default gateway of this host") for g in rtnl.default_gateways()])


def check_bannable(net, record: dict) -> None:
    for p, why in protected_networks(record):
        if p.version == net.version and (p.overlaps(net)):
            raise BanError(f"refusing to ban {net}: it covers {p}, {why}")


# ---------------------------------------------------------------- map access

def _key(m: pins.Map, net) -> object:
    k = m.Key()
    k.prefixlen = net.prefixlen
    raw = net.network_address.packed
    ctypes.memmove(ctypes.addressof(k) + type(k).addr.offset, raw, len(raw))
    return k


def _set_flag(state, family: int, on: bool) -> None:
    zero = ctypes.c_uint32(0)
    v = state.lookup(zero)
    setattr(v, "v4" if family == 4 else "v6", int(on))
    state.update(zero, v)


def insert(trie, state, family: int, key, value) -> None:
    """Put a ban entry in; the caller holds pins.locked()."""
    _set_flag(state, family, True)
    trie.update(key, value)


def delete(trie, state, family: int, key) -> bool:
    """Take a ban entry out; the caller holds pins.locked()."""
    gone = trie.delete(key)
    if bpfsys.map_get_next_key(trie.fd, None, ctypes.sizeof(trie.Key)) is None:
        _set_flag(state, family, False)
    return gone


def parse_target(text: str):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BanError(f"'{text}' is not an address or CIDR") from None


class BanMaps:
    """The two ban tries of one interface."""

    def __init__(self, directory: Path, record: dict):
        self.directory = directory
        self.record = record
        self.maps = {4: pins.open_map(directory, "ban4", record), 6: pins.open_map(directory, "ban6", record)}
        self.state = pins.open_map(directory, "banstate", record)
        self.notes_path = state_dir(record["netns"], record["iface"]) / "bans.json"

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.state.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, net, ttl_s: float | None, reason: int = C.XG_BAN_MANUAL, text: str = "") -> None:
        """Ban a prefix (renewing keeps its counters); hold pins.locked()."""
        m = self.maps[net.version]
        v = m.Leaf()
        v.expires_ns = 0 if not ttl_s else boot_ns() + int(ttl_s * 1e9)
        v.reason = reason
        old = m.lookup(_key(m, net))
        if old is not None:      # keep the drop counters of a renewed ban
            v.packets, v.bytes = old.packets, old.bytes
        insert(m, self.state, net.version, _key(m, net), v)
        notes = read_json(self.notes_path, {})
        notes[str(net)] = {"reason": text or REASONS.get(reason, "manual"), "since": time.time()}
        write_json_atomic(self.notes_path, notes)

    def remove(self, net) -> bool:
        """Lift a ban; hold pins.locked()."""
        m = self.maps[net.version]
        gone = delete(m, self.state, net.version, _key(m, net))
        notes = read_json(self.notes_path, {})
        if notes.pop(str(net), None) is not None:
            write_json_atomic(self.notes_path, notes)
        return gone

    def entries(self) -> list[dict]:
        now = boot_ns()
        notes = read_json(self.notes_path, {})
        out = []
        for fam, m in self.maps.items():
            for k, v in m.items():
                raw = bytes(k.addr)[: 4 if fam == 4 else 16]
                net = ipaddress.ip_network((ipaddress.ip_address(raw), k.prefixlen))
                remaining = None if v.expires_ns == 0 else (v.expires_ns - now) / 1e9
                note = notes.get(str(net), {})
                out.append({"prefix": str(net), "reason": note.get("reason", REASONS.get(v.reason, "?")),
                            "source": "manual" if v.reason == C.XG_BAN_MANUAL else "metric",
                            "metric": REASONS.get(v.reason), "remaining_s": remaining,
                            "expired": remaining is not None and remaining <= 0,
                            "packets": v.packets, "bytes": v.bytes})
        return sorted(out, key=lambda e: e["prefix"])

    def expire(self) -> list[str]:
        """Delete expired bans; returns their prefixes. Hold pins.locked()."""
        gone = []
        for e in self.entries():
            if e["expired"]:
                self.remove(ipaddress.ip_network(e["prefix"]))
                gone.append(e["prefix"])
        return gone
