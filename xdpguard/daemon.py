"""The mitigation daemon behind `xdpguard watch`, and the sampler `top` shares.

Every interval it reads per-source traffic counted at XDP (map `srcstat`,
only while [mitigation] is enabled) and per-source / per-destination TCP
behaviour from the kernel probes, turns them into rates, bans a source
whose rate stays over a threshold for `window` into the pinned ban map
(the XDP program then drops it first thing), and lifts expired bans.
Offender history lives in /var/lib/xdpguard/<netns>/<iface>/watch.json,
written atomically, so a restart or a SIGKILL loses nothing: the bans
themselves are in the pinned map, and recorded in bans.json (bans.py),
from which they come back when a reboot or a detach empties the pins.
"""
from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from xdpguard import bans, bpfsys, killpoint, pins
from xdpguard.errors import UsageError
from xdpguard.layout import C
from xdpguard.logline import ERROR, INFO, NOTICE, WARNING, journal_stream, rfc3339, syslog_prefix
from xdpguard.policy import Policy

METRICS = (("syn_rate", C.XG_BAN_SYN_RATE), ("conn_rate", C.XG_BAN_CONN_RATE),
           ("pps", C.XG_BAN_PPS), ("bps", C.XG_BAN_BPS))


# ---------------------------------------------------------------- sampling

def _src_prefix(family: int, raw: bytes, plen: int) -> str:
    if family == 4:
        # Once per new source, so up to 10,000 a second in a spoofed
        # flood: inet_ntop is 30 times cheaper than ipaddress, and its
        # IPv4 text is the same.
        v = int.from_bytes(raw[:4], "big") >> (32 - plen) << (32 - plen) if plen else 0
        return f"{socket.inet_ntop(socket.AF_INET, v.to_bytes(4, 'big'))}/{plen}"
    addr = ipaddress.ip_address(raw[:16])
    return str(ipaddress.ip_network((addr, plen), strict=False))


