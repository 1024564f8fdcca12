"""The ban map: add, lift and list bans on an applied interface.

Bans live in the pinned LPM tries `ban4` / `ban6` (bpf/xdpguard.h: struct
xg_ban). Expiry is CLOCK_BOOTTIME nanoseconds, which the XDP program reads
with bpf_ktime_get_boot_ns(); 0 never expires. Pins live in memory, so
every ban also has a record (`BanRecord`) in bans.json in the state
directory, with its expiry in wall-clock time: `restore` puts the unexpired
ones back into ban maps that a reboot or a detach left empty. CrowdSec
decisions are recorded in crowdsec.json. The records are written only by
`BanMaps` (under `pins.locked()`, like the maps).

The one-element map `banstate` (struct xg_banstate) tells the program
which trie may hold bans, so that it skips the trie while none do. Every
writer goes through `insert` / `delete` below while holding
`pins.locked()` (or their batch forms in BanMaps): a flag is raised before
an entry goes in and lowered only when the trie is seen empty, so a ban
never waits behind a lowered flag.
"""
from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from xdpguard import bpfsys, killpoint, pins
from xdpguard.layout import C
from xdpguard.logline import rfc3339

STATE_ROOT = Path(os.environ.get("XDPGUARD_STATE_DIR", "/var/lib/xdpguard"))
REASONS = {C.XG_BAN_MANUAL: "manual", C.XG_BAN_SYN_RATE: "syn_rate", C.XG_BAN_CONN_RATE: "conn_rate",
           C.XG_BAN_PPS: "pps", C.XG_BAN_BPS: "bps"}
REASON_CODES = {v: k for k, v in REASONS.items()}
# Where a ban came from (BanRecord.origin): made on this host, or by another
# host of the fleet (fleet.py), or a CrowdSec decision (crowdsec.py).
LOCAL = "local"
FLEET_ORIGIN = "fleet:"
CROWDSEC_ORIGIN = "crowdsec:"


class BanError(Exception):
    """A ban the operator asked for cannot be done (exit status 2)."""


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# ---------------------------------------------------------------- state files

def state_dir(netns: str, iface: str) -> Path:
    return STATE_ROOT / (netns or "host") / iface


def remove_state(netns: str, iface: str) -> Path:
    """Remove an interface's state directory (its namespace is gone);
    returns its path."""
    import shutil
    d = state_dir(netns, iface)
    shutil.rmtree(d, ignore_errors=True)
    try:
        d.parent.rmdir()          # the namespace's, when it was the last
    except OSError:
        pass
    return d


def watch_state_path(netns: str, iface: str) -> Path:
    """watch.json: offender history, written by `watch` alone (daemon.py)."""
    return state_dir(netns, iface) / "watch.json"


