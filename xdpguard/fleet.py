"""Bans shared by a fleet of hosts through Redis (or Valkey): `[fleet]`.

Under the fleet's `name`, Redis holds

    NAME:events   a stream of ban and unban events (XADD, MAXLEN ~ STREAM_MAXLEN)
    NAME:bans     a hash, prefix -> its last ban event: the fleet's bans in
                  force, which a host resyncs from
    NAME:epoch    a random id, set by the first host that finds none: a new
                  one means the server lost its data (a restart without
                  persistence, a flush), and then the hash is no proof that
                  a ban was lifted

A ban or unban goes to both in one MULTI. Pub/sub would lose what an
offline host misses; a stream does not: each host follows it (XREAD
BLOCK) from its last id, kept in fleet.json in its state directory, so a
restart replays what it missed. After every (re)connection, and whenever
the stream was trimmed past its last id, it also resyncs from the hash.
Every event carries an absolute expiry: each host expires bans itself.
Each host republishes its own bans in force now and then, and on every
reconnection, so that a write lost with a server heals; and publishes the
unban of what it shared and no longer bans (lifted while Redis was away).

Trust: every event is signed, HMAC-SHA256 with the fleet's key file;
unsigned and badly signed events are dropped and counted. A host's own
allowlist, `protect` entries, addresses and gateways win over a fleet ban,
and so do `min_prefix4` / `min_prefix6` (logged, counted). Bans go into
the maps through bans.BanMaps, the one writer, under pins.locked().
"""
from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from xdpguard import bans, pins
from xdpguard.layout import C
from xdpguard.policy import Fleet

STREAM_MAXLEN = 100_000      # events kept (approximately): hours of a busy fleet
REPUBLISH_S = 60.0           # own bans back into the hash at least this often
BLOCK_MS = 1000              # XREAD BLOCK: how long a quiet stream is waited on
CHECK_TRIM_S = 10.0          # how often a follower checks it was not trimmed past
BATCH = 1000                 # events per XREAD, hash entries per HSCAN step
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
VERSION = 1


class FleetError(Exception):
    """[fleet] cannot work as configured (a secret file is unreadable)."""


def read_secret(path: str, what: str) -> bytes:
    """A secret from its file, surrounding whitespace (a final newline) off."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise FleetError(f"{what} {path}: {e.strerror or e}") from None
    if not data:
        raise FleetError(f"{what} {path} is empty")
    return data


def connect(cfg: Fleet):
    """A client of the fleet's Redis; rediss:// is TLS (redis-py), the
    password comes from password_file, never from a command line."""
    import redis
    password = read_secret(cfg.password_file, "[fleet] password_file").decode() if cfg.password_file else None
    return redis.Redis.from_url(cfg.redis, password=password, decode_responses=True,
                                socket_connect_timeout=3, socket_timeout=BLOCK_MS / 1000 + 10,
                                health_check_interval=15)


def redis_errors() -> tuple[type, ...]:
    import redis
    return (redis.RedisError, OSError)


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class Event:
    """A ban or unban as the fleet sees it (the signed payload)."""
    op: str                       # "ban" | "unban"
    prefix: str
    host: str                     # the host that made it
    fleet: str                    # [fleet] name: an event of another fleet is refused
    expires: float | None = None  # wall clock; None: never
    reason: str = ""
    code: int = C.XG_BAN_MANUAL   # XG_BAN_*: manual or the metric that banned
    offence: int = 0
    time: float = 0.0

    def payload(self) -> str:
        return json.dumps({"v": VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":"))


class BadEvent(Exception):
    """An event to drop; `kind` counts it: unsigned, bad_signature, malformed."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def sign(key: bytes, payload: str) -> str:
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def decode(payload: str | None, sig: str | None, key: bytes, fleet: str) -> Event:
    """The event of a signed payload; BadEvent when it is not one."""
    if not payload or not sig:
        raise BadEvent("unsigned")
    if not hmac.compare_digest(sign(key, payload), sig):
        raise BadEvent("bad_signature")
    try:
        d = json.loads(payload)
        d.pop("v", None)
        ev = Event(**d)
        # Keyed as the records are, whoever wrote the text.
        ev = replace(ev, prefix=bans.split_prefix(ev.prefix)[3])
        if ev.op not in ("ban", "unban") or not isinstance(ev.host, str) or (
                ev.expires is not None and not isinstance(ev.expires, (int, float))):
            raise ValueError(ev.op)
    except (TypeError, ValueError, AttributeError):
        raise BadEvent("malformed") from None
    if ev.fleet != fleet:
        raise BadEvent("malformed")
    return ev


