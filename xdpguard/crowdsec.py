"""xdpguard as a CrowdSec bouncer: `[crowdsec]`.

Every `interval`, a thread of `watch` asks the Local API for
/v1/decisions/stream (header X-Api-Key, the key of `cscli bouncers add`):
startup=true the first time and after any failure (the whole state), the
changes since the last pull otherwise. Ban decisions of the configured
scopes (ip, range) go into the ban maps for their duration, with origin
crowdsec:<scenario>; deleted ones come out. The same protection as fleet
bans: the allowlist, `protect` entries, the host's addresses and gateways,
and prefixes broader than min_prefix4/6 are refused (logged, counted).
Bans go in through bans.BanMaps, the one writer, under pins.locked().

With `push = true`, the same thread also logs in as a machine (machine_id,
password_file: `cscli machines add`) and pushes this interface's own bans
(origin local: watch's and `xdpguard ban`'s) as alerts with a ban
decision, origin "xdpguard", scenario xdpguard/<reason> (manual, syn_rate,
...); a ban lifted before its end has its decision deleted. Fleet bans and
CrowdSec's own decisions are never pushed, and the decisions this host
pushed are not taken back from the stream: no loop.
"""
from __future__ import annotations

import json
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

from xdpguard import bans
from xdpguard.fleet import BACKOFF_MAX, BACKOFF_MIN, SyncThread, read_secret
from xdpguard.layout import C
from xdpguard.policy import CrowdSec, Fleet

USER_AGENT = "xdpguard-bouncer/0.1"
PUSH_ORIGIN = "xdpguard"     # the origin of the decisions xdpguard pushes
NEVER_S = 10 * 365 * 86400   # a ban without end, as a decision (the LAPI wants a duration)
PUSH_TIMEOUT_S = 30
TIMEOUT_S = 120        # the LAPI takes seconds to list 100,000 decisions
FULL_AFTER_S = 3.0     # the whole state again this long after new decisions stop coming
FULL_GAP_S = 10.0      # at most this often for that
FULL_EVERY_S = 60.0    # and at least this often anyway,
FULL_COST = 30         # or, for a large state, this many times as long as one took
FULL_SMALL = 2000      # a whole state this small is asked for on every pull

_GO_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?)(h|ms|m|s|us|µs|ns)")