def write_json_atomic(path: Path, obj) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one.
    OSError names the file (a full disk is the operator's to fix)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            # dumps, not dump: dump runs the pure-Python encoder, five
            # times slower on the 100,000 records of a CrowdSec blocklist.
            f.write(json.dumps(obj, separators=(",", ":")))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
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

def protected_networks(record: pins.Record) -> list[tuple[ipaddress._BaseNetwork, str]]:
    """Networks never to ban: the mitigation allowlist, `protect` entries,
    the interface namespace's own addresses and its gateways."""
    out = []
    for p in record.mitigation.allow:
        out.append((ipaddress.ip_network(p), "allowlisted in [mitigation] allow"))
    for p in record.protect:
        out.append((ipaddress.ip_network(p.prefix), "listed in [policy] protect"))
    for addr, why in own_addresses(record.ns):
        out.append((ipaddress.ip_network(addr), why))
    return out


def own_addresses(netns: str | None) -> list[tuple[str, str]]:
    """Addresses of the namespace's interfaces and its default gateways."""
    from xdpguard import rtnl
    from xdpguard.netns import in_netns
    with in_netns(netns):
        return ([(a, "an address of this host") for a in rtnl.addresses()]
                + [(g, "a default gateway of this host") for g in rtnl.default_gateways()])


class Protection:
    """Networks never to ban (protected_networks), as integer prefixes:
    checked against each of 100,000 decisions of a CrowdSec blocklist."""

    def __init__(self, protected):
        from xdpguard.policy import parse_prefix
        self.items = [(parse_prefix(str(p))[0], f"covers {p}, {why}") for p, why in protected]

    def why(self, prefix) -> str | None:
        """Why prefix (text, network, or split_prefix's tuple) may not be
        banned ("covers P, why"), or None."""
        fam, raw, plen, _ = split_prefix(prefix)
        value = int.from_bytes(raw, "big")
        for p, why in self.items:
            if p.family == fam:
                shift = p.bits - min(p.plen, plen)
                if p.value >> shift == value >> shift:
                    return why
        return None


def covering(net, protected) -> str | None:
    """Why a ban of net would cover a protected network (of
    protected_networks), or None."""
    return Protection(protected).why(net)


def check_bannable(net, record: pins.Record) -> None:
    why = covering(net, protected_networks(record))
    if why:
        raise BanError(f"refusing to ban {net}: it {why}")


# ---------------------------------------------------------------- map access

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


def _expires_ns(expires: float | None, now: float, boot: int) -> int:
    """A wall-clock expiry as the map's CLOCK_BOOTTIME ns (0: never); at
    least 1 ns ahead, since 0 would mean never."""
    return 0 if expires is None else boot + max(1, int((expires - now) * 1e9))


def parse_target(text: str, warn=None):
    """An address or CIDR to ban; host bits are cleared, and said through
    warn(message), as the policy parser does."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BanError(f"'{text}' is not an address or CIDR") from None
    if warn and "/" in text and net.network_address != ipaddress.ip_address(text.split("/", 1)[0]):
        warn(f"'{text}' has host bits set; banning {net}")
    return net


def parse_ttl(text: str) -> float | None:
    """A ban's duration in seconds (units.parse_duration's forms); None
    for "0" and "never": no expiry."""
    from xdpguard.units import parse_duration
    if text.strip() in ("0", "never"):
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        raise BanError(str(e)) from None


@dataclass(frozen=True)
class Wanted:
    """A ban to make: what `ban`, `ban --from-file`, the fleet and CrowdSec ask for."""
    net: object                  # a network, its text, or split_prefix's tuple
    ttl: float | None            # seconds; None: never expires
    reason: str
    origin: str = LOCAL          # BanRecord.origin
    code: int | None = None      # XG_BAN_*; None: add_many's reason

    @classmethod
    def until(cls, net, expires: float | None, reason: str, origin: str, code: int | None,
              now: float) -> "Wanted":
        """A ban that ends at a wall-clock time (None: never)."""
        return cls(net, None if expires is None else max(expires - now, 1e-3), reason, origin, code)


def read_ban_file(path, ttl: float | None, reason: str, warn) -> list[Wanted]:
    """The bans of a `ban --from-file` file (docs/xdpguard.8.md, ban):
    one a line, "ADDR[/LEN] [TTL [REASON...]]"; TTL and REASON default to
    the command line's; blank lines and lines starting with '#' are
    skipped. A `bans --json` document is read too (its unexpired bans,
    with the time they have left). Any bad line is a BanError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BanError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip().startswith("{"):
        return _read_export(path, text)
    out: dict[str, Wanted] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.strip().split(None, 2)
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            net = parse_target(parts[0], lambda m: warn(f"{where}: {m}"))
            line_ttl = parse_ttl(parts[1]) if len(parts) > 1 else ttl
        except BanError as e:
            raise BanError(f"{where}: {e}") from None
        out[str(net)] = Wanted(net, line_ttl, parts[2] if len(parts) > 2 else reason)
    if not out:
        raise BanError(f"{path}: no address in the file")
    return list(out.values())