class Sampler:
    """Per-source rates from the XDP `srcstat` map and the probes."""

    def __init__(self, directory: Path | None, record: pins.Record, probes=None, srcstat=None):
        """srcstat: the map itself (a test rig's) instead of the pin."""
        self.record = record
        self.srcstat = srcstat or pins.open_map(directory, "srcstat", record)
        self.probes = probes
        self.p4 = record.mitigation.prefix4
        self.p6 = record.mitigation.prefix6
        self.prev_xdp: dict[bytes, tuple] = {}
        self.prev_probe: dict | None = None
        self.prev_t: float | None = None
        self._names: dict[bytes, str] = {}

    def close(self) -> None:
        self.srcstat.close()

    def _read_xdp(self) -> dict[bytes, tuple[int, int, int]]:
        """{raw key: (packets, bytes, syns) summed over CPUs}."""
        m = self.srcstat
        ks, vs = ctypes.sizeof(m.Key), ctypes.sizeof(m.Leaf)
        pvs = bpfsys.percpu_value_size(vs)
        try:
            keys, values, n = bpfsys.map_dump_batch(m.fd, ks, pvs, chunk=4096)
        except OSError:
            items = [(k, bpfsys.map_lookup(m.fd, k, pvs)) for k in bpfsys.map_keys(m.fd, ks)]
            items = [(k, v) for k, v in items if v is not None]
            keys, values, n = b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)
        # struct xg_srcstat is all u64 counters. The values are n x ncpu
        # copies of nf u64 back to back: field i of CPU c of entry j is at
        # (j * ncpu + c) * nf + i. Sums by column slices, not per entry in
        # Python (10,000 sources a second).
        nf = vs // 8
        assert nf * 8 == vs and len(m.Leaf._fields_) == nf
        ncpu = pvs // vs
        q = memoryview(values).cast("Q")

        def column(i: int):
            per_cpu = [q[c * nf + i::ncpu * nf] for c in range(ncpu)]
            return per_cpu[0].tolist() if ncpu == 1 else map(sum, zip(*per_cpu))

        cols = [column(getattr(m.Leaf, f).offset // 8) for f in ("packets", "bytes", "syns")]
        return dict(zip([keys[j * ks:(j + 1) * ks] for j in range(n)], zip(*cols)))

    def _prefix(self, k: bytes) -> str:
        p = self._names.get(k)
        if p is None:
            fam = k[0]
            p = self._names[k] = _src_prefix(fam, k[4:20], self.p4 if fam == 4 else self.p6)
            if len(self._names) > 4 * C.XG_SRCSTAT_MAX:
                self._names.clear()
        return p

    def sample(self) -> tuple[float, dict[str, dict], dict[str, dict]]:
        """(seconds since last sample, per-source rates, per-destination rates).

        Rates are per second: pps, bps (bytes), syn_rate, conn_rate,
        synack_retrans, resets. The first call returns empty rates."""
        now = time.monotonic()
        xdp = self._read_xdp()
        probe = self.probes.snapshot() if self.probes else None
        dt = None if self.prev_t is None else max(1e-6, now - self.prev_t)
        sources: dict[str, dict] = {}
        dests: dict[str, dict] = {}
        if dt is not None:
            # The loop below runs once per tracked source (10,000 a second):
            # one dict per source, made whole, no call per source.
            prev, zero, names, inv = self.prev_xdp, (0, 0, 0), self._names, 1.0 / dt
            for k, (pk, by, sy) in xdp.items():
                p = prev.get(k, zero)
                if pk < p[0]:
                    p = zero          # evicted and re-created: count from zero
                name = names.get(k) or self._prefix(k)
                pps, bps, syn = (pk - p[0]) * inv, (by - p[1]) * inv, (sy - p[2]) * inv
                s = sources.get(name)
                if s is None:
                    # syn_rate: the XDP view until the probes' is known.
                    sources[name] = {"pps": pps, "bps": bps, "xdp_syn_rate": syn, "probe_syn_rate": 0.0,
                                     "syn_rate": syn, "conn_rate": 0.0, "synack_retrans": 0.0, "resets": 0.0}
                else:                 # several addresses in one prefix
                    s["pps"] += pps
                    s["bps"] += bps
                    s["xdp_syn_rate"] += syn
                    s["syn_rate"] += syn
            if probe is not None and self.prev_probe is not None:
                r = self.probes.rates(self.prev_probe, probe, dt)
                for key, c in r["sources"].items():
                    s = sources.setdefault(key, _zero())
                    s["probe_syn_rate"] += c["syns"]
                    s["conn_rate"] += c["handshakes"]
                    s["synack_retrans"] += c["synack_retrans"]
                    s["resets"] += c["resets"]
                    # SYNs at XDP include those a listener never sees
                    # (dropped, banned, to closed ports): the larger view wins.
                    s["syn_rate"] = max(s["xdp_syn_rate"], s["probe_syn_rate"])
                for key, c in r["dests"].items():
                    dests[key] = {"syn_rate": c["syns"], "conn_rate": c["handshakes"],
                                  "synack_retrans": c["synack_retrans"], "resets": c["resets"]}
            self._clear_idle(xdp)
        self.prev_xdp, self.prev_probe, self.prev_t = xdp, probe, now
        if self.probes is not None and probe is not None:
            try:
                self.probes.clear_idle(probe)
            except Exception:
                pass
        return (dt or 0.0), sources, dests

    def _clear_idle(self, cur: dict) -> None:
        """Forget sources with no traffic in the last interval (bounded map)."""
        idle = [k for k, v in cur.items() if self.prev_xdp.get(k) == v]
        for k in idle:
            bpfsys.map_delete(self.srcstat.fd, k)
            cur.pop(k, None)


def _zero() -> dict:
    return {"pps": 0.0, "bps": 0.0, "xdp_syn_rate": 0.0, "probe_syn_rate": 0.0, "syn_rate": 0.0,
            "conn_rate": 0.0, "synack_retrans": 0.0, "resets": 0.0}


def open_probes(mitigation, log_err=None):
    """Kernel probes, kprobes where available (run-time detection), else
    tracepoints; None if neither can be attached (XDP counts still work)."""
    try:
        from xdpguard.probes.collector import ProbeSet
        return ProbeSet.open("auto", prefix4=mitigation.prefix4, prefix6=mitigation.prefix6)
    except Exception as e:   # the daemon keeps working on XDP counts alone
        if log_err:
            log_err(f"kernel probes unavailable ({e}); using XDP counters only")
        return None


# ---------------------------------------------------------------- decisions

@dataclass
class Decision:
    action: str              # "ban" | "unban"
    source: str
    metric: str | None = None
    observed: float | None = None
    threshold: float | None = None
    duration: float | None = None
    offence: int | None = None
    dry_run: bool = False
    reason: str | None = None
    time: float = field(default_factory=time.time)

    @property
    def priority(self) -> int:
        """Its syslog priority in the journal."""
        return NOTICE if self.action == "ban" else INFO

    def as_json(self) -> dict:
        d = {"time": rfc3339(self.time), "time_epoch": round(self.time, 3),
             "action": self.action, "source": self.source, "metric": self.metric,
             "observed": None if self.observed is None else round(self.observed, 1),
             "threshold": self.threshold, "duration": self.duration, "offence": self.offence}
        if self.dry_run:
            d["dry_run"] = True
        if self.reason:
            d["reason"] = self.reason
        return d

    def human(self, stamped: bool = True) -> str:
        """One line; stamped=False leaves the time out (the journal has it)."""
        t = f"{rfc3339(self.time)} " if stamped else ""
        if self.action == "ban":
            dr = " (dry run: not banned)" if self.dry_run else ""
            return (f"{t}ban {self.source}: {self.metric} {self.observed:.0f}/s over {self.threshold:g}/s; "
                    f"{self.duration:.0f}s (offence {self.offence}){dr}")
        return f"{t}unban {self.source}: {self.reason or 'expired'}"


class Mitigator:
    """Thresholds, windows and offence history: pure logic, testable alone."""

    def __init__(self, policy: Policy, protected, state: dict | None = None):
        self.m = policy.mitigation
        self.protected = protected
        self.state = state or {"offenders": {}, "bans": {}}
        self.over_since: dict[tuple[str, str], float] = {}

    def thresholds(self) -> list[tuple[str, int, float]]:
        out = []
        for name, code in METRICS:
            rate = getattr(self.m, name)
            if rate is not None:
                out.append((name, code, rate.per_second))
        return out

    def is_protected(self, prefix: str) -> bool:
        net = ipaddress.ip_network(prefix)
        return any(p.version == net.version and p.overlaps(net) for p, _why in self.protected)

    def offences(self, prefix: str, wall: float) -> int:
        """The offences of a source that count at wall-clock time `wall`:
        none once [mitigation] forget has passed since its last ban ended."""
        o = self.state["offenders"].get(prefix)
        if not isinstance(o, dict):
            return 0
        if self.m.forget is not None and wall >= _ban_end(o) + self.m.forget:
            return 0
        return int(o.get("offences", 0))

    def forget_old(self, wall: float) -> list[str]:
        """Drop the offenders whose offences no longer count (watch.json
        stays the size of the recent offenders); returns them."""
        gone = [p for p in self.state["offenders"] if not self.offences(p, wall)]
        for p in gone:
            del self.state["offenders"][p]
        return gone

    def evaluate(self, now: float, dt: float, sources: dict[str, dict], active: set[str],
                 wall: float | None = None) -> list[Decision]:
        """Bans due at monotonic time `now` (wall: the wall clock, for
        offence decay; default the current time)."""
        out = []
        seen = set()
        thresholds = self.thresholds()
        for prefix, rates in sources.items():
            if prefix in active:
                continue
            for name, code, thr in thresholds:
                if rates.get(name, 0.0) <= thr:
                    continue
                key = (prefix, name)
                seen.add(key)
                start = self.over_since.setdefault(key, now - dt)
                if now - start + 1e-6 < self.m.window:
                    continue
                if self.is_protected(prefix):
                    continue
                off = self.offences(prefix, time.time() if wall is None else wall)
                duration = min(self.m.ban * (2 ** off), self.m.ban_max)
                out.append(Decision("ban", prefix, name, rates[name], thr, duration, off + 1,
                                    dry_run=self.m.dry_run))
                break
        for key in list(self.over_since):
            if key not in seen:
                del self.over_since[key]
        return out

    def record_ban(self, d: Decision) -> None:
        self.state["offenders"][d.source] = {"offences": d.offence, "last_ban": d.time,
                                             "until": d.time + d.duration}
        self.state["bans"][d.source] = {"until": d.time + d.duration, "metric": d.metric,
                                        "offence": d.offence}
        for key in [k for k in self.over_since if k[0] == d.source]:
            del self.over_since[key]


def _ban_end(offender: dict) -> float:
    """When an offender's last ban ended (wall clock; older watch.json
    entries have only its start)."""
    end = offender.get("until", offender.get("last_ban", 0.0))
    return float(end) if isinstance(end, (int, float)) else 0.0


# ---------------------------------------------------------------- the daemon

# One watch per interface: the lock files (tmpfs, gone at boot; the
# systemd unit's RuntimeDirectory).
RUN_ROOT = Path("/run/xdpguard")


class Stopped(Exception):
    """The interface no longer runs the program this watch serves."""


def instance_lock(netns: str, iface: str) -> tuple[int, Path]:
    """Take /run/xdpguard/<netns>/<iface>/watch.lock (flock: the kernel
    lets go when the process dies) and write this process's PID in it.
    UsageError naming the holder's PID when another watch has it."""
    path = RUN_ROOT / netns / iface / "watch.lock"
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue                  # its directory removed by a watch leaving
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "unknown"
            # The holder writes its PID just after it takes the lock.
            for _ in range(20):
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if text.isdigit():
                    holder = text
                    break
                time.sleep(0.05)
            os.close(fd)
            raise UsageError(f"{netns}/{iface}: another 'xdpguard watch' runs there (PID {holder}); "
                             f"one watch per interface ({path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                  # locked a file a leaving watch had unlinked
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, path


def instance_unlock(fd: int, path: Path) -> None:
    """Remove the lock file (still holding it: see instance_lock) and its
    directories, where empty."""
    try:
        path.unlink()
        path.parent.rmdir()
        path.parent.parent.rmdir()
    except OSError:
        pass
    os.close(fd)


def _thresholds(policy: Policy) -> str:
    m = policy.mitigation
    got = [f"{n} {getattr(m, n)}" for n, _c in METRICS if getattr(m, n) is not None]
    return (", ".join(got) or "no thresholds") + f"; {len(m.allow)} allowlisted"


class Watch:
    def __init__(self, policy: Policy, iface: str, netns: str | None, interval: float,
                 json_lines: bool, out=sys.stdout, err=sys.stderr):
        self.policy = policy
        self.path = policy.source      # what SIGHUP reads, whatever runs meanwhile
        self.iface = iface
        self.netns = netns
        self.interval = interval
        self.json = json_lines
        self.out = out
        self.err = err
        self.journal_out, self.journal_err = journal_stream(out), journal_stream(err)
        self.wake = threading.Event()
        self.exit_code: int | None = None   # set by SIGINT (130) and SIGTERM (0)
        self.hup = False
        self.bans_total = 0
        self.probe_mode = "none"
        self.record: pins.Record | None = None
        self.mit: Mitigator | None = None
        self.sampler: Sampler | None = None
        self.probes = None
        self.cookies = None     # cookieswitch.AutoCookies with syncookies = "auto"
        self.fleet = None       # fleet.FleetSync with [fleet]
        self.crowdsec = None    # crowdsec.Bouncer with [crowdsec]

    def log(self, d: Decision) -> None:
        # Into the journal: its priority, and its time is the entry's.
        j = self.journal_out
        line = json.dumps(d.as_json()) if self.json else d.human(stamped=not j)
        self.out.write(syslog_prefix(d.priority, j) + line + "\n")
        self.out.flush()

    def note(self, msg: str, priority: int = INFO) -> None:
        j = self.journal_err
        stamp = "" if j else f"{rfc3339(time.time())} "
        self.err.write(f"{syslog_prefix(priority, j)}{stamp}xdpguard watch: {msg}\n")
        self.err.flush()

    def warn(self, msg: str) -> None:
        self.note(msg, WARNING)

    def _signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.hup = True
        else:
            # A service manager's SIGTERM is a normal stop; Ctrl-C is 130,
            # like any interrupted command.
            self.exit_code = 130 if signum == signal.SIGINT else 0
            if pins.waiting():
                self.wake.set()
                raise pins.Abandoned()
        self.wake.set()

    def run(self, metrics: str | None = None) -> int:
        """Serve until SIGINT (130) or SIGTERM (0), or until the interface
        no longer runs the program (1)."""
        from xdpguard import loader
        from xdpguard.compiler import compile_policy
        ns_name = self.netns or "host"
        lock = instance_lock(ns_name, self.iface)
        self.directory = directory = pins.iface_dir(self.netns, self.iface)
        old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        banmaps = server = None
        try:
            # A SIGHUP while starting reloads at the first tick.
            signal.signal(signal.SIGHUP, self._signal)
            record = pins.read_record(directory)
            if record is None or record.policy.sha256 != self.policy.sha256:
                loader.apply(self.policy, compile_policy(self.policy), self.iface, netns=self.netns,
                             log=self.note)
            # An apply that did not restore (an older xdpguard's, or one run
            # without this state directory) left the ban maps empty.
            with pins.locked():
                record = pins.read_record(directory)
                bans.restore(directory, record, self.policy.mitigation.max_bans, self.note)
            # [fleet] or [crowdsec] without thresholds to act on: no sampling.
            sync_only = not self.policy.mitigation.enabled and bool(self.policy.fleet or self.policy.crowdsec)
            if sync_only:
                self.note("no [mitigation]: syncing bans only")
            elif not self.policy.mitigation.enabled:
                self.note("[mitigation] enabled = false: watching, never banning", NOTICE)
            self.state_path = bans.watch_state_path(record.netns, record.iface)
            state = bans.read_json(self.state_path, {})
            state = state if isinstance(state, dict) else {}
            state.setdefault("offenders", {})
            state.setdefault("bans", {})
            protected = self._protected(self.policy, record)
            self.mit = Mitigator(self.policy, protected, state)
            self.probes = None if sync_only else open_probes(self.policy.mitigation, self.warn)
            self.probe_mode = self.probes.mode if self.probes else "none"
            self.record = pins.modify_record(directory, lambda r: replace(r, probes=self.probe_mode))
            self.sampler = None if sync_only else Sampler(directory, self.record, self.probes)
            self.banmaps = banmaps = bans.BanMaps(directory, self.record)
            self.cookies = self._auto_cookies(self.record)
            self._forget_lifted(self.mit.state, banmaps, self.state_path)
            self._start_sync(directory, self.record, protected)
            if metrics:
                # Serving before "watching" is said: whoever waits for that
                # line (a supervisor, a test) can scrape at once.
                try:
                    server = self._metrics(metrics)
                except OSError as e:
                    raise UsageError(f"--metrics {metrics}: {e.strerror or e}") from None
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._signal)
            self.note(f"watching {record.netns}/{self.iface} every {self.interval:g}s; "
                      f"probes: {self.probe_mode}; {len(state['offenders'])} known offenders"
                      + (f"; fleet '{self.policy.fleet.name}' on {self.policy.fleet.redis} as "
                         f"{self.policy.fleet.host}" if self.fleet else "")
                      + (f"; crowdsec {self.policy.crowdsec.lapi}" if self.crowdsec else "")
                      + (f"; metrics on http://{metrics}/metrics" if server else ""))
            if self.sampler:
                self.sampler.sample()
            due = time.monotonic() + self.interval
            while self.exit_code is None:
                self.wake.wait(max(0.0, due - time.monotonic()))
                self.wake.clear()
                if self.exit_code is not None:
                    break
                if self.hup:
                    self.hup = False
                    self.reload()
                if time.monotonic() >= due:
                    due = max(due + self.interval, time.monotonic())
                    try:
                        self.tick()
                    except pins.Abandoned:
                        break
        except Stopped as e:
            self.note(f"{e}; stopping (exit status 1)", ERROR)
            return 1
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            for sync in (self.fleet, self.crowdsec):
                if sync:
                    sync.close()
            if banmaps:
                banmaps.close()
            if self.sampler:
                self.sampler.close()
            if self.probes:
                self.probes.close()
            if self.cookies:
                self.cookies.switch.close()
            if server:
                server.shutdown()
            instance_unlock(*lock)
        self.note("stopped; bans stay in force in the pinned ban map" + self._cookies_left())
        return self.exit_code

    def _start_sync(self, directory: Path, record: pins.Record, protected) -> None:
        """The fleet and CrowdSec threads, when the policy has them (a
        reload keeps them as started: their tables need a restart)."""
        from xdpguard.fleet import FleetError
        try:
            if self.policy.fleet:
                from xdpguard.fleet import FleetSync
                self.fleet = FleetSync(self.policy.fleet, directory, record, protected, self.note)
            if self.policy.crowdsec:
                from xdpguard.crowdsec import Bouncer
                self.crowdsec = Bouncer(self.policy.crowdsec, directory, record, protected, self.note,
                                        self.policy.fleet)
        except FleetError as e:
            raise UsageError(str(e)) from None
        for sync in (self.fleet, self.crowdsec):
            if sync:
                sync.start()

    def _auto_cookies(self, record: pins.Record):
        """[mitigation] syncookies = "auto": the per-port switch
        (cookieswitch.py) of this policy, or None."""
        from xdpguard.cookieswitch import AutoCookies, PortSwitch
        from xdpguard.syncookies import ports_text
        m = self.policy.mitigation
        if m.syncookies != "auto" or not (record.syncookies and record.syncookies.auto):
            return None
        try:
            sw = PortSwitch.open(self.directory, record)
        except (OSError, KeyError):
            self.warn("syncookies = \"auto\": the running program has no per-port switch (an older "
                      "xdpguard loaded it); detach and apply again")
            return None
        auto = AutoCookies(m, record.syncookies.auto, sw)
        auto.tick()          # the first sample: rates from the next tick on
        ports = ", ".join(map(str, sorted(auto.on)))
        self.note(f"syncookies auto on tcp ports {ports_text(record.syncookies.auto)}: on over "
                  f"{m.syn_rate_total} to one port, off after {m.syncookies_hold:g}s at or under it"
                  + (f"; on now: {ports}" if ports else ""))
        return auto

    def _cookies_left(self) -> str:
        on = sorted(self.cookies.on) if self.cookies else []
        return f"; SYN cookies stay on for tcp ports {', '.join(map(str, on))}" if on else ""

    def _switch_cookies(self) -> None:
        """One line per port whose cookies go on or off."""
        if self.cookies:
            for change in self.cookies.tick():
                self.log(change)

    @staticmethod
    def _protected(policy: Policy, record: pins.Record) -> list:
        protected = bans.protected_networks(record)
        for p in policy.mitigation.allow:
            protected.append((ipaddress.ip_network(str(p)), "allowlisted"))
        return protected

    # ------------------------------------------------------------ the pinned policy

    def check_pinned(self) -> pins.Record:
        """The record, if the interface still runs its program; Stopped if
        not (detached, the interface or its namespace gone, another program
        attached). Certain only under pins.locked(): an apply between attach
        and pin exchange shows a program the record does not name yet."""
        from xdpguard.errors import NetnsError
        from xdpguard.netns import in_netns
        where = f"{self.netns or 'host'}/{self.iface}"
        record = pins.read_record(self.directory)
        if record is None:
            raise Stopped(f"{where}: xdpguard is no longer applied (detached: its pins are gone)")
        try:
            with in_netns(self.netns):
                try:
                    ifindex = socket.if_nametoindex(self.iface)
                except OSError:
                    raise Stopped(f"{where}: the interface is gone") from None
                prog = bpfsys.xdp_query(ifindex)["prog_id"]
        except NetnsError:
            raise Stopped(f"{where}: the network namespace '{self.netns}' is gone") from None
        if ifindex != record.ifindex:
            raise Stopped(f"{where}: the interface was replaced (ifindex {record.ifindex} -> {ifindex})")
        if prog != record.prog_id:
            now = f"program id {prog} is attached instead" if prog else "no XDP program is attached"
            raise Stopped(f"{where}: xdpguard's program (id {record.prog_id}) is no longer attached; {now}")
        return record

    def adopt(self, record: pins.Record) -> None:
        """The pinned policy changed under this watch (an apply or rollback
        from elsewhere): take its thresholds and allowlist, read from the
        file it was applied from (or this watch's own) if that still holds
        the pinned content; the record's allowlist and protect entries are
        honoured in any case."""
        from xdpguard.policy import PolicyError, load
        sha = record.policy.sha256
        policy = None
        for path in dict.fromkeys((record.policy.source, self.path)):
            try:
                got = load(path)
            except PolicyError:
                continue
            if got.sha256 == sha:
                policy = got
                break
        if policy is None:
            self.take(self.policy, record,
                      f"the pinned policy changed to '{record.policy.name}' (sha256 {sha[:12]}), but "
                      f"{record.policy.source} no longer holds it: keeping the thresholds of "
                      f"'{self.policy.name}', with the new allowlist and protect entries", WARNING)
            return
        self.take(policy, record, f"policy '{policy.name}' (sha256 {sha[:12]}) applied from elsewhere")

    def reload(self) -> None:
        """SIGHUP: read this watch's policy file again; apply it if the
        interface does not run it. Invalid, or refused: keep what runs."""
        from xdpguard import loader, safety
        from xdpguard.compiler import compile_policy
        from xdpguard.errors import LoadError, NetnsError
        from xdpguard.policy import PolicyError, load
        keep = f"keeping policy '{self.policy.name}' (sha256 {self.policy.sha256[:12]})"
        try:
            policy = load(self.path)
            for w in policy.warnings:
                self.warn(f"reload: warning: {w}")
            record = pins.read_record(self.directory)
            if record is not None and record.policy.sha256 == policy.sha256:
                self.take(policy, record, f"reload (SIGHUP): policy '{policy.name}' "
                                          f"(sha256 {policy.sha256[:12]}) is the one applied")
                return
            tables = compile_policy(policy)
            guard = safety.lockouts(policy, tables, self.netns)
            for u in guard.unchecked:
                self.warn(f"reload: warning: lockout guard: {u}")
            if guard.problems:
                self.note(f"reload (SIGHUP) refused (lockout guard): {'; '.join(guard.problems)}; {keep}", ERROR)
                return
            loader.apply(policy, tables, self.iface, netns=self.netns, log=self.note)
            record = pins.read_record(self.directory)
        except (PolicyError, UsageError, LoadError, NetnsError, pins.PinError, OSError) as e:
            self.note(f"reload (SIGHUP) failed: {e}; {keep}", ERROR)
            return
        if record is None:
            raise Stopped(f"{self.netns or 'host'}/{self.iface}: xdpguard is no longer applied")
        self.take(policy, record, f"reload (SIGHUP): policy '{policy.name}' (sha256 {policy.sha256[:12]}) applied")

    def take(self, policy: Policy, record: pins.Record, why: str, priority: int = NOTICE) -> None:
        """Run on policy from now on: thresholds, allowlist, prefix lengths;
        lift this watch's bans that the new policy protects."""
        old = self.policy
        self.policy, self.record = policy, record
        # Its syn_rate_total, hold and ports; the ports on stay on.
        if self.cookies:
            self.cookies.switch.close()
        self.cookies = self._auto_cookies(record)
        protected = self._protected(policy, record)
        mit = Mitigator(policy, protected, self.mit.state)
        mit.over_since = self.mit.over_since
        self.mit = mit
        # The new allowlist and protect entries win over fleet bans and
        # CrowdSec decisions from now on too.
        for sync in (self.fleet, self.crowdsec):
            if sync:
                sync.protection = bans.Protection(protected)
        m, was = policy.mitigation, old.mitigation
        if self.sampler is None or (m.prefix4, m.prefix6) != (was.prefix4, was.prefix6):
            # Sources are counted by prefix in the probes too: they start over.
            if self.probes:
                self.probes.close()
            self.probes = open_probes(m, self.warn)
            self.probe_mode = self.probes.mode if self.probes else "none"
            if self.sampler:
                self.sampler.close()
            self.sampler = Sampler(self.directory, record, self.probes)
            self.sampler.sample()
        self.note(f"{why}; now: {_thresholds(policy)}"
                  + ("" if m.enabled else "; [mitigation] enabled = false: never banning"), priority)
        lifted = []
        with pins.locked():
            for prefix in list(mit.state["bans"]):
                if mit.is_protected(prefix):
                    self.banmaps.remove(ipaddress.ip_network(prefix))
                    mit.state["bans"].pop(prefix)
                    lifted.append(prefix)
        for prefix in lifted:
            self.log(Decision("unban", prefix, reason="protected by the new policy"))
        if lifted:
            self._try_save(self.state_path, mit.state)

    # ------------------------------------------------------------ every interval

    def tick(self) -> None:
        banmaps, state_path = self.banmaps, self.state_path
        # Without the pin lock while all is well: an apply holds it for
        # seconds. Nothing is done yet: a stop need not wait for it.
        try:
            record = self.check_pinned()
        except (Stopped, pins.PinError):
            # Or an apply between attach and pin exchange, or a record
            # being written: look again once that is done.
            with pins.locked(interruptible=True):
                record = self.check_pinned()
        expired = []
        if any(e["expired"] for e in banmaps.entries()):
            # Ban writers serialise on the pin lock (bans.py: the banstate flags).
            with pins.locked(interruptible=True):
                expired = banmaps.expire()
        for prefix in expired:
            self.log(Decision("unban", prefix, reason="expired"))
            self.mit.state["bans"].pop(prefix, None)
        forgot = self.mit.forget_old(time.time())
        if expired or forgot:
            self._try_save(state_path, self.mit.state)
        if record.policy.sha256 != self.record.policy.sha256:
            self.adopt(record)
        self._switch_cookies()
        self.decide()

    def decide(self) -> None:
        """Sample the rates, ban what is over a threshold for the window."""
        banmaps, state_path = self.banmaps, self.state_path
        mit, changed = self.mit, False
        dt, sources, _dests = self.sampler.sample() if self.sampler else (0.0, {}, {})
        if dt <= 0 or not self.policy.mitigation.enabled:
            return
        active = {e["prefix"] for e in banmaps.entries()}
        now = time.monotonic()
        for d in mit.evaluate(now, dt, sources, active):
            if not d.dry_run:
                if len(active) >= self.policy.mitigation.max_bans:
                    self.warn(f"max_bans ({self.policy.mitigation.max_bans}) reached: not banning {d.source}")
                    continue
                # The offence is saved before the ban goes in: a kill
                # between may count an offence with no ban, never a ban
                # with its offence lost (the next one would be 1 again).
                mit.record_ban(d)
                self._try_save(state_path, mit.state)
                killpoint.step("watch-offence")
                code, text = dict(METRICS)[d.metric], f"{d.metric} {d.observed:.0f}/s > {d.threshold:g}/s"
                with pins.locked():
                    failed = banmaps.add(ipaddress.ip_network(d.source), d.duration, code, text, strict=False)
                if failed:
                    self.warn(f"warning: {failed}")
                elif self.fleet:
                    self.fleet.share("ban", d.source, time.time() + d.duration, text, code, d.offence)
                killpoint.step("watch-banned")
                active.add(d.source)
                self.bans_total += 1
                changed = True
            self.log(d)
        if changed:
            self._try_save(state_path, mit.state)

    def _try_save(self, path: Path, state: dict) -> None:
        """watch.json, or a note naming it: a full disk must not stop the
        bans (the offences then live in memory until it can be written)."""
        try:
            self._save_state(path, state)
        except OSError as e:
            self.warn(f"warning: {e.strerror or e}")

    @staticmethod
    def _save_state(path: Path, state: dict) -> None:
        """The one writer of watch.json."""
        with pins.locked():
            bans.write_json_atomic(path, state)

    def _forget_lifted(self, state: dict, banmaps, path: Path) -> None:
        """Drop the automatic bans no longer in force (expired, lifted, or
        not restored) from watch.json; offences stay."""
        now = time.time()
        in_force = {e["prefix"] for e in banmaps.entries() if not e["expired"]}
        keep = {p: b for p, b in state["bans"].items()
                if p in in_force and isinstance(b, dict) and isinstance(b.get("until"), (int, float))
                and b["until"] > now}
        if keep != state["bans"]:
            state["bans"] = keep
            self._try_save(path, state)

    def _metrics(self, where: str):
        from xdpguard.metrics import serve
        host, _, port = where.rpartition(":")
        return serve(host or "127.0.0.1", int(port), self)