_GO_HMS = re.compile(r"(-?)(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_go_duration(text: str) -> float:
    """Seconds of a Go duration as the LAPI writes it ("3h59m58.9s", "-15ms")."""
    m = _GO_HMS.fullmatch(text)
    if m and any(m.groups()[1:]):         # the common form, in one match
        h, mi, sec = m.group(2), m.group(3), m.group(4)
        total = (int(h) * 3600 if h else 0) + (int(mi) * 60 if mi else 0) + (float(sec) if sec else 0.0)
        return -total if m.group(1) else float(total)
    t = text.strip()
    sign = -1.0 if t.startswith("-") else 1.0
    t = t.lstrip("+-")
    if t == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _GO_PART.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _GO_UNIT[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise ValueError(f"{text!r} is not a duration")
    return sign * total


def decision_prefix(d: dict, scopes) -> tuple[int, bytes, int, str] | None:
    """The prefix a ban decision of an allowed scope covers (as
    bans.split_prefix gives it), or None; ValueError when its value is no
    address or range."""
    scope = str(d.get("scope", "")).lower()
    if str(d.get("type", "")).lower() != "ban" or scope not in scopes:
        return None
    value = str(d.get("value", ""))
    if scope == "ip" and "/" in value:
        return None
    return bans.split_prefix(value)


class Bouncer(SyncThread):
    """Pulls the decision stream in a thread of `watch`."""
    THREAD = "xdpguard-crowdsec"
    JOIN_S = TIMEOUT_S + 5

    def __init__(self, cfg: CrowdSec, directory: Path, record: dict, protected, log,
                 fleet: Fleet | None = None):
        super().__init__()
        self.cfg = cfg
        self.key = read_secret(cfg.key_file, "[crowdsec] key_file").decode()
        self.directory = directory
        self.record = record
        self.protection = bans.Protection(protected)
        self.log = log
        # As broad as a fleet ban may be: [fleet]'s limits, or their defaults.
        limits = fleet or Fleet(redis="", key_file="")
        self.min_prefix = {4: limits.min_prefix4, 6: limits.min_prefix6}
        # prefix -> {decision id: (expires, scenario)}: a prefix stays banned
        # while any of its decisions lasts.
        self.active: dict[str, dict[int, tuple[float, str]]] = {}
        self._split: dict[str, tuple] = {}      # prefix -> bans.split_prefix(prefix)
        self.counters: Counter = Counter()
        self.connected = False
        self.last_pull: float | None = None
        self.last_applied: dict | None = None
        self._refused_logged: set[str] = set()
        self.seen: set = set()          # ids of the decisions given so far (since the last whole state)
        self.pusher = Pusher(cfg, bans.state_dir(record.netns, record.iface) / "crowdsec-push.json", log,
                             self.counters) if cfg.push else None

    def pull(self, startup: bool) -> dict:
        q = urlencode({"startup": "true" if startup else "false", "scopes": ",".join(self.cfg.scopes)})
        doc = lapi_json(self.cfg.lapi, "GET", f"/v1/decisions/stream?{q}", {"X-Api-Key": self.key})
        if not isinstance(doc, dict):
            raise ValueError("the LAPI answered with something else than a JSON object")
        return doc

    def _run(self) -> None:
        with bans.BanMaps(self.directory, self.record) as self.banmaps:
            self._loop()

    def _loop(self) -> None:
        startup, first, backoff = True, True, BACKOFF_MIN
        full_at, full_due, full_took, full_n = 0.0, None, 0.0, 0
        while not self.stop.is_set():
            t0 = time.monotonic()
            # The LAPI gives the decisions created after a bouncer's last
            # pull; one committed while a pull runs (an import's long
            # transaction, or any insert on a busy LAPI) is created
            # "before" and never given (CrowdSec's firewall bouncer decays
            # the same way). So the whole state on every pull while it is
            # small; else once new decisions stop coming (at most every
            # FULL_GAP_S), and now and then anyway, as rarely as its cost
            # asks.
            small = full_n <= FULL_SMALL
            full = not startup and (small
                                    or (full_due is not None and t0 >= full_due and t0 - full_at >= FULL_GAP_S)
                                    or t0 - full_at >= max(FULL_EVERY_S, FULL_COST * full_took))
            try:
                doc = self.pull(startup or full)
                self.last_pull = time.time()
                before = set(self.active)
                t1, waited = time.monotonic(), self.banmaps.lock_wait_s
                self.apply(self.banmaps, doc, startup or full)
                t2, waited = time.monotonic(), self.banmaps.lock_wait_s - waited
                if startup or full:
                    full_at, full_due = t0, None
                    full_took, full_n = time.monotonic() - t0, len(doc.get("new") or ())
                    missed = len(set(self.active) - before)
                    if full and not small and missed:
                        self.counters["missed_by_deltas"] += missed
                        self.log(f"crowdsec: the whole state had {missed} decisions the changes did not give")
                elif doc.get("new"):
                    full_due = time.monotonic() + max(FULL_AFTER_S, 2 * self.cfg.interval)
                if not self.connected:
                    # How long the whole state took: the LAPI's answer, then
                    # xdpguard's part, less its wait for the machine's pin lock.
                    self.log(f"crowdsec: pulling decisions from {self.cfg.lapi} every {self.cfg.interval:g}s; "
                             f"{sum(1 for v in self.active.values() if v)} bans in force (the LAPI answered in "
                             f"{t1 - t0:.2f} s, in force {t2 - t1 - waited:.2f} s later"
                             + (f", and {waited:.2f} s waiting for the pin lock)" if waited >= 0.01 else ")"))
                self.connected, startup, backoff = True, False, BACKOFF_MIN
                wait = self.cfg.interval - (time.monotonic() - t0)
            except urllib.error.HTTPError as e:
                wait, backoff, startup = self._failed(first, f"HTTP {e.code} {e.reason}"
                                                      + (" (is key_file the key of 'cscli bouncers add'?)"
                                                         if e.code == 403 else ""), backoff)
            except (urllib.error.URLError, OSError, ValueError) as e:
                wait, backoff, startup = self._failed(first, str(getattr(e, "reason", None) or e), backoff)
            except Exception as e:       # never let the thread die silently
                wait, backoff, startup = self._failed(first, f"{type(e).__name__}: {e}", backoff)
            first = False
            if self.pusher is not None:
                self.pusher.round(self.banmaps, time.time())
            self.stop.wait(max(0.0, wait))

    def _failed(self, first: bool, why: str, backoff: float):
        if self.connected or first:
            self.log(f"crowdsec: {'lost' if self.connected else 'cannot reach'} {self.cfg.lapi}: {why}; "
                     f"bans in force stay; retrying with backoff")
        self.connected = False
        self.counters["pull_errors"] += 1
        return (max(backoff * (0.8 + 0.4 * random.random()), self.cfg.interval),
                min(backoff * 2, BACKOFF_MAX), True)

    def _refuse(self, split, fresh: bool) -> bool:
        fam, _raw, plen, prefix = split
        least = self.min_prefix[fam]
        if plen < least:
            why, kind = f"broader than min_prefix{fam} = {least}", "refused_broad"
        else:
            why, kind = self.protection.why(split), "refused_protected"
            why = why and f"it {why}"
        if not why:
            return False
        self.counters[kind] += fresh
        if prefix not in self._refused_logged:
            self._refused_logged.add(prefix)
            self.log(f"crowdsec: not banning {prefix}: {why}")
        return True

    def apply(self, bm, doc: dict, startup: bool) -> tuple[int, int]:
        """One answer of the stream into the maps; (banned, lifted)."""
        now = time.time()
        if startup:
            touched, self.active = set(self.active), {}
        else:
            touched = set()
        for d in doc.get("deleted") or ():
            try:
                split = decision_prefix(d, self.cfg.scopes)
            except ValueError:
                continue
            p = split and split[3]
            if p is not None and p in self.active:
                self.active[p].pop(d.get("id"), None)
                touched.add(p)
                self.counters["deleted"] += 1
        ids = set()
        for d in doc.get("new") or ():
            # The whole state gives the same decisions again: counted once.
            did = d.get("id")
            ids.add(did)
            fresh = did not in self.seen
            try:
                split = decision_prefix(d, self.cfg.scopes)
                secs = parse_go_duration(str(d.get("duration", "")))
            except ValueError:
                self.counters["malformed"] += fresh
                continue
            if split is None:
                self.counters["ignored"] += fresh
                continue
            if self.pusher is not None and d.get("origin") == PUSH_ORIGIN and split[3] in self.pusher.pushed:
                self.counters["own"] += fresh      # this host's own ban, pushed: not taken back
                continue
            self.counters["new"] += fresh
            if secs <= 0 or self._refuse(split, fresh):
                continue
            p = split[3]
            self.active.setdefault(p, {})[did] = (now + secs, str(d.get("scenario") or "crowdsec"))
            self._split[p] = split
            touched.add(p)
        self.seen = ids if startup else self.seen | ids
        return self._enforce(bm, touched, now, startup)

    def _enforce(self, bm, touched: set[str], now: float, startup: bool) -> tuple[int, int]:
        """What changed into the maps (BanMaps.write)."""
        adds, lifts = [], []
        records = bm.records()
        if startup:      # the whole state: what an earlier run left goes too
            touched |= {p for p, r in records.items() if r.origin.startswith(bans.CROWDSEC_ORIGIN)}
        for p in touched:
            decisions = [v for v in self.active.get(p, {}).values() if v[0] > now]
            r = records.get(p)
            if not decisions:
                self.active.pop(p, None)
                self._split.pop(p, None)
                if r is not None and r.origin.startswith(bans.CROWDSEC_ORIGIN):
                    lifts.append(p)
                continue
            expires, scenario = max(decisions)
            if r is not None and (r.expires is None or r.expires >= expires - 1):
                continue         # in force already, at least as long
            adds.append(bans.Wanted.until(self._split.get(p, p), expires, scenario,
                                          bans.CROWDSEC_ORIGIN + scenario, C.XG_BAN_MANUAL, now))
        gone = bm.write(adds, lifts, now)
        self.counters["applied_ban"] += len(adds)
        self.counters["applied_unban"] += len(gone)
        if adds or gone:
            self.last_applied = {"banned": len(adds), "lifted": len(gone), "time": now}
        return len(adds), len(gone)

    def status(self) -> dict:
        return {"connected": self.connected, "last_pull": self.last_pull,
                "bans": sum(1 for v in self.active.values() if v), "counters": dict(self.counters)}


def lapi_json(base: str, method: str, path: str, headers: dict, body=None, timeout: float = TIMEOUT_S):
    """One call to the LAPI, JSON both ways (None for an empty answer)."""
    req = urllib.request.Request(f"{base.rstrip('/')}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def decision_scope(prefix: str) -> tuple[str, str]:
    """A ban's prefix as CrowdSec names it: ("Ip", address) for a single
    address, ("Range", prefix) otherwise."""
    fam, _raw, plen, _ = bans.split_prefix(prefix)
    return ("Ip", prefix.split("/")[0]) if plen == (32 if fam == 4 else 128) else ("Range", prefix)


class Pusher:
    """This interface's own bans to the LAPI, as a machine (push = true):
    each new one as an alert with its ban decision, each lifted before its
    end deleted. `pushed` (prefix -> [expires, scenario]) is kept in
    crowdsec-push.json, so that a ban lifted while watch was stopped, or
    the LAPI away, is deleted later."""

    def __init__(self, cfg: CrowdSec, state_path: Path, log, counters: Counter):
        self.cfg, self.state_path, self.log, self.counters = cfg, state_path, log, counters
        self.password = read_secret(cfg.password_file, "[crowdsec] password_file").decode()
        st = bans.read_json(state_path, {})
        pushed = st.get("pushed") if isinstance(st, dict) else None
        self.pushed: dict[str, list] = {p: v for p, v in (pushed if isinstance(pushed, dict) else {}).items()
                                        if isinstance(v, list) and len(v) == 2}
        self.token: str | None = None
        self.ok: bool | None = None      # the last round's outcome, for one line per change

    def _request(self, method: str, path: str, body=None, auth: bool = True):
        return lapi_json(self.cfg.lapi, method, path, {"Authorization": f"Bearer {self.token}"} if auth else {},
                         body, PUSH_TIMEOUT_S)

    def _call(self, method: str, path: str, body=None):
        """A watcher call; logs in first, and again when the token expired."""
        for attempt in (0, 1):
            if self.token is None:
                doc = self._request("POST", "/v1/watchers/login",
                                    {"machine_id": self.cfg.machine_id, "password": self.password,
                                     "scenarios": []}, auth=False)
                self.token = doc["token"]
            try:
                return self._request(method, path, body)
            except urllib.error.HTTPError as e:
                if e.code != 401 or attempt:
                    raise
                self.token = None

    @staticmethod
    def alert(prefix: str, r: bans.BanRecord, now: float) -> tuple[dict, str]:
        """The alert of one ban, and its decision's scenario."""
        scope, value = decision_scope(prefix)
        single = scope == "Ip"
        scenario = f"{PUSH_ORIGIN}/{bans.REASONS.get(r.code, 'manual')}"
        secs = NEVER_S if r.expires is None else max(1, int(r.expires - now))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since or now))
        return {"scenario": scenario, "scenario_hash": "", "scenario_version": "",
                "message": f"xdpguard banned {prefix}: {r.reason}", "events_count": 1,
                "start_at": stamp, "stop_at": stamp, "capacity": 0, "leakspeed": "0", "simulated": False,
                "events": [], "remediation": True,
                "source": {"scope": scope, "value": value, **({"ip": value} if single else {"range": value})},
                "decisions": [{"origin": PUSH_ORIGIN, "type": "ban", "scope": scope, "value": value,
                               "duration": f"{secs}s", "scenario": scenario}]}, scenario

    def round(self, bm, now: float) -> None:
        """Push what is new, delete what was lifted; failures are retried
        at the next round (one log line per change of state)."""
        changed = False
        try:
            local = {p: r for p, r in bm.records().items()
                     if r.origin == bans.LOCAL and (r.expires is None or r.expires > now)}
            stale = [p for p, (exp, _s) in self.pushed.items()
                     if (p not in local or local[p].expires != exp) and (exp is None or exp > now)]
            new = [p for p in local if p not in self.pushed or self.pushed[p][0] != local[p].expires]
            for p in [p for p, (exp, _s) in self.pushed.items() if p not in local and exp is not None and exp <= now]:
                del self.pushed[p]       # ended: the LAPI expires its decision itself
                changed = True
            for p in stale:
                scope, value = decision_scope(p)
                self._call("DELETE", "/v1/decisions?" + urlencode({scope.lower(): value,
                                                                    "scenario": self.pushed[p][1]}))
                del self.pushed[p]
                changed = True
                self.counters["push_deleted"] += 1
            for i in range(0, len(new), 100):
                batch = [(p, *self.alert(p, local[p], now)) for p in new[i:i + 100]]
                self._call("POST", "/v1/alerts", [a for _p, a, _s in batch])
                for p, _a, scenario in batch:
                    self.pushed[p] = [local[p].expires, scenario]
                changed = True
                self.counters["pushed"] += len(batch)
            if (stale or new) and self.ok is not True:
                self.log(f"crowdsec: pushing this host's bans to {self.cfg.lapi} as machine "
                         f"'{self.cfg.machine_id}'")
                self.ok = True
        except Exception as e:     # the pull goes on; the next round retries
            self.counters["push_errors"] += 1
            if isinstance(e, urllib.error.HTTPError):
                why = f"HTTP {e.code} {e.reason}" + (" (are machine_id and password_file those of 'cscli "
                                                     "machines add'?)" if e.code in (401, 403) else "")
            else:
                why = str(getattr(e, "reason", None) or e) or type(e).__name__
            if self.ok is not False:
                self.log(f"crowdsec: cannot push bans to {self.cfg.lapi}: {why}; retrying every interval")
            self.ok = False
        if changed:
            try:
                bans.write_json_atomic(self.state_path, {"pushed": self.pushed})
            except OSError as e:
                self.counters["push_errors"] += 1
                self.log(f"crowdsec: {e}")
