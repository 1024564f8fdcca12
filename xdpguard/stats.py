"""Readers of applied policies: `status` and `stats`, straight from the pins.

No compile and no bcc program here: the record names the slots and carries
the map types, so answering takes a few map lookups.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from xdpguard import bpfsys, pins
from xdpguard.layout import COOKIE_BUG_SLOTS, MALFORMED_SLOTS, SLOT_REASONS, C
from xdpguard.logline import rfc3339

SCHEMA_VERSION = 1
_FIELDS = ("packets", "bytes", "dropped_packets", "dropped_bytes")


def select(netns: str | None = None, iface: str | None = None) -> list[tuple[str, str, Path]]:
    """Pinned interfaces matching the filters."""
    out = []
    for ns, ifc, d in pins.all_pinned():
        if iface and ifc != iface:
            continue
        if netns and ns != netns:
            continue
        out.append((ns, ifc, d))
    return out


def _sum_counter(values) -> dict:
    return {f: sum(getattr(v, f) for v in values) for f in _FIELDS}


def read_stats(directory: Path, record: pins.Record | None = None) -> dict:
    """Per-rule counters of one interface, in the `stats --json` shape."""
    record = record or pins.read_record(directory)
    counters = pins.open_map(directory, "counters", record)
    try:
        def slot(s):
            return _sum_counter(counters.lookup(ctypes.c_uint32(s)))
        rules = [{"rule": r.name, "action": r.action, **slot(r.slot)} for r in record.rules]
        rules.append({"rule": "default", "action": record.policy.default, **slot(C.XG_SLOT_DEFAULT)})
        fixed = {s: slot(s) for s in SLOT_REASONS if s != C.XG_SLOT_DEFAULT}
    finally:
        counters.close()

    def pb(s):
        return {"packets": fixed[s]["packets"], "bytes": fixed[s]["bytes"]}
    causes = {SLOT_REASONS[s]: pb(s) for s in MALFORMED_SLOTS}
    bugs = {SLOT_REASONS[s]: pb(s) for s in COOKIE_BUG_SLOTS}
    return {
        "schema_version": SCHEMA_VERSION,
        "iface": record.iface,
        "netns": record.netns,
        "policy": record.policy.name,
        "rules": rules,
        "bans": pb(C.XG_SLOT_BAN),
        # Every malformed frame, and by cause.
        "malformed": {"packets": sum(c["packets"] for c in causes.values()),
                      "bytes": sum(c["bytes"] for c in causes.values()), "causes": causes},
        "nd_passed": pb(C.XG_SLOT_ND),
        "no_entry": pb(C.XG_SLOT_NO_ENTRY),
        # Per-source limits: sources without a bucket dropped because their
        # rule's new-source budget was empty (no bucket was inserted).
        "new_source_overflow": pb(C.XG_SLOT_NEWSRC),
        # syncookies: SYNs answered from XDP with a cookie SYN-ACK, and ACKs
        # (of no known connection) without a valid cookie, dropped.
        "syncookie_synacks": pb(C.XG_SLOT_COOKIE),
        "syncookie_bad_acks": pb(C.XG_SLOT_BADCOOKIE),
        # SYNs the cookie path dropped where a bound it checks cannot fail
        # (bpf/xdpguard.h): all zero, or a bug to report; by cause.
        "syncookie_cannot_happen": {"packets": sum(c["packets"] for c in bugs.values()),
                                    "bytes": sum(c["bytes"] for c in bugs.values()), "causes": bugs},
    }


def fixed_rows(snap: dict) -> list[dict]:
    """The rows after the rules' in the shape of a rule's: the fixed slots
    (bans, malformed and by cause, new-source overflow, SYN cookies and the
    cookie path's drops that cannot happen, no map entry); all but the
    cookie SYN-ACKs (answered, not dropped) are drops."""
    m = snap["malformed"]
    slots = ([("(bans)", snap["bans"], "deny"), ("(malformed)", m, "deny")]
             + [(f"(malformed: {cause})", v, "deny") for cause, v in m["causes"].items()]
             + [("(new-source overflow)", snap["new_source_overflow"], "deny"),
                ("(syncookie SYN-ACKs)", snap["syncookie_synacks"], "cookie"),
                ("(syncookie bad ACKs)", snap["syncookie_bad_acks"], "deny"),
                ("(syncookie cannot happen)", snap["syncookie_cannot_happen"], "deny"),
                ("(no map entry)", snap["no_entry"], "deny")])
    out = []
    for name, v, action in slots:
        dropped = action == "deny"
        out.append({"rule": name, "action": action, "packets": v["packets"], "bytes": v["bytes"],
                    "dropped_packets": v["packets"] if dropped else 0,
                    "dropped_bytes": v["bytes"] if dropped else 0})
    return out


def all_rows(snap: dict) -> list[dict]:
    """The rules' rows, then the fixed slots' (fixed_rows)."""
    return snap["rules"] + fixed_rows(snap)


def totals(snap: dict) -> dict:
    """Every frame the program counted (IP frames: each goes to exactly one
    slot), and of them what the rules decided: packets, bytes, dropped
    packets and bytes. The per-cause malformed rows are parts of
    `(malformed)`, not counted again. A snapshot without the fixed slots
    (a test's) counts its rules alone."""
    rules = {f: sum(r.get(f, 0) for r in snap["rules"]) for f in _FIELDS}
    if "malformed" not in snap:
        return {"all": rules, "rules": rules}
    rows = [r for r in fixed_rows(snap) if not r["rule"].startswith("(malformed: ")]
    return {"all": {f: rules[f] + sum(r[f] for r in rows) for f in _FIELDS}, "rules": rules}


def active_gen(directory: Path) -> int:
    """The generation the program reads (map `active`)."""
    with bpfsys.closing_fd(bpfsys.obj_get(str(directory / "active"))) as fd:
        size = bpfsys.map_info(fd)["value_size"]      # the C's, never restated here
        return int.from_bytes(bpfsys.map_lookup(fd, bytes(4), size), sys.byteorder) & 1


def map_fill(path: Path, gen: int) -> tuple[int | None, int] | None:
    """(entries, capacity) of a pinned map; entries None for arrays
    (always full). An array of tries reports generation gen's trie. None
    when the pin or the trie is missing."""
    if not path.exists():
        return None
    fd = bpfsys.obj_get(str(path))
    try:
        info = bpfsys.map_info(fd)
        if info["type"] == bpfsys.BPF_MAP_TYPE_ARRAY_OF_MAPS:
            inner = bpfsys.inner_map_fd(fd, gen)
            if inner is None:
                return None
            os.close(fd)
            fd = inner
            info = bpfsys.map_info(fd)
        if info["type"] in (bpfsys.BPF_MAP_TYPE_ARRAY, bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY):
            return None, info["max_entries"]
        return sum(1 for _ in bpfsys.map_keys(fd, info["key_size"])), info["max_entries"]
    finally:
        os.close(fd)


def read_status(directory: Path, record: pins.Record) -> dict:
    """Where and what xdpguard runs on one interface, with map fill."""
    from xdpguard.netns import exists, in_netns
    gone = not exists(record.ns)
    attached = False
    if not gone:
        try:
            with in_netns(record.ns):
                q = bpfsys.xdp_query(record.ifindex)
            attached = q["prog_id"] == record.prog_id
        except Exception:
            attached = False
    maps = {}
    gen = active_gen(directory)
    for name in sorted(record.types):
        # lpm*_inner: the tries' template, never holding an entry.
        if name.endswith("_inner"):
            continue
        fill = map_fill(directory / name, gen)
        if fill is not None:
            maps[name] = {"entries": fill[0], "capacity": fill[1]}
    pid = watch_pid(record.netns, record.iface)
    return {
        "netns": record.netns,
        "iface": record.iface,
        "mode": record.mode,
        "prog_id": record.prog_id,
        "attached": attached,
        "netns_gone": gone,       # deleted under the pins: `detach` removes them
        "policy": record.policy.name,
        "sha256": record.policy.sha256,
        "applied_at": record.policy.applied_at,
        "applied_at_rfc3339": rfc3339(record.policy.applied_at),
        "source": record.policy.source,
        "confirm_deadline": record.confirm.deadline if record.confirm else None,
        "confirm_deadline_rfc3339": rfc3339(record.confirm.deadline) if record.confirm else None,
        # Newest first: where `rollback` goes, one step each.
        "history": [{"policy": p.name, "sha256": p.sha256, "applied_at": p.applied_at,
                     "applied_at_rfc3339": rfc3339(p.applied_at), "source": p.source}
                    for p in record.history],
        # The probe set is watch's: shown only while a watch runs there.
        "probes": record.probes if pid else None,
        "watch": {"running": pid is not None, "pid": pid},
        "policy_file": policy_file(record),
        "syncookies": _syncookies(directory, record),
        "maps": maps,
        "usage": usage(record, maps),
    }


def usage(record: pins.Record, maps: dict) -> dict:
    """What the policy and the feedback loop fill, by the names a policy
    uses (maps: read_status's, by map name): entries and capacity of
    rules, set prefixes (tries sized to the policy: no room beyond it),
    bans (up to the policy's max_bans, for manual and automatic alike),
    per-source rate-limit buckets and per-source counts ([mitigation])."""
    def entries(*names):
        got = [maps[n]["entries"] for n in names if n in maps and maps[n]["entries"] is not None]
        return sum(got) if got else None

    def capacity(name):
        return maps[name]["capacity"] if name in maps else None
    ban_cap = capacity("ban4")
    if record.mitigation.max_bans is not None:
        ban_cap = record.mitigation.max_bans if ban_cap is None else min(ban_cap, record.mitigation.max_bans)
    return {"rules": {"entries": len(record.rules), "capacity": C.XG_MAX_RULES_LIMIT},
            "sets_v4": {"entries": entries("lpm4"), "capacity": None},
            "sets_v6": {"entries": entries("lpm6"), "capacity": None},
            "bans": {"entries": entries("ban4", "ban6"), "capacity": ban_cap},
            "buckets": {"entries": entries("sbuckets"), "capacity": capacity("sbuckets")},
            "sources": {"entries": entries("srcstat"), "capacity": capacity("srcstat")}}


def watch_pid(netns: str, iface: str) -> int | None:
    """The PID of the `watch` serving an interface, or None: the holder of
    its instance lock (daemon.instance_lock), found in /proc/locks by the
    lock file's inode, so that a file left by a killed watch, or a PID
    since reused, does not count."""
    from xdpguard.daemon import RUN_ROOT
    path = RUN_ROOT / netns / iface / "watch.lock"
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            held = f.read().splitlines()
    except OSError:
        return None
    for line in held:
        # "1: FLOCK  ADVISORY  WRITE 4242 00:19:1234 0 EOF"
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[4] == "->":
            continue
        dev_ino = parts[5].rsplit(":", 1)
        if len(dev_ino) == 2 and dev_ino[1].isdigit() and int(dev_ino[1]) == st.st_ino and parts[4].isdigit():
            return int(parts[4])
    return None


def policy_file(record: pins.Record) -> dict:
    """Whether the policy file the record was applied from still says what
    runs: the sha256 `load` would give it now (its set files included)
    against the record's. changed None when it cannot be read or parsed
    (error says why)."""
    from xdpguard.policy import sha256_on_disk
    path = record.policy.source
    out = {"path": path, "sha256": None, "changed": None, "error": None}
    if not path:
        out["error"] = "not recorded"
        return out
    try:
        out["sha256"] = sha256_on_disk(path)
    except OSError as e:
        out["error"] = e.strerror or str(e)
        return out
    except ValueError as e:
        out["error"] = f"not a readable policy ({e})"
        return out
    out["changed"] = out["sha256"] != record.policy.sha256
    return out


def _syncookies(directory: Path, record: pins.Record) -> dict | None:
    """The nftables table and sysctls xdpguard owns for SYN cookies, and
    the "auto" ports whose cookies `watch` has on, with why."""
    if not record.syncookies:
        return None
    from xdpguard import cookieswitch, syncookies
    out = syncookies.state(record.ns, record.syncookies)
    out["auto_on"] = [{**o, "since_rfc3339": rfc3339(o["since"])}
                      for o in (cookieswitch.status(directory, record) if record.syncookies.auto else [])]
    return out