def _id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _covers(expires: float | None, other: float | None) -> bool:
    """Whether a ban ending at `expires` lasts at least as long as `other`."""
    return expires is None or (other is not None and expires >= other)


class Channel:
    """One fleet's keys on one Redis server, and the key that signs."""

    def __init__(self, cfg: Fleet, client=None, key: bytes | None = None):
        self.cfg = cfg
        self.key = key or read_secret(cfg.key_file, "[fleet] key_file")
        self.client = client if client is not None else connect(cfg)
        self.stream, self.hash, self.epoch_key = (f"{cfg.name}:events", f"{cfg.name}:bans", f"{cfg.name}:epoch")

    def event(self, op: str, prefix: str, expires: float | None = None, reason: str = "",
              code: int = C.XG_BAN_MANUAL, offence: int = 0) -> Event:
        return Event(op, prefix, self.cfg.host, self.cfg.name, expires, reason, code, offence, time.time())

    def publish(self, events: list[Event]) -> None:
        """XADD each event and set (ban) or clear (unban) its prefix in the
        hash, in one MULTI per batch."""
        for i in range(0, len(events), BATCH):
            pipe = self.client.pipeline(transaction=True)
            for ev in events[i:i + BATCH]:
                payload = ev.payload()
                sig = sign(self.key, payload)
                pipe.xadd(self.stream, {"e": payload, "s": sig}, maxlen=STREAM_MAXLEN, approximate=True)
                if ev.op == "ban":
                    pipe.hset(self.hash, ev.prefix, f"{sig} {payload}")
                else:
                    pipe.hdel(self.hash, ev.prefix)
            pipe.execute()

    def hash_entries(self):
        """(prefix, Event or BadEvent) of every entry of the hash."""
        for prefix, value in self.client.hscan_iter(self.hash, count=BATCH):
            sig, _, payload = (value or "").partition(" ")
            try:
                ev = decode(payload, sig, self.key, self.cfg.name)
                if ev.prefix != prefix:
                    raise BadEvent("malformed")
                yield prefix, ev
            except BadEvent as e:
                yield prefix, e

    def delete_if_unchanged(self, prefix: str, ev: Event) -> None:
        """HDEL an expired entry unless a newer ban replaced it meanwhile."""
        self.client.eval("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
                         "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
                         1, self.hash, prefix, f"{sign(self.key, ev.payload())} {ev.payload()}")

    def stream_info(self) -> dict | None:
        import redis
        try:
            return self.client.xinfo_stream(self.stream)
        except redis.ResponseError:        # no stream yet
            return None

    def epoch(self) -> str:
        self.client.set(self.epoch_key, secrets.token_hex(8), nx=True)
        return self.client.get(self.epoch_key)


def missed(last_id: str | None, info: dict | None) -> str | None:
    """Why following the stream from last_id would miss events (the stream
    was trimmed past it, or is not the one last_id came from), or None.

    Trimming removes the oldest entries: when the first entry left is newer
    than last_id, or none is left although some came after last_id, what
    came next may be gone (or only last_id itself: a resync costs little)."""
    if not last_id:
        return None
    if info is None:
        return None if last_id == "0-0" else "the stream is gone"
    last, newest = _id(last_id), _id(info["last-generated-id"])
    if last > newest:
        return "the stream is newer than the last id read"
    md = info.get("max-deleted-entry-id")          # XDEL (Redis 7)
    if last == newest or (md is not None and _id(md) > last):
        return None if last == newest else "the stream was trimmed past the last id read"
    if last == (0, 0) and "entries-added" in info:
        # Read before the stream began: missed only if some entry is gone.
        return "the stream was trimmed past the last id read" if info["entries-added"] > info["length"] else None
    first = info.get("first-entry")
    if not first or _id(first[0]) > last:
        return "the stream was trimmed past the last id read"
    return None


# ---------------------------------------------------------------- one-shot publishing (the CLI)

def share(records, events) -> list[str]:
    """Publish the (op, prefix, expires, reason) events of `xdpguard
    ban/unban` to every fleet of the interfaces they were made on
    (publish = true); one line each, for the operator. Redis down is no
    error: watch republishes."""
    out, seen = [], set()
    for rec in records:
        raw = rec.fleet
        if not raw:
            continue
        cfg = Fleet(**raw)
        ident = (cfg.redis, cfg.name, cfg.host)
        if not cfg.publish or ident in seen:
            continue
        seen.add(ident)
        try:
            ch = Channel(cfg)
            ch.client.connection_pool.connection_kwargs["socket_timeout"] = 5
            try:
                ch.publish([ch.event(op, str(net), expires, reason) for op, net, expires, reason in events])
            finally:
                ch.client.close()
            out.append(f"shared with fleet '{cfg.name}' on {cfg.redis} as {cfg.host}")
        except FleetError as e:
            out.append(f"warning: not shared with fleet '{cfg.name}': {e}")
        except redis_errors() as e:
            out.append(f"warning: not shared with fleet '{cfg.name}' now ({cfg.redis}: {e}); "
                       "'watch' shares it when Redis is back")
    return out