def _read_export(path, text: str) -> list[Wanted]:
    """The unexpired bans of a `bans --json` document (the longest of a
    prefix banned on several interfaces)."""
    try:
        doc = json.loads(text)
        rows = doc["bans"]
        now, out = time.time(), {}
        for b in rows:
            net = ipaddress.ip_network(b["prefix"])
            expires = b["expires"]
            if expires is not None and expires <= now:
                continue
            w = Wanted(net, None if expires is None else expires - now, str(b["reason"]))
            old = out.get(str(net))
            if old is None or old.ttl is not None and (w.ttl is None or w.ttl > old.ttl):
                out[str(net)] = w
    except (ValueError, KeyError, TypeError) as e:
        raise BanError(f"{path}: not a 'bans --json' document ({e!r})") from None
    return list(out.values())


@dataclass(frozen=True)
class BanRecord:
    """One ban in bans.json (keyed by prefix): what `bans` shows beside the
    map entry and what restoring the ban needs after a reboot."""
    reason: str                  # the text `bans` shows
    code: int                    # XG_BAN_*: manual, or the metric that banned
    since: float                 # wall clock
    expires: float | None        # wall clock; None: never
    expiry_known: bool = True    # False: written before records kept expiry
    origin: str = LOCAL          # LOCAL, "fleet:<host>" or "crowdsec:<scenario>"

    def as_json(self) -> dict:
        d = {"reason": self.reason, "code": self.code, "since": self.since, "expires": self.expires}
        if self.origin != LOCAL:
            d["origin"] = self.origin
        return d

    @classmethod
    def from_json(cls, d: dict) -> "BanRecord":
        reason = str(d.get("reason", "manual"))
        # Records of older versions hold reason and since only; a metric
        # ban's text starts with its metric.
        code = d.get("code", REASON_CODES.get(reason.split(" ", 1)[0], C.XG_BAN_MANUAL))
        expires = d.get("expires")
        if expires is not None:
            expires = float(expires)
        return cls(reason, int(code), float(d.get("since", 0.0)), expires, "expires" in d,
                   str(d.get("origin", LOCAL)))


@dataclass
class Restored:
    """What `restore` did: the bans put back, and those left out, why."""
    restored: list[str]
    expired: list[str]
    refused: dict[str, str]      # prefix -> why (protected now, max_bans, map full)
    unknown: list[str]           # no recorded expiry

    def considered(self) -> int:
        return len(self.restored) + len(self.expired) + len(self.refused) + len(self.unknown)

    def line(self, iface: str, path: Path) -> str:
        out = f"{iface}: restored {len(self.restored)} ban{'s' * (len(self.restored) != 1)} from {path}"
        dropped = []
        if self.expired:
            dropped.append(f"{len(self.expired)} expired")
        if self.unknown:
            dropped.append(f"{len(self.unknown)} without a recorded expiry (made by an older xdpguard)")
        refused = list(self.refused.items())
        dropped += [f"{p} ({why})" for p, why in refused[:3]]
        if len(refused) > 3:
            dropped.append(f"{len(refused) - 3} more refused")
        return out + (f"; dropped {', '.join(dropped)}" if dropped else "")


def plan_restore(records: dict[str, BanRecord], automatic_until: dict[str, float], now: float,
                 protected, max_bans: int) -> tuple[list[tuple[str, BanRecord]], Restored]:
    """Which recorded bans go back in, in this order, and what is dropped.

    automatic_until: watch.json's end of each automatic ban, for records
    of older versions that lack an expiry. Manual bans all go back (`ban`
    has no limit); automatic ones while the total stays under max_bans, as
    `watch` bans. Prefixes the applied policy protects never do."""
    done = Restored([], [], {}, [])
    live = []
    for prefix, r in records.items():
        if not r.expiry_known:
            if prefix not in automatic_until:
                done.unknown.append(prefix)
                continue
            r = BanRecord(r.reason, r.code, r.since, automatic_until[prefix])
        if r.expires is not None and r.expires <= now:
            done.expired.append(prefix)
        else:
            live.append((prefix, r))
    # Manual first, then the longest left: what max_bans leaves out is
    # what would have ended first.
    live.sort(key=lambda t: (t[1].code != C.XG_BAN_MANUAL,
                             -(t[1].expires if t[1].expires is not None else float("inf"))))
    order = []
    for prefix, r in live:
        why = covering(prefix, protected)
        if why:
            done.refused[prefix] = why
        elif r.code != C.XG_BAN_MANUAL and len(order) >= max_bans:
            done.refused[prefix] = f"max_bans ({max_bans}) reached"
        else:
            order.append((prefix, r))
    return order, done


