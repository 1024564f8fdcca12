"""The ban map: add, lift and list bans on an applied interface.

Bans live in the pinned LPM tries `ban4` / `ban6` (bpf/xdpguard.h: struct
xg_ban). Expiry is CLOCK_BOOTTIME nanoseconds, which the XDP program reads
with bpf_ktime_get_boot_ns(); 0 never expires. Pins live in memory, so
every ban also has a record (`BanRecord`) in bans.json in the state
directory, with its expiry in wall-clock time: `restore` puts the unexpired
ones back into ban maps that a reboot or a detach left empty. The records
are written only by `BanMaps` (under `pins.locked()`, like the maps).

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
from dataclasses import dataclass
from pathlib import Path

from xdpguard import bpfsys, killpoint, pins
from xdpguard.layout import C
from xdpguard.logline import rfc3339

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
            json.dump(obj, f, separators=(",", ":"))
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


def covering(net, protected) -> str | None:
    """Why a ban of net would cover a protected network (of
    protected_networks), or None."""
    return next((f"covers {p}, {why}" for p, why in protected
                 if p.version == net.version and p.overlaps(net)), None)


def check_bannable(net, record: pins.Record) -> None:
    why = covering(net, protected_networks(record))
    if why:
        raise BanError(f"refusing to ban {net}: it {why}")


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
    """A ban to make: what `ban` and `ban --from-file` ask for."""
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ttl: float | None            # seconds; None: never expires
    reason: str


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

    def as_json(self) -> dict:
        return {"reason": self.reason, "code": self.code, "since": self.since, "expires": self.expires}

    @classmethod
    def from_json(cls, d: dict) -> "BanRecord":
        reason = str(d.get("reason", "manual"))
        # Records of older versions hold reason and since only; a metric
        # ban's text starts with its metric.
        code = d.get("code", REASON_CODES.get(reason.split(" ", 1)[0], C.XG_BAN_MANUAL))
        expires = d.get("expires")
        if expires is not None:
            expires = float(expires)
        return cls(reason, int(code), float(d.get("since", 0.0)), expires, "expires" in d)


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
        why = covering(ipaddress.ip_network(prefix), protected)
        if why:
            done.refused[prefix] = why
        elif r.code != C.XG_BAN_MANUAL and len(order) >= max_bans:
            done.refused[prefix] = f"max_bans ({max_bans}) reached"
        else:
            order.append((prefix, r))
    return order, done


class BanMaps:
    """The two ban tries of one interface."""

    def __init__(self, directory: Path, record: pins.Record):
        self.directory = directory
        self.record = record
        self.maps = {4: pins.open_map(directory, "ban4", record), 6: pins.open_map(directory, "ban6", record)}
        self.state = pins.open_map(directory, "banstate", record)
        self.notes_path = state_dir(record.netns, record.iface) / "bans.json"

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.state.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def records(self) -> dict[str, BanRecord]:
        """bans.json, prefix -> record (entries that do not parse are left out)."""
        out = {}
        raw = read_json(self.notes_path, {})
        for prefix, d in (raw if isinstance(raw, dict) else {}).items():
            try:
                ipaddress.ip_network(prefix)
                out[prefix] = BanRecord.from_json(d)
            except (TypeError, ValueError, AttributeError):
                continue
        return out

    def _save(self, records: dict[str, BanRecord]) -> None:
        """The one writer of bans.json; callers hold pins.locked()."""
        write_json_atomic(self.notes_path, {p: r.as_json() for p, r in records.items()})

    def _entry(self, net, expires_ns: int, reason: int):
        m = self.maps[net.version]
        v = m.Leaf()
        v.expires_ns = expires_ns
        v.reason = reason
        return m, _key(m, net), v

    def add(self, net, ttl_s: float | None, reason: int = C.XG_BAN_MANUAL, text: str = "",
            strict: bool = True) -> str | None:
        """Ban a prefix (renewing keeps its counters); hold pins.locked().
        When bans.json cannot be written: OSError, not banned; or with
        strict=False (watch) banned anyway, the error returned."""
        return self.add_many([Wanted(net, ttl_s or None, text or REASONS.get(reason, "manual"))],
                             reason, strict)

    def add_many(self, wanted: list[Wanted], reason: int = C.XG_BAN_MANUAL,
                 strict: bool = True) -> str | None:
        """Ban prefixes as add does, bans.json written once for all."""
        now, boot = time.time(), boot_ns()
        records = self.records()
        entries = []
        for w in wanted:
            m, k, v = self._entry(w.net, 0 if not w.ttl else boot + int(w.ttl * 1e9), reason)
            old = m.lookup(k)
            if old is not None:      # keep the drop counters of a renewed ban
                v.packets, v.bytes = old.packets, old.bytes
            entries.append((w.net, m, k, v))
            records[str(w.net)] = BanRecord(w.reason, reason, now, None if not w.ttl else now + w.ttl)
        # The note first: when bans.json cannot be written (disk full),
        # the ban is not put in force and the error says so.
        what = str(wanted[0].net) if len(wanted) == 1 else f"{len(wanted)} prefixes"
        failed = None
        try:
            self._save(records)
        except OSError as e:
            if strict:
                raise OSError(e.errno, f"{e.strerror}; {what} not banned") from None
            failed = f"{e.strerror}; {what} banned without its record"
        killpoint.step("ban-noted")
        for net, m, k, v in entries:
            insert(m, self.state, net.version, k, v)
        return failed

    def remove(self, net) -> bool:
        """Lift a ban; hold pins.locked()."""
        return bool(self.remove_many([net]))

    def remove_many(self, nets) -> list[str]:
        """Lift bans, bans.json written once (first, as in add: a failed
        write leaves the bans in force); returns the prefixes that were in
        the map. Hold pins.locked()."""
        records, changed = self.records(), False
        for net in nets:
            changed = records.pop(str(net), None) is not None or changed
        if changed:
            try:
                self._save(records)
            except OSError as e:
                what = f"the ban on {nets[0]} stays" if len(nets) == 1 else f"the bans on {len(nets)} prefixes stay"
                raise OSError(e.errno, f"{e.strerror}; {what} in force") from None
        lifted = []
        for net in nets:
            m = self.maps[net.version]
            if delete(m, self.state, net.version, _key(m, net)):
                lifted.append(str(net))
        return lifted

    def empty(self) -> bool:
        return all(bpfsys.map_get_next_key(m.fd, None, ctypes.sizeof(m.Key)) is None
                   for m in self.maps.values())

    def restore(self, max_bans: int, automatic_until: dict[str, float] | None = None) -> Restored | None:
        """Put the recorded bans that have not expired back into empty ban
        maps (after a reboot or a detach), with the time they have left;
        bans.json keeps only those. None when the maps hold bans already:
        they are then what is in force. Hold pins.locked()."""
        if not self.empty():
            return None
        records = self.records()
        now, boot = time.time(), boot_ns()
        order, done = plan_restore(records, automatic_until or {}, now, protected_networks(self.record),
                                   max_bans)
        kept: dict[str, BanRecord] = {}
        for prefix, r in order:
            net = ipaddress.ip_network(prefix)
            # At least 1 ns left: 0 would mean never.
            left = 0 if r.expires is None else boot + max(1, int((r.expires - now) * 1e9))
            m, k, v = self._entry(net, left, r.code)
            try:
                insert(m, self.state, net.version, k, v)
            except OSError as e:
                done.refused[prefix] = f"ban{net.version} map: {e.strerror or e}"
                continue
            kept[prefix] = r
            done.restored.append(prefix)
        for fam, m in self.maps.items():
            if bpfsys.map_get_next_key(m.fd, None, ctypes.sizeof(m.Key)) is None:
                _set_flag(self.state, fam, False)   # raised for an insert that failed
        if kept != records:
            self._save(kept)
        return done

    def entries(self) -> list[dict]:
        now, wall = boot_ns(), time.time()
        records = self.records()
        out = []
        for fam, m in self.maps.items():
            for k, v in m.items():
                raw = bytes(k.addr)[: 4 if fam == 4 else 16]
                net = ipaddress.ip_network((ipaddress.ip_address(raw), k.prefixlen))
                remaining = None if v.expires_ns == 0 else (v.expires_ns - now) / 1e9
                rec = records.get(str(net))
                out.append({"prefix": str(net), "reason": rec.reason if rec else REASONS.get(v.reason, "?"),
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
        """Delete expired bans; returns their prefixes. Hold pins.locked()."""
        gone = [e["prefix"] for e in self.entries() if e["expired"]]
        if gone:
            self.remove_many([ipaddress.ip_network(p) for p in gone])
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