# ---------------------------------------------------------------- the sync behind `watch`

class SyncThread:
    """A thread of `watch` that syncs bans with a service (FleetSync,
    crowdsec.Bouncer): its _run until `stop` is set."""
    THREAD = "xdpguard-sync"
    JOIN_S = 15.0            # how long close waits for a call in flight

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.THREAD, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread:
            self._thread.join(self.JOIN_S)


class FleetSync(SyncThread):
    """Follows the fleet in a thread of `watch`: applies the others' bans,
    shares this host's. Redis away: local filtering and bans go on."""

    def __init__(self, cfg: Fleet, directory: Path, record: dict, protected, log):
        super().__init__()
        self.cfg = cfg
        self.key = read_secret(cfg.key_file, "[fleet] key_file")
        if cfg.password_file:
            read_secret(cfg.password_file, "[fleet] password_file")
        self.directory = directory
        self.record = record
        self.protection = bans.Protection(protected)
        self.log = log
        self.state_path = bans.state_dir(record.netns, record.iface) / "fleet.json"
        st = bans.read_json(self.state_path, {})
        st = st if isinstance(st, dict) else {}
        self.last_id: str | None = st.get("last_id") if isinstance(st.get("last_id"), str) else None
        self.epoch_seen: str | None = st.get("epoch") if isinstance(st.get("epoch"), str) else None
        mine = st.get("mine")
        self.mine: dict[str, float | None] = dict(mine) if isinstance(mine, dict) else {}
        self.counters: Counter = Counter()
        self.connected = False
        self.lag: float | None = None
        self.ch: Channel | None = None
        self._dirty = False
        self._refused_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ lifecycle

    THREAD = "xdpguard-fleet"
    JOIN_S = BLOCK_MS / 1000 + 15

    def close(self) -> None:
        super().close()
        self._save()

    def _save(self) -> None:
        """The one writer of fleet.json."""
        bans.write_json_atomic(self.state_path, {"last_id": self.last_id, "epoch": self.epoch_seen,
                                                 "mine": self.mine, "counters": dict(self.counters)})
        self._dirty = False

    def _run(self) -> None:
        errors = redis_errors()
        backoff, first = BACKOFF_MIN, True
        while not self.stop.is_set():
            try:
                self.ch = Channel(self.cfg, key=self.key)
                with bans.BanMaps(self.directory, self.record) as bm:
                    self._on_connect(bm)
                    backoff = BACKOFF_MIN
                    self._follow(bm)
            except Exception as e:     # never let the thread die silently
                if self.connected or first:
                    what = (f"{'lost' if self.connected else 'cannot reach'} {self.cfg.redis}: {e}"
                            if isinstance(e, errors) else f"{type(e).__name__}: {e} (a bug: please report it)")
                    self.log(f"fleet: {what}; local filtering and bans go on; reconnecting with backoff")
                self.connected = False
                self.stop.wait(backoff * (0.8 + 0.4 * random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                first = False
                if self.ch is not None:
                    try:
                        self.ch.client.close()
                    except Exception:
                        pass
                if self._dirty:
                    self._save()

    # ------------------------------------------------------------ connecting

    def _on_connect(self, bm) -> None:
        ch = self.ch
        epoch = ch.epoch()
        lost = self.epoch_seen is not None and epoch != self.epoch_seen
        info = ch.stream_info()
        why = "Redis lost its data (new epoch)" if lost else missed(self.last_id, info)
        replayed = 0
        if why is None and self.last_id:
            replayed = self._replay(bm)
        else:
            self.last_id = info["last-generated-id"] if info else "0-0"
        self.epoch_seen = epoch
        added, lifted, n = self._resync(bm, authoritative=not lost)
        self.connected = True
        self._dirty = True
        parts = [f"fleet: connected to {self.cfg.redis} as {self.cfg.host}"]
        parts.append(f"replayed {replayed} events" if why is None else f"{why}: resynced")
        parts.append(f"{n} fleet bans in force (+{added} -{lifted})"
                     + ("; nothing lifted, own bans republished" if lost else ""))
        self.log("; ".join(parts))
        self._republish(bm)
        self._next_republish = time.monotonic() + REPUBLISH_S

    def _replay(self, bm) -> int:
        n = 0
        while not self.stop.is_set():
            got = self.ch.client.xread({self.ch.stream: self.last_id}, count=BATCH)
            entries = got[0][1] if got else []
            if not entries:
                return n
            self._apply_entries(bm, entries)
            n += len(entries)
        return n

    # ------------------------------------------------------------ following

    def _follow(self, bm) -> None:
        next_check = time.monotonic() + CHECK_TRIM_S
        next_save = time.monotonic() + 1.0
        while not self.stop.is_set():
            got = self.ch.client.xread({self.ch.stream: self.last_id}, count=BATCH, block=BLOCK_MS)
            entries = got[0][1] if got else []
            if entries:
                self._apply_entries(bm, entries)
            now = time.monotonic()
            if len(entries) == BATCH or now >= next_check:
                why = missed(self.last_id, self.ch.stream_info())
                if why:
                    info = self.ch.stream_info()
                    self.last_id = info["last-generated-id"] if info else "0-0"
                    added, lifted, n = self._resync(bm, authoritative=True)
                    self.log(f"fleet: {why}: resynced; {n} fleet bans in force (+{added} -{lifted})")
                    self._dirty = True
                next_check = now + CHECK_TRIM_S
            if now >= self._next_republish:
                self._republish(bm)
                self._next_republish = now + REPUBLISH_S
            if self._dirty and now >= next_save:
                self._save()
                next_save = now + 1.0

    def _apply_entries(self, bm, entries) -> None:
        """Stream entries, in order, into the ban maps (one write)."""
        final: dict[str, Event] = {}
        for eid, fields in entries:
            self.last_id = eid
            self.counters["received"] += 1
            try:
                ev = decode(fields.get("e"), fields.get("s"), self.key, self.cfg.name)
            except BadEvent as e:
                self._bad(e.kind)
                continue
            self.lag = max(0.0, time.time() - _id(eid)[0] / 1000)
            if self._accept(ev):
                final[ev.prefix] = ev
        self._dirty = True
        if final:
            self._apply(bm, list(final.values()))

    def _bad(self, kind: str) -> None:
        self.counters[kind] += 1
        n = sum(self.counters[k] for k in ("unsigned", "bad_signature", "malformed"))
        if n == 1 or n % 1000 == 0:
            self.log(f"fleet: dropped a {kind.replace('_', ' ')} event ({n} dropped so far; counted in "
                     f"xdpguard_fleet_events_total)")

    def _accept(self, ev: Event) -> bool:
        """Whether an event of another host is for this one to apply."""
        if ev.host == self.cfg.host:
            self.counters["own"] += 1
            return False
        if not self.cfg.subscribe:
            return False
        if ev.op == "unban":
            return True
        fam, _raw, plen, _ = bans.split_prefix(ev.prefix)
        least = self.cfg.min_prefix4 if fam == 4 else self.cfg.min_prefix6
        why = (f"broader than min_prefix{fam} = {least}" if plen < least else self.protection.why(ev.prefix))
        if why:
            kind = "refused_broad" if plen < least else "refused_protected"
            self.counters[kind] += 1
            if (ev.prefix, ev.host) not in self._refused_logged:
                self._refused_logged.add((ev.prefix, ev.host))
                self.log(f"fleet: not banning {ev.prefix} from {ev.host}: it {why}" if kind == "refused_protected"
                         else f"fleet: not banning {ev.prefix} from {ev.host}: {why}")
            return False
        if ev.expires is not None and ev.expires <= time.time():
            self.counters["expired"] += 1
            return False
        return True

    def _apply(self, bm, events: list[Event]) -> tuple[int, int]:
        """Accepted events into the maps: a ban unless one at least as long
        is in force; an unban lifts a local or fleet ban (a CrowdSec
        decision stays: the LAPI lifts it), through BanMaps.write. Returns
        (banned, lifted)."""
        now = time.time()
        records = bm.records()
        adds, lifts = [], []
        for ev in events:
            r = records.get(ev.prefix)
            if ev.op == "ban":
                if r is not None and _covers(r.expires, ev.expires) and (r.expires is None or r.expires > now):
                    continue
                adds.append(bans.Wanted.until(ev.prefix, ev.expires, ev.reason or "manual",
                                              bans.FLEET_ORIGIN + ev.host, ev.code, now))
            elif r is not None and not r.origin.startswith(bans.CROWDSEC_ORIGIN):
                lifts.append(ev.prefix)
                self.mine.pop(ev.prefix, None)   # lifted: nothing for this host to unban
        gone = bm.write(adds, lifts, now)
        self.counters["applied_ban"] += len(adds)
        self.counters["applied_unban"] += len(gone)
        return len(adds), len(gone)

    # ------------------------------------------------------------ resync, republish

    def _resync(self, bm, authoritative: bool) -> tuple[int, int, int]:
        """Make the fleet bans here those of the hash. Not authoritative
        (the server lost its data): add, never lift."""
        desired: dict[str, Event] = {}
        for prefix, ev in self.ch.hash_entries():
            if isinstance(ev, BadEvent):
                self._bad(ev.kind)
            elif self._accept(ev):
                desired[prefix] = ev
        added, _ = self._apply(bm, list(desired.values())) if desired else (0, 0)
        stale = [p for p, r in bm.records().items() if r.origin.startswith(bans.FLEET_ORIGIN) and p not in desired]
        lifted = len(bm.write([], stale)) if authoritative else 0
        return added, lifted, len(desired)

    def _own_bans(self) -> tuple[dict[str, bans.BanRecord], set[str]]:
        """This host's own bans in force ({prefix: record}), and every
        prefix banned here whatever its origin, over the interfaces this
        host shares bans from (same fleet and host)."""
        now = time.time()
        own, any_origin = {}, set()
        for netns, iface, d in pins.all_pinned():
            try:
                rec = pins.read_record(d)
            except (OSError, pins.PinError):
                continue
            f = (rec.fleet if rec else None) or {}
            if (f.get("name"), f.get("host"), f.get("redis")) != (self.cfg.name, self.cfg.host, self.cfg.redis):
                continue
            raw = bans.read_json(bans.state_dir(netns, iface) / "bans.json", {})
            for p, d_ in (raw if isinstance(raw, dict) else {}).items():
                try:
                    r = bans.BanRecord.from_json(d_)
                except (TypeError, ValueError, AttributeError):
                    continue
                if r.expires is not None and r.expires <= now:
                    continue
                any_origin.add(p)
                if r.origin == bans.LOCAL and _covers(r.expires, own[p].expires if p in own else 0.0):
                    own[p] = r
        return own, any_origin

    def _republish(self, bm) -> None:
        """Own bans in force that the hash lacks (or holds shorter) go in
        again; what this host shared and bans no more goes out."""
        if not self.cfg.publish:
            return
        now = time.time()
        # The hash before the files: `xdpguard ban` and `unban` (and watch's
        # own bans) write the files first, then Redis, so what this host
        # shared is in its files if it is in the hash. The other way round,
        # a ban made between the two reads would be in the hash only, taken
        # for one lifted, and unbanned across the fleet.
        in_hash: dict[str, Event] = {p: ev for p, ev in self.ch.hash_entries() if isinstance(ev, Event)}
        own, any_origin = self._own_bans()
        events = [self.ch.event("ban", p, r.expires, r.reason, r.code) for p, r in own.items()
                  if p not in in_hash or not _covers(in_hash[p].expires, r.expires)]
        shared = {p: ev.expires for p, ev in in_hash.items() if ev.host == self.cfg.host}
        for p, exp in {**self.mine, **shared}.items():
            if p in any_origin:
                continue
            if exp is not None and exp <= now:
                if p in in_hash and in_hash[p].host == self.cfg.host:
                    self.ch.delete_if_unchanged(p, in_hash[p])
                continue
            events.append(self.ch.event("unban", p))
        if events:
            self.ch.publish(events)
            self.counters["published"] += len(events)
        self.mine = {p: r.expires for p, r in own.items()}
        self._dirty = True

    # ------------------------------------------------------------ this host's bans

    def share(self, op: str, net, expires: float | None = None, reason: str = "", code: int = C.XG_BAN_MANUAL,
              offence: int = 0) -> None:
        """Publish a ban `watch` made now (from its own thread); while Redis
        is away, the republish after reconnecting shares it."""
        if not self.cfg.publish or not self.connected or self.ch is None:
            return
        try:
            self.ch.publish([self.ch.event(op, str(net), expires, reason, code, offence)])
            self.counters["published"] += 1
            if op == "ban":
                self.mine[str(net)] = expires
        except redis_errors():
            pass

    def status(self) -> dict:
        return {"connected": self.connected, "lag_s": self.lag, "last_id": self.last_id,
                "counters": dict(self.counters)}