def _canon(family: int, raw: bytes, plen: int) -> str:
    """The text of a prefix as records key it."""
    if family == 6 and raw[:12] in (bytes(10) + b"\xff\xff", bytes(12)):
        # IPv4-mapped and -compatible addresses: ipaddress writes them
        # otherwise than inet_ntop, and the CLI keys by ipaddress.
        return str(ipaddress.ip_network((ipaddress.ip_address(raw), plen)))
    return f"{socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)}/{plen}"


def split_prefix(prefix) -> tuple[int, bytes, int, str]:
    """(family, network address, length, text) of a prefix, text or
    ipaddress network (or such a tuple already): without ipaddress, which
    costs seconds for the 100,000 prefixes of a CrowdSec blocklist."""
    if isinstance(prefix, tuple):
        return prefix
    text = str(prefix)
    if "/" not in text and ":" not in text:       # a plain IPv4 address: most of a blocklist
        try:
            raw = socket.inet_pton(socket.AF_INET, text)
        except OSError:
            raise ValueError(f"'{text}' is not an address or CIDR") from None
        return 4, raw, 32, f"{socket.inet_ntop(socket.AF_INET, raw)}/32"
    from xdpguard.policy import parse_prefix
    p, _ = parse_prefix(text)
    raw = p.value.to_bytes(p.bits // 8, "big")
    return p.family, raw, p.plen, _canon(p.family, raw, p.plen)


class BanMaps:
    """The two ban tries of one interface, and the records of their bans:
    bans.json (local and fleet bans) and crowdsec.json (CrowdSec
    decisions, which the LAPI gives again at start, kept apart and compact
    because there may be 100,000)."""

    def __init__(self, directory: Path, record: pins.Record):
        self.directory = directory
        self.record = record
        self.maps = {4: pins.open_map(directory, "ban4", record), 6: pins.open_map(directory, "ban6", record)}
        self.state = pins.open_map(directory, "banstate", record)
        self.notes_path = state_dir(record.netns, record.iface) / "bans.json"
        self.decisions_path = state_dir(record.netns, record.iface) / "crowdsec.json"
        self._cache: dict[Path, tuple[tuple, dict[str, BanRecord]]] = {}
        self.lock_wait_s = 0.0     # write's waits for the pin lock, in all

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.state.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ records

    def _path(self, origin: str) -> Path:
        return self.decisions_path if origin.startswith(CROWDSEC_ORIGIN) else self.notes_path

    @staticmethod
    def _stat(path: Path) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _store(self, path: Path) -> dict[str, BanRecord]:
        """The records of one file, read again only when it changed since
        this object last read or wrote it (entries that do not parse are
        left out)."""
        sig = self._stat(path)
        hit = self._cache.get(path)
        if hit is not None and sig is not None and hit[0] == sig:
            return hit[1]
        raw = read_json(path, {})
        out: dict[str, BanRecord] = {}
        if path == self.decisions_path:
            groups = raw.get("bans") if isinstance(raw, dict) else None
            for origin, bans in (groups if isinstance(groups, dict) else {}).items():
                for prefix, v in (bans if isinstance(bans, dict) else {}).items():
                    try:
                        out[prefix] = BanRecord(origin[len(CROWDSEC_ORIGIN):], C.XG_BAN_MANUAL, float(v[0]),
                                                None if v[1] is None else float(v[1]), origin=origin)
                    except (TypeError, ValueError, IndexError):
                        continue
        else:
            for prefix, d in (raw if isinstance(raw, dict) else {}).items():
                try:
                    ipaddress.ip_network(prefix)
                    out[prefix] = BanRecord.from_json(d)
                except (TypeError, ValueError, AttributeError):
                    continue
        self._cache[path] = (sig, out)
        return out

    def records(self) -> dict[str, BanRecord]:
        """Prefix -> record, of every ban recorded."""
        return {**self._store(self.decisions_path), **self._store(self.notes_path)}

    def _save(self, records: dict[str, BanRecord], path: Path | None = None) -> None:
        """The one writer of bans.json and crowdsec.json; callers hold pins.locked()."""
        path = path or self.notes_path
        if path == self.decisions_path:
            groups: dict[str, dict] = {}
            for p, r in records.items():
                groups.setdefault(r.origin, {})[p] = [r.since, r.expires]
            write_json_atomic(path, {"v": 1, "bans": groups})
        else:
            write_json_atomic(path, {p: r.as_json() for p, r in records.items()})
        self._cache[path] = (self._stat(path), records)

    # ------------------------------------------------------------ the maps

    def _key(self, family: int, raw: bytes, plen: int) -> bytes:
        k = self.maps[family].Key()
        k.prefixlen = plen
        ctypes.memmove(ctypes.addressof(k) + type(k).addr.offset, raw, len(raw))
        return bytes(k)

    def add(self, net, ttl_s: float | None, reason: int = C.XG_BAN_MANUAL, text: str = "",
            strict: bool = True, origin: str = LOCAL) -> str | None:
        """Ban a prefix (renewing keeps its counters); hold pins.locked().
        When bans.json cannot be written: OSError, not banned; or with
        strict=False (watch) banned anyway, the error returned."""
        return self.add_many([Wanted(net, ttl_s or None, text or REASONS.get(reason, "manual"), origin)],
                             reason, strict)

    def add_many(self, wanted: list[Wanted], reason: int = C.XG_BAN_MANUAL, strict: bool = True,
                 now: float | None = None) -> str | None:
        """Ban prefixes as add does, in one batch per map and one write per
        records file: how 100,000 CrowdSec decisions go in. A renewed ban
        keeps its drop counters. The records first: when they cannot be
        written (disk full), OSError and nothing is banned; with
        strict=False banned anyway, the error returned. Hold pins.locked()."""
        now = time.time() if now is None else now
        boot = boot_ns()
        stores = {p: self._store(p) for p in (self.notes_path, self.decisions_path)}
        changed: set[Path] = set()
        batch: dict[int, tuple[list[bytes], list[bytes]]] = {4: ([], []), 6: ([], [])}
        for w in wanted:
            fam, raw, plen, key = split_prefix(w.net)
            code = reason if w.code is None else w.code
            expires = None if not w.ttl else now + w.ttl
            m = self.maps[fam]
            k = self._key(fam, raw, plen)
            v = m.Leaf()
            v.expires_ns = _expires_ns(expires, now, boot)
            v.reason = code
            path = self._path(w.origin)
            for other, recs in stores.items():
                if key in recs:
                    if other != path:
                        del recs[key]
                        changed.add(other)
                    old = m.lookup(k)
                    if old is not None:      # keep the drop counters of a renewed ban
                        v.packets, v.bytes = old.packets, old.bytes
            stores[path][key] = BanRecord(w.reason, code, now, expires, origin=w.origin)
            changed.add(path)
            batch[fam][0].append(k)
            batch[fam][1].append(bytes(v))
        what = split_prefix(wanted[0].net)[3] if len(wanted) == 1 else f"{len(wanted)} prefixes"
        failed = None
        try:
            for path in changed:
                self._save(stores[path], path)
        except OSError as e:
            self._cache.clear()       # the records as changed here are not on disk
            if strict:
                raise OSError(e.errno, f"{e.strerror}; {what} not banned") from None
            failed = f"{e.strerror}; {what} banned without its record"
        killpoint.step("ban-noted")
        for fam, (keys, values) in batch.items():
            if keys:
                m = self.maps[fam]
                _set_flag(self.state, fam, True)   # raised before an entry goes in
                bpfsys.map_update_many(m.fd, b"".join(keys), b"".join(values), len(keys))
        return failed

    def write(self, adds, lifts, now: float | None = None) -> list[str]:
        """add_many(adds) and remove_many(lifts), under pins.locked(),
        taken only when there is something to write (the lock is the
        machine's); returns what remove_many lifted. For writers that
        decided on the records as read (fleet, CrowdSec): a record changed
        meanwhile costs at most a needless write."""
        if not adds and not lifts:
            return []
        t = time.monotonic()
        with pins.locked():
            self.lock_wait_s += time.monotonic() - t
            if adds:
                # Enforced even when the records cannot be written (as watch's own bans).
                self.add_many(adds, strict=False, now=now)
            return self.remove_many(lifts) if lifts else []

    def remove(self, net) -> bool:
        """Lift a ban; hold pins.locked()."""
        return bool(self.remove_many([net]))

    def remove_many(self, prefixes) -> list[str]:
        """Lift bans, one write per records file; returns the prefixes
        that were in the map. The records first (as add_many): when they
        cannot be written, OSError and the bans stay in force. Hold
        pins.locked()."""
        stores = {p: self._store(p) for p in (self.notes_path, self.decisions_path)}
        split = [split_prefix(p) for p in prefixes]
        changed = set()
        for _fam, _raw, _plen, key in split:
            for path, recs in stores.items():
                if recs.pop(key, None) is not None:
                    changed.add(path)
        try:
            for path in changed:
                self._save(stores[path], path)
        except OSError as e:
            self._cache.clear()
            what = split[0][3] if len(split) == 1 else f"{len(split)} prefixes"
            raise OSError(e.errno, f"{e.strerror}; the ban on {what} stays in force") from None
        gone, touched = [], set()
        for fam, raw, plen, key in split:
            if self.maps[fam].delete(self._key(fam, raw, plen)):
                gone.append(key)
            touched.add(fam)
        for fam in touched:
            m = self.maps[fam]
            if bpfsys.map_get_next_key(m.fd, None, ctypes.sizeof(m.Key)) is None:
                _set_flag(self.state, fam, False)
        return gone

    def lookup(self, prefix):
        """The map's entry (struct xg_ban) of exactly this prefix, or None."""
        fam, raw, plen, _ = split_prefix(prefix)
        return self.maps[fam].lookup(self._key(fam, raw, plen))

    def in_force(self, prefix) -> bool:
        """Whether the map holds an unexpired ban of exactly this prefix."""
        v = self.lookup(prefix)
        return v is not None and (v.expires_ns == 0 or v.expires_ns > boot_ns())

    def empty(self) -> bool:
        return all(bpfsys.map_get_next_key(m.fd, None, ctypes.sizeof(m.Key)) is None
                   for m in self.maps.values())

    def restore(self, max_bans: int, automatic_until: dict[str, float] | None = None) -> Restored | None:
        """Put the recorded bans that have not expired back into empty ban
        maps (after a reboot or a detach), with the time they have left;
        bans.json keeps only those. None when the maps hold bans already:
        they are then what is in force. CrowdSec decisions are not put
        back: the bouncer asks the LAPI for all of them when it starts.
        Hold pins.locked()."""
        if not self.empty():
            return None
        if self._store(self.decisions_path):
            self._save({}, self.decisions_path)
        records = dict(self._store(self.notes_path))
        now, boot = time.time(), boot_ns()
        order, done = plan_restore(records, automatic_until or {}, now, protected_networks(self.record),
                                   max_bans)
        kept: dict[str, BanRecord] = {}
        for prefix, r in order:
            fam, raw, plen, _ = split_prefix(prefix)
            m = self.maps[fam]
            v = m.Leaf()
            v.expires_ns = _expires_ns(r.expires, now, boot)
            v.reason = r.code
            try:
                insert(m, self.state, fam, self._key(fam, raw, plen), v)
            except OSError as e:
                done.refused[prefix] = f"ban{fam} map: {e.strerror or e}"
                continue
            kept[prefix] = r
            done.restored.append(prefix)
        for fam, m in self.maps.items():
            if bpfsys.map_get_next_key(m.fd, None, ctypes.sizeof(m.Key)) is None:
                _set_flag(self.state, fam, False)   # raised for an insert that failed
        if kept != records:
            self._save(kept)
        return done

    def _dump(self, fam: int) -> tuple[bytes, bytes, int]:
        """Every key and value of a trie: batches where the kernel has
        them for tries, one lookup per key otherwise."""
        m = self.maps[fam]
        ks, vs = ctypes.sizeof(m.Key), ctypes.sizeof(m.Leaf)
        try:
            return bpfsys.map_dump_batch(m.fd, ks, vs, chunk=4096)
        except OSError:
            items = [(k, bpfsys.map_lookup(m.fd, k, vs)) for k in bpfsys.map_keys(m.fd, ks)]
            items = [(k, v) for k, v in items if v is not None]
            return b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)

    def _prefix_at(self, fam: int, keys: bytes, j: int) -> str:
        K = self.maps[fam].Key
        k = K.from_buffer_copy(keys, j * ctypes.sizeof(K))
        return _canon(fam, bytes(k.addr)[: 4 if fam == 4 else 16], k.prefixlen)

    def entries(self) -> list[dict]:
        now, wall = boot_ns(), time.time()
        records = self.records()
        out = []
        for fam, m in self.maps.items():
            keys, values, n = self._dump(fam)
            vs = ctypes.sizeof(m.Leaf)
            for j in range(n):
                v = m.Leaf.from_buffer_copy(values, j * vs)
                prefix = self._prefix_at(fam, keys, j)
                remaining = None if v.expires_ns == 0 else (v.expires_ns - now) / 1e9
                rec = records.get(prefix)
                out.append({"prefix": prefix, "reason": rec.reason if rec else REASONS.get(v.reason, "?"),
                            "origin": rec.origin if rec else LOCAL,
                            "source": "manual" if v.reason == C.XG_BAN_MANUAL else "metric",
                            "metric": REASONS.get(v.reason), "remaining_s": remaining,
                            "expired": remaining is not None and remaining <= 0,
                            # Wall clock, for an export (`ban --from-file` reads it back).
                            "since": rec.since if rec else None,
                            "since_rfc3339": rfc3339(rec.since) if rec and rec.since else None,
                            "expires": None if remaining is None else wall + remaining,
                            "expires_rfc3339": None if remaining is None else rfc3339(wall + remaining),
                            "packets": v.packets, "bytes": v.bytes})
        return sorted(out, key=lambda e: e["prefix"])

    def expire(self) -> list[str]:
        """Delete expired bans; returns their prefixes. Takes pins.locked()
        itself, and only when something expired: `watch` calls it every
        tick, and the lock is the whole machine's.

        The expiries are read straight out of the dumped values, a prefix
        is made only for what expired; under the lock each is looked at
        again (a writer may have renewed it meanwhile)."""
        now = boot_ns()
        seen = []
        for fam, m in self.maps.items():
            keys, values, n = self._dump(fam)
            words = ctypes.sizeof(m.Leaf) // 8
            expires = memoryview(values).cast("Q")[m.Leaf.expires_ns.offset // 8::words]
            seen += [self._prefix_at(fam, keys, j) for j, e in enumerate(expires) if e and e <= now]
        if not seen:
            return []
        with pins.locked():
            now = boot_ns()
            gone = [p for p in seen if (v := self.lookup(p)) is not None and v.expires_ns and v.expires_ns <= now]
            if gone:
                self.remove_many(gone)
        return gone


def restore(directory: Path, record: pins.Record, max_bans: int, log) -> Restored | None:
    """BanMaps.restore on one interface, logging one line when bans.json
    had any record. Records of older versions take an automatic ban's end
    from watch.json (read only: `watch` writes it). Hold pins.locked()."""
    watch = read_json(watch_state_path(record.netns, record.iface), {})
    bans = watch.get("bans") if isinstance(watch, dict) else None
    until = {p: float(b["until"]) for p, b in (bans if isinstance(bans, dict) else {}).items()
             if isinstance(b, dict) and isinstance(b.get("until"), (int, float))}
    with BanMaps(directory, record) as bm:
        done = bm.restore(max_bans, until)
        if done is not None and done.considered():
            log(done.line(record.iface, bm.notes_path))
    return done
