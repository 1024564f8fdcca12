"""Policy model: read a TOML policy file into a validated ``Policy``.

Every user mistake becomes a ``PolicyError`` that names the file, the rule
(name and position) and the field, says what is wrong and what is expected.
Nothing here touches the kernel.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import socket
import struct
import tomllib
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, islice, repeat
from operator import and_, itemgetter, le, lshift, ne, or_
from pathlib import Path
from typing import NamedTuple

from xdpguard import progress
from xdpguard.units import Rate, parse_duration, parse_rate

PROTOS = ("tcp", "udp", "icmp", "icmpv6")
ACTIONS = ("allow", "deny", "limit")

_POLICY_KEYS = ("name", "default", "protect", "log_rate", "log_default", "log_bans")
_RULE_KEYS = ("name", "src", "dst", "proto", "sport", "dport", "tcp_flags", "action",
              "rate", "burst", "per", "prefix4", "prefix6", "new_sources", "new_sources_burst",
              "rate_total", "burst_total", "syncookies", "log", "comment")
# Keys of a per-source limit only.
_PER_SOURCE_KEYS = ("new_sources", "new_sources_burst", "rate_total", "burst_total")
# A per-source rule admits, by default, this many new sources per second
# for each unit of its per-source rate in packets (README: new sources).
NEW_SOURCES_PER_RATE = 10
NEW_SOURCES_LEAST = 10.0
# A byte rate counts full-size frames when the default is derived.
FULL_FRAME = 1514
_MITIGATION_KEYS = ("enabled", "syn_rate", "conn_rate", "pps", "bps", "window", "ban",
                    "ban_max", "forget", "allow", "max_bans", "prefix4", "prefix6", "dry_run",
                    "syncookies", "syn_rate_total", "syncookies_hold")
_FLEET_KEYS = ("redis", "password_file", "key_file", "name", "host", "publish", "subscribe",
               "min_prefix4", "min_prefix6")
_CROWDSEC_KEYS = ("lapi", "key_file", "interval", "scopes", "push", "machine_id", "password_file")
_TOP_KEYS = ("policy", "sets", "rule", "mitigation", "fleet", "crowdsec")
CROWDSEC_SCOPES = ("ip", "range")
# A shared secret shorter than this is guessable (HMAC-SHA256 keys).
FLEET_KEY_MIN = 16


class PolicyError(Exception):
    """A mistake in a policy: the message is meant for the operator; file,
    where (rule, set or section) and detail (the message without them) are
    set when the reader knows them (`check --json`)."""

    def __init__(self, message: str, file: str | None = None, where: str | None = None,
                 detail: str | None = None):
        super().__init__(message)
        self.file, self.where, self.detail = file, where, detail

    def as_dict(self) -> dict:
        """file, rule, field, message (None where not known), and where."""
        detail = self.detail or str(self)
        word = detail.split(" ", 1)[0].strip("'[]")
        keys = _RULE_KEYS + _POLICY_KEYS + _MITIGATION_KEYS + _PER_SOURCE_KEYS
        rule = self.where if self.where and self.where.startswith("rule") else None
        return {"file": self.file, "rule": rule, "field": word if word in keys else None,
                "message": detail, "where": self.where}


class Prefix(NamedTuple):
    """An address prefix as integers: fast to build, sort and compare by the
    million (a blocklist has 100,000 of them)."""
    family: int          # 4 or 6
    value: int           # network address, host bits zero
    plen: int

    @property
    def bits(self) -> int:
        return 32 if self.family == 4 else 128

    @property
    def last(self) -> int:
        return self.value | ((1 << (self.bits - self.plen)) - 1)

    def contains(self, addr_family: int, addr: int) -> bool:
        return addr_family == self.family and self.value <= addr <= self.last

    def __str__(self) -> str:
        fam = socket.AF_INET if self.family == 4 else socket.AF_INET6
        raw = self.value.to_bytes(self.bits // 8, "big")
        return f"{socket.inet_ntop(fam, raw)}/{self.plen}"


class PrefixSet(Sequence):
    """Prefixes, sorted and without repeats, as integer keys value << 8 |
    plen: IPv4 in an array of 8-byte integers (a Prefix object and its
    ints cost ~100 bytes; a blocklist may hold 7 million), IPv6 in a tuple
    (their lists are short). Iterating gives Prefix objects, IPv4 first;
    the compiler reads the keys."""
    __slots__ = ("v4", "v6")

    def __init__(self, v4: array = None, v6: tuple[int, ...] = ()):
        self.v4 = array("Q") if v4 is None else v4
        self.v6 = v6

    @classmethod
    def of(cls, prefixes) -> "PrefixSet":
        """The set of some Prefix objects."""
        v4, v6 = set(), set()
        for p in prefixes:
            (v4 if p.family == 4 else v6).add(p.value << 8 | p.plen)
        return cls(array("Q", sorted(v4)), tuple(sorted(v6)))

    @classmethod
    def union(cls, sets) -> "PrefixSet":
        """The union of PrefixSets (one of them itself, not a copy)."""
        sets = list({id(s): s for s in sets}.values())
        if len(sets) == 1:
            return sets[0]
        v4 = array("Q")
        for s in sets:
            v4 += s.v4
        return cls(sorted_unique(v4), tuple(sorted(set().union(*(s.v6 for s in sets)))))

    def keys(self, family: int):
        """The sorted keys of one family."""
        return self.v4 if family == 4 else self.v6

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def __getitem__(self, i: int) -> Prefix:
        n4 = len(self.v4)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        fam, key = (4, self.v4[i]) if i < n4 else (6, self.v6[i - n4])
        return Prefix(fam, key >> 8, key & 0xFF)

    def __iter__(self):
        for fam, keys in ((4, self.v4), (6, self.v6)):
            for k in keys:
                yield Prefix(fam, k >> 8, k & 0xFF)

    def __eq__(self, other) -> bool:
        if isinstance(other, PrefixSet):
            return self.v4 == other.v4 and self.v6 == other.v6
        if isinstance(other, (tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"PrefixSet({len(self.v4)} IPv4, {len(self.v6)} IPv6)"


# Keys sorted at a time by sorted_unique.
_RUN = 1 << 18


def sorted_unique(keys: array, label: str = "sorting") -> array:
    """array('Q') of keys -> a new one sorted, without repeats, built run
    by run: sorting a Python list of every key would take ~40 bytes a key."""
    n = len(keys)
    if all(map(le, keys, islice(keys, 1, None))):        # already sorted (FireHOL lists are)
        return _unique_sorted(keys)
    if n <= _RUN:
        return _unique_sorted(sorted(keys))
    with progress.task(label, 2 * n) as tick:
        runs = []
        for i in range(0, n, _RUN):
            runs.append(array("Q", sorted(keys[i:i + _RUN])))
            tick(len(runs[-1]))
        # Bounds at quantiles of a sample: buckets of about _RUN keys whatever
        # the keys' spread. A key and its repeats fall in one bucket.
        sample = sorted(chain.from_iterable(r[::64] for r in runs))
        step = max(1, _RUN // 64)
        bounds = sample[step::step] + [1 << 64]
        out = array("Q")
        lo = [0] * len(runs)
        for bound in bounds:
            bucket = array("Q")
            for j, r in enumerate(runs):
                hi = bisect_left(r, bound, lo[j])
                bucket += r[lo[j]:hi]
                lo[j] = hi
            out += _unique_sorted(sorted(bucket))
            tick(len(bucket))
    return out


def _unique_sorted(keys) -> array:
    """Sorted keys without repeats (compared with the next one, in C)."""
    return array("Q", compress(keys, chain((True,), map(ne, islice(keys, 1, None), keys))))


@dataclass
class Rule:
    name: str
    index: int                       # 0-based position in the file
    action: str
    src: PrefixSet | None            # None = any (tests may give a tuple of Prefix)
    dst: PrefixSet | None
    protos: frozenset[str] | None    # None = any
    sport: tuple[tuple[int, int], ...] | None
    dport: tuple[tuple[int, int], ...] | None
    syn_only: bool = False
    rate: Rate | None = None
    burst: int | None = None
    per: str = "source"
    prefix4: int = 32
    prefix6: int = 64
    new_sources: Rate | None = None       # per-source limits: new sources/s ...
    new_sources_burst: int | None = None  # ... and its burst (sources)
    rate_total: Rate | None = None        # per-source limits: aggregate cap ...
    burst_total: int | None = None        # ... and its burst (rate's unit)
    # SYNs it passes answered from XDP: True, False, or None (not said:
    # [mitigation] syncookies = "auto" may switch them, see Policy.cookies)
    syncookies: bool | None = None
    log: bool = False
    # src and dst as written, sorted ("@set" names and canonical prefixes):
    # what policydiff compares, a set's own changes apart.
    src_text: tuple[str, ...] | None = None
    dst_text: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return f"rule '{self.name}' (rule {self.index + 1})"

    @property
    def takes_cookies(self) -> bool:
        """Whether SYN cookies can serve this rule: TCP to listening ports,
        packets passed."""
        return self.protos == frozenset({"tcp"}) and self.dport is not None and self.action != "deny"


@dataclass
class Mitigation:
    enabled: bool = False
    syn_rate: Rate | None = None
    conn_rate: Rate | None = None
    pps: Rate | None = None
    bps: Rate | None = None
    window: float = 3.0
    ban: float = 600.0
    ban_max: float = 86400.0
    # Offences decay: a source not banned again this long after its last
    # ban ended starts over at offence 1 (None: never; fail2ban's dbpurgeage).
    forget: float | None = 604800.0
    allow: PrefixSet | tuple = ()
    max_bans: int = 100000
    prefix4: int = 32
    prefix6: int = 64
    dry_run: bool = False
    # syncookies = "auto": `watch` turns SYN cookies on for a port whose
    # SYN rate (all sources) goes over syn_rate_total, and off once it has
    # stayed at or under it for syncookies_hold (seconds).
    syncookies: str | None = None
    syn_rate_total: Rate | None = None
    syncookies_hold: float = 60.0


@dataclass
class Fleet:
    """[fleet]: bans shared through Redis (fleet.py). Secrets stay in
    files: the policy names them, the record keeps only the paths."""
    redis: str
    key_file: str                    # absolute path
    password_file: str | None = None
    name: str = "xdpguard"
    host: str = ""
    publish: bool = True
    subscribe: bool = True
    min_prefix4: int = 16
    min_prefix6: int = 32


@dataclass
class CrowdSec:
    """[crowdsec]: a bouncer of a CrowdSec Local API (crowdsec.py)."""
    lapi: str
    key_file: str                    # absolute path
    interval: float = 10.0
    scopes: tuple[str, ...] = CROWDSEC_SCOPES
    push: bool = False               # this host's own bans to the LAPI, as a machine
    machine_id: str | None = None
    password_file: str | None = None  # absolute path


@dataclass
class Policy:
    name: str
    default: str
    rules: list[Rule]
    sets: dict[str, PrefixSet]
    mitigation: Mitigation
    protect: tuple[tuple[Prefix, int | None], ...] = ()
    fleet: Fleet | None = None
    crowdsec: CrowdSec | None = None
    log_rate: int = 10
    log_default: bool = False
    log_bans: bool = False
    source: str = ""
    # Of the policy file and the set files it read (inputs): the same
    # sha256 is the same policy, which apply then leaves alone.
    sha256: str = ""
    warnings: list[str] = field(default_factory=list)

    def cookies(self, rule: Rule) -> str | None:
        """A rule's SYN cookies: "on" (syncookies = true), "auto" (a rule
        that can take them, not saying syncookies, under [mitigation]
        syncookies = "auto": per port, as `watch` switches them) or None."""
        if rule.syncookies:
            return "on"
        if rule.syncookies is None and self.mitigation.syncookies == "auto" and rule.takes_cookies:
            return "auto"
        return None
    text: bytes = b""            # the policy file's bytes
    # Set files as read: their "file" string -> (path, sha256 of the bytes).
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)


# ---------------------------------------------------------------- addresses

def parse_prefix(text: str) -> tuple[Prefix, bool]:
    """Parse an address or CIDR; returns (prefix, had_host_bits).

    Raises ValueError with an operator-readable reason.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an address or CIDR (expected a string)")
    addr, sep, plen_s = text.strip().partition("/")
    fam = 6 if ":" in addr else 4
    try:
        raw = socket.inet_pton(socket.AF_INET6 if fam == 6 else socket.AF_INET, addr)
    except OSError:
        raise ValueError(f"'{text}' is not an address or CIDR") from None
    bits = 32 if fam == 4 else 128
    if sep:
        if not plen_s.isdigit() or int(plen_s) > bits:
            raise ValueError(f"'{text}': prefix length must be 0..{bits}")
        plen = int(plen_s)
    else:
        plen = bits
    value = int.from_bytes(raw, "big")
    mask = ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
    return Prefix(fam, value & mask, plen), bool(value & ~mask)




# ---------------------------------------------------------------- loading

class _Reader:
    """Carries the file name and collects warnings while a policy is read."""

    def __init__(self, path: Path, set_files: dict[str, str] | None = None):
        self.path = path
        self.fname = str(path)
        self.warnings: list[str] = []
        self.set_files = set_files           # "file" string -> path to read instead
        self.inputs: dict[str, tuple[str, str]] = {}

    def fail(self, where: str, msg: str):
        raise PolicyError(f"{self.fname}: {where}: {msg}" if where else f"{self.fname}: {msg}",
                          file=self.fname, where=where or None, detail=msg)

    def warn(self, where: str, msg: str):
        self.warnings.append(f"{self.fname}: {where}: {msg}" if where else f"{self.fname}: {msg}")

    def check_keys(self, where: str, table: dict, allowed: tuple[str, ...]):
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else f" (expected one of: {', '.join(allowed)})"
                self.fail(where, f"unknown key '{key}'{extra}")

    def prefix(self, where: str, fld: str, text) -> Prefix:
        try:
            p, host_bits = parse_prefix(text)
        except ValueError as e:
            self.fail(where, f"{fld} {e}")
        if host_bits:
            self.warn(where, f"{fld} '{text}' has host bits set; using {p}")
        return p


# Fast path of set files, by the column (see _plain_ipv4_keys).
_PLAIN4_CHARS = b"0123456789./\n"
# What follows the "/" (nothing when there is none) -> prefix length. Any
# other text ("33", or "08", which parse_prefix reads as 8) leaves the fast path.
_PLEN4 = {"": 32, **{str(n): n for n in range(33)}}
_HOST4 = [(1 << (32 - n)) - 1 for n in range(33)]


def _plain_ipv4_keys(lines: list[str]) -> array | None:
    """The keys (see PrefixSet) of lines that are all plain IPv4
    ``a.b.c.d`` or ``a.b.c.d/n`` (no spaces, no host bits), blank, or
    whole-line comments; None if any line needs the per-line parser.

    Each step runs over a whole column in C (str.partition, inet_pton,
    struct.unpack) instead of a Python call per line: that is what makes a
    million-line blocklist cheap. Whenever the per-line parser could answer
    differently (a line it rejects, host bits: both warn with a line
    number), this gives up and the caller runs that parser instead.
    """
    entries = list(filter(None, lines))
    joined = "\n".join(entries)
    if "#" in joined:                   # drop whole-line comments (a netset's header)
        entries = [ln for ln in entries if ln[0] != "#"]
        joined = "\n".join(entries)
    # Only digits, dots and slashes: nothing for strip() or a "#" to remove,
    # no ":" (IPv6), and inet_pton checks each address as parse_prefix does.
    # A line ending in "/" would look like one without (length 32).
    if joined.encode().translate(None, _PLAIN4_CHARS) or "/\n" in joined or joined.endswith("/"):
        return None
    parts = list(map(str.partition, entries, repeat("/")))
    try:
        packed = b"".join(map(socket.inet_pton, repeat(socket.AF_INET), map(itemgetter(0), parts)))
        plens = list(map(_PLEN4.__getitem__, map(itemgetter(2), parts)))
    except (OSError, KeyError):
        return None
    values = struct.unpack(f">{len(entries)}I", packed)
    if any(map(and_, values, map(_HOST4.__getitem__, plens))):
        return None
    return array("Q", map(or_, map(lshift, values, repeat(8)), plens))


# Bytes of a set file read, decoded and parsed at a time.
_CHUNK = 4 << 20


def _read_set_file(rd: _Reader, setname: str, spec: dict) -> PrefixSet:
    """A set file, read a chunk of lines at a time into integer keys: a
    100 MB list never lives as text and objects at once."""
    where = f"set '{setname}'"
    rd.check_keys(where, spec, ("file",))
    if "file" not in spec or not isinstance(spec["file"], str):
        rd.fail(where, "expected a list of addresses or { file = \"path\" }")
    if rd.set_files is not None and spec["file"] in rd.set_files:
        path = Path(rd.set_files[spec["file"]])
    else:
        path = _set_path(rd.path, spec["file"])
    v4, v6 = array("Q"), []
    lineno = bad = 0
    digest = hashlib.sha256()
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        rd.fail(where, f"cannot read set file '{spec['file']}' ({path}): {e.strerror or e}")
    with f, progress.task(f"reading set '{setname}'", size) as tick:
        rest = b""
        while True:
            try:
                block = f.read(_CHUNK)
            except OSError as e:
                rd.fail(where, f"cannot read set file '{spec['file']}' ({path}): {e.strerror or e}")
            tick(len(block))
            digest.update(block)
            if block:
                # Whole lines only; the rest waits for the next block.
                cut = block.rfind(b"\n") + 1
                if not cut:
                    rest += block
                    continue
                raw, rest = rest + block[:cut], block[cut:]
            elif rest:
                raw, rest = rest, b""
            else:
                break
            try:
                # utf-8-sig: a byte order mark, as some Windows editors write, is no error.
                text = raw.decode("utf-8" if lineno else "utf-8-sig")
            except UnicodeDecodeError as e:
                line = lineno + raw.count(b"\n", 0, e.start) + 1
                rd.fail(where, f"set file '{spec['file']}' ({path}) is not UTF-8 text (line {line})")
            lines = text.splitlines()
            keys4, keys6, bad = read_set_lines(lines, path, lambda msg: rd.warn("", msg), lineno, bad)
            v4 += keys4
            v6 += keys6
            lineno += len(lines)
    if bad > 20:
        rd.warn("", f"{path}: {bad - 20} more lines that are not addresses were skipped")
    rd.inputs[spec["file"]] = (str(path), digest.hexdigest())
    return PrefixSet(sorted_unique(v4, f"sorting set '{setname}'"), tuple(sorted(set(v6))))


def read_set_lines(lines: list[str], path, warn, lineno: int = 0, bad: int = 0) -> tuple[array, list[int], int]:
    """The keys (see PrefixSet) of a set file's lines (one address or CIDR
    a line, '#' comments), IPv4 and IPv6, in file order; a line that is
    none is skipped with a warning (the first 20; bad: how many so far,
    also returned). lineno: lines of the file before these."""
    fast = _plain_ipv4_keys(lines)
    if fast is not None:
        return fast, [], bad
    v4, v6 = array("Q"), []
    for lineno, line in enumerate(lines, lineno + 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            p, host_bits = parse_prefix(item)
        except ValueError:
            bad += 1
            if bad <= 20:
                warn(f"{path}:{lineno}: '{item[:60]}' is not an address or CIDR; line skipped")
            continue
        if host_bits:
            warn(f"{path}:{lineno}: '{item}' has host bits set; using {p}")
        (v4 if p.family == 4 else v6).append(p.value << 8 | p.plen)
    return v4, v6, bad


def _read_sets(rd: _Reader, sets) -> dict[str, PrefixSet]:
    if not isinstance(sets, dict):
        rd.fail("[sets]", "expected a table of named address sets")
    out = {}
    for name, spec in sets.items():
        where = f"set '{name}'"
        if isinstance(spec, list):
            prefixes = PrefixSet.of(rd.prefix(where, "entry", item) for item in spec)
        elif isinstance(spec, dict):
            prefixes = _read_set_file(rd, name, spec)
        else:
            rd.fail(where, "expected a list of addresses or { file = \"path\" }")
        if not prefixes:
            rd.warn(where, "set is empty")
        out[name] = prefixes
    return out


def _addresses(rd, where, fld, value, sets) -> PrefixSet:
    items = value if isinstance(value, list) else [value]
    parts, inline = [], []
    for item in items:
        if isinstance(item, str) and item.startswith("@"):
            if item[1:] not in sets:
                known = ", ".join("@" + s for s in sets) or "none defined"
                rd.fail(where, f"{fld} names unknown set '{item}' (sets: {known})")
            parts.append(sets[item[1:]])
        else:
            inline.append(rd.prefix(where, fld, item))
    if inline:
        parts.append(PrefixSet.of(inline))
    return PrefixSet.union(parts)


def _written(value) -> tuple[str, ...] | None:
    """Addresses as written (see Rule.src_text), checked by _addresses
    already; None when absent."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    return tuple(sorted({item if item.startswith("@") else str(parse_prefix(item)[0]) for item in items}))


def _ports(rd, where, fld, value) -> tuple[tuple[int, int], ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        rd.fail(where, f"{fld} is an empty list (omit it to match any port)")
    out = []
    for item in items:
        if isinstance(item, bool):
            rd.fail(where, f"{fld} {item!r} is not a port")
        if isinstance(item, int):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            lo, hi = (int(x) for x in item.split("-"))
            if lo > hi:
                rd.fail(where, f"{fld} range '{item}' is reversed (expected low-high)")
        elif isinstance(item, str) and item.strip().isdigit():
            lo = hi = int(item)
        else:
            rd.fail(where, f"{fld} {item!r} is not a port or \"low-high\" range")
        for p in (lo, hi):
            if not 0 <= p <= 65535:
                rd.fail(where, f"{fld} {p} is not a port (expected 0-65535)")
        out.append((lo, hi))
    return tuple(sorted(set(out)))


def _int_in(rd, where, fld, value, lo, hi) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        rd.fail(where, f"{fld} {value!r} is not valid (expected an integer {lo}..{hi})")
    return value


_NAME_CHARS = "letters, digits, '_', '.', ':' or '-'"


def _name_problem(name) -> str | None:
    """What is wrong with a rule or policy name, or None. The name is
    shown escaped and cut short: the message stays one line."""
    if not isinstance(name, str):
        return f"name {name!r} is not valid (expected a string of 1-64 {_NAME_CHARS})"
    shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
    if not name:
        return f"name is empty (expected 1-64 {_NAME_CHARS})"
    if len(name) > 64:
        return f"name {shown} is {len(name)} characters long (at most 64)"
    bad = re.search(r"[^A-Za-z0-9_.:-]", name)
    if bad is None:
        return None
    c = bad.group()
    what = f"control character U+{ord(c):04X}" if not c.isprintable() else repr(c)
    return f"name {shown} contains {what} (expected 1-64 {_NAME_CHARS})"


def _read_rule(rd: _Reader, i: int, raw, sets, names: dict) -> Rule:
    pos = f"rule {i + 1}"
    if not isinstance(raw, dict):
        rd.fail(pos, "expected a table")
    name = raw.get("name")
    problem = "name is required (1-64 letters, digits, '_', '.', ':' or '-')" if name is None else _name_problem(name)
    where = pos if problem else f"rule '{name}' ({pos})"
    rd.check_keys(where, raw, _RULE_KEYS)
    if problem:
        rd.fail(where, problem)
    if name == "default":
        rd.fail(where, "name 'default' is reserved for the policy default")
    if name in names:
        rd.fail(where, f"name '{name}' is already used by rule {names[name] + 1}")
    names[name] = i

    action = raw.get("action")
    if action not in ACTIONS:
        rd.fail(where, f"action {action!r} is not valid (expected \"allow\", \"deny\" or \"limit\")")

    src = _addresses(rd, where, "src", raw["src"], sets) if "src" in raw else None
    dst = _addresses(rd, where, "dst", raw["dst"], sets) if "dst" in raw else None

    protos = None
    if "proto" in raw:
        items = raw["proto"] if isinstance(raw["proto"], list) else [raw["proto"]]
        if not items:
            rd.fail(where, "proto is an empty list (omit it, or use \"any\")")
        for p in items:
            if p not in PROTOS + ("any",):
                rd.fail(where, f"proto {p!r} is not valid (expected \"tcp\", \"udp\", \"icmp\", \"icmpv6\" or \"any\")")
        protos = None if "any" in items else frozenset(items)

    sport = _ports(rd, where, "sport", raw["sport"]) if "sport" in raw else None
    dport = _ports(rd, where, "dport", raw["dport"]) if "dport" in raw else None
    for fld, val in (("sport", sport), ("dport", dport)):
        if val is not None and (protos is None or not protos <= {"tcp", "udp"}):
            rd.fail(where, f"{fld} needs proto \"tcp\" and/or \"udp\" (ports exist only there)")

    syn_only = False
    if "tcp_flags" in raw:
        if raw["tcp_flags"] != "syn":
            rd.fail(where, f"tcp_flags {raw['tcp_flags']!r} is not valid (expected \"syn\")")
        if protos != frozenset({"tcp"}):
            rd.fail(where, "tcp_flags needs proto = \"tcp\"")
        syn_only = True

    rule = Rule(name=name, index=i, action=action, src=src, dst=dst, protos=protos,
                sport=sport, dport=dport, syn_only=syn_only,
                src_text=_written(raw.get("src")),
                dst_text=_written(raw.get("dst")))

    limit_keys = [k for k in ("rate", "burst", "per", "prefix4", "prefix6") + _PER_SOURCE_KEYS if k in raw]
    if action != "limit":
        if limit_keys:
            rd.fail(where, f"{limit_keys[0]} is only for action = \"limit\"")
    else:
        if "rate" not in raw:
            rd.fail(where, "action \"limit\" needs rate (e.g. rate = \"200/s\" or \"10Mbit/s\")")
        rule.rate = _rate(rd, where, "rate", raw["rate"])
        rule.burst = _burst(rd, where, "burst", raw, rule.rate)
        if rule.rate.unit == "bytes" and rule.burst < FULL_FRAME:
            rd.warn(where, f"burst {rule.burst} bytes is smaller than one full-size frame ({FULL_FRAME} bytes)")
        per = raw.get("per", "source")
        if per not in ("source", "rule"):
            rd.fail(where, f"per {per!r} is not valid (expected \"source\" or \"rule\")")
        rule.per = per
        rule.prefix4 = _int_in(rd, where, "prefix4", raw.get("prefix4", 32), 0, 32)
        rule.prefix6 = _int_in(rd, where, "prefix6", raw.get("prefix6", 64), 0, 128)
        if per == "source":
            _read_per_source(rd, where, raw, rule)
        elif any(k in raw for k in _PER_SOURCE_KEYS):
            rd.fail(where, f"{next(k for k in _PER_SOURCE_KEYS if k in raw)} is only for per = \"source\"")
    if "log" in raw:
        if not isinstance(raw["log"], bool):
            rd.fail(where, f"log {raw['log']!r} is not valid (expected true or false)")
        rule.log = raw["log"]
    if "syncookies" in raw:
        _read_syncookies(rd, where, raw["syncookies"], rule)
    if "comment" in raw and not isinstance(raw["comment"], str):
        rd.fail(where, "comment must be a string")
    return rule


def _rate(rd, where, fld, text, unit: str | None = None, want: str = "") -> Rate:
    """parse_rate, failing with the field's name; of that unit, if given
    (want says what is expected then)."""
    try:
        r = parse_rate(text)
    except ValueError as e:
        rd.fail(where, f"{fld} {e}")
    if unit is not None and r.unit != unit:
        rd.fail(where, f"{fld} '{text}' is not {want}")
    return r


def _burst(rd, where, fld, raw, rate: Rate) -> int:
    """raw[fld], or one second of the rate; burst / rate bounded as the
    data plane's 64-bit nanoseconds need."""
    if fld in raw:
        burst = _int_in(rd, where, fld, raw[fld], 1, 1 << 40)
    else:
        burst = max(1, int(round(rate.per_second)))
    if burst / rate.per_second > 1e9:
        rd.fail(where, f"{fld} {burst} is too large for rate '{rate}' ({fld} / rate must be at most 1e9 seconds)")
    return burst


def default_new_sources(rate: Rate) -> Rate:
    """The new-source budget a per-source limit gets without new_sources:
    NEW_SOURCES_PER_RATE times its rate in packets (a byte rate in
    FULL_FRAME-byte frames), at least NEW_SOURCES_LEAST per second."""
    pps = rate.per_second / (FULL_FRAME if rate.unit == "bytes" else 1)
    n = max(NEW_SOURCES_LEAST, NEW_SOURCES_PER_RATE * pps)
    return Rate(n, "packets", f"{n:g}/s")


def _read_per_source(rd: _Reader, where: str, raw: dict, rule: Rule) -> None:
    """new_sources (+ new_sources_burst) and rate_total (+ burst_total)."""
    if "new_sources" in raw:
        rule.new_sources = _rate(rd, where, "new_sources", raw["new_sources"], "packets",
                                 "a count of sources per second like \"2k/s\"")
    else:
        if "new_sources_burst" in raw:
            rd.fail(where, "new_sources_burst needs new_sources")
        rule.new_sources = default_new_sources(rule.rate)
    rule.new_sources_burst = _burst(rd, where, "new_sources_burst", raw, rule.new_sources)
    if "rate_total" in raw:
        want = ("a byte rate like \"50Mbit/s\"" if rule.rate.unit == "bytes"
                else "a packet rate like \"2k/s\"") + " (as the rule's rate is)"
        rule.rate_total = _rate(rd, where, "rate_total", raw["rate_total"], rule.rate.unit, want)
        rule.burst_total = _burst(rd, where, "burst_total", raw, rule.rate_total)
        if rule.rate_total.per_second < rule.rate.per_second:
            rd.warn(where, f"rate_total '{rule.rate_total}' is below the per-source rate '{rule.rate}'")
    elif "burst_total" in raw:
        rd.fail(where, "burst_total needs rate_total")


def _read_syncookies(rd: _Reader, where: str, value, rule: Rule) -> None:
    """syncookies = true: on a TCP rule with dport that passes packets."""
    if not isinstance(value, bool):
        rd.fail(where, f"syncookies {value!r} is not valid (expected true or false)")
    if value:
        if rule.protos != frozenset({"tcp"}) or rule.dport is None:
            rd.fail(where, "syncookies needs proto = \"tcp\" and dport (the listening ports)")
        if rule.action == "deny":
            rd.fail(where, "syncookies is for a rule that passes packets (action \"allow\" or \"limit\")")
    rule.syncookies = value


def _read_mitigation(rd: _Reader, raw, sets) -> Mitigation:
    where = "[mitigation]"
    if not isinstance(raw, dict):
        rd.fail(where, "expected a table")
    rd.check_keys(where, raw, _MITIGATION_KEYS)
    m = Mitigation()
    for key in ("enabled", "dry_run"):
        setattr(m, key, _bool(rd, where, raw, key, getattr(m, key)))
    for key, unit in (("syn_rate", "packets"), ("conn_rate", "packets"), ("pps", "packets"), ("bps", "bytes")):
        if key in raw:
            try:
                r = parse_rate(raw[key])
            except ValueError as e:
                rd.fail(where, f"{key} {e}")
            if r.unit != unit:
                want = "a packet or event rate like \"100/s\"" if unit == "packets" else "a byte rate like \"50Mbit/s\""
                rd.fail(where, f"{key} '{raw[key]}' is not {want}")
            setattr(m, key, r)
    for key in ("window", "ban", "ban_max"):
        if key in raw:
            try:
                setattr(m, key, parse_duration(raw[key]))
            except ValueError as e:
                rd.fail(where, f"{key} {e}")
    if "forget" in raw:
        if raw["forget"] == "never":
            m.forget = None
        else:
            try:
                m.forget = parse_duration(raw["forget"])
            except ValueError as e:
                rd.fail(where, f"forget {e} (or \"never\")")
    if "ban_max" not in raw:
        m.ban_max = max(m.ban_max, m.ban)
    if m.ban_max < m.ban:
        rd.fail(where, "ban_max is shorter than ban")
    if "allow" in raw:
        m.allow = _addresses(rd, where, "allow", raw["allow"], sets)
    if "max_bans" in raw:
        m.max_bans = _int_in(rd, where, "max_bans", raw["max_bans"], 1, 1 << 20)
    if "prefix4" in raw:
        m.prefix4 = _int_in(rd, where, "prefix4", raw["prefix4"], 8, 32)
    if "prefix6" in raw:
        m.prefix6 = _int_in(rd, where, "prefix6", raw["prefix6"], 16, 128)
    if m.enabled and not any((m.syn_rate, m.conn_rate, m.pps, m.bps)):
        rd.warn(where, "enabled, but no threshold (syn_rate, conn_rate, pps, bps) is set")
    _read_auto_cookies(rd, where, raw, m)
    return m


def _read_auto_cookies(rd: _Reader, where: str, raw: dict, m: Mitigation) -> None:
    """syncookies = "auto" with its threshold syn_rate_total (SYNs per
    second to one port, all sources) and syncookies_hold (a duration)."""
    if "syncookies" in raw:
        if raw["syncookies"] not in ("auto", False):
            rd.fail(where, f"syncookies {raw['syncookies']!r} is not valid (expected \"auto\" or false; "
                           f"syncookies = true goes on a rule)")
        m.syncookies = raw["syncookies"] or None
    if "syn_rate_total" in raw:
        m.syn_rate_total = _rate(rd, where, "syn_rate_total", raw["syn_rate_total"], "packets",
                                 "a SYN rate like \"5k/s\"")
    if "syncookies_hold" in raw:
        try:
            m.syncookies_hold = parse_duration(raw["syncookies_hold"])
        except ValueError as e:
            rd.fail(where, f"syncookies_hold {e}")
    if m.syncookies == "auto":
        if m.syn_rate_total is None:
            rd.fail(where, "syncookies = \"auto\" needs syn_rate_total (the SYN rate to one port, "
                           "like \"5k/s\", over which watch turns its cookies on)")
    else:
        for key in ("syn_rate_total", "syncookies_hold"):
            if key in raw:
                rd.fail(where, f"{key} is only for syncookies = \"auto\"")


def _read_protect(rd: _Reader, raw) -> tuple[tuple[Prefix, int | None], ...]:
    where = "[policy] protect"
    if not isinstance(raw, list):
        rd.fail(where, "expected a list like [\"192.0.2.10:22\", \"2001:db8::5\"]")
    out = []
    for item in raw:
        if not isinstance(item, str):
            rd.fail(where, f"{item!r} is not an address")
        addr, port = item, None
        # "[v6]:port", "[v6]", "v4:port"; IPv6 with a port needs the brackets.
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", item) or re.fullmatch(r"([^:]+):(\d+)", item)
        if m:
            addr, port = m.group(1), None if m.group(2) is None else int(m.group(2))
            if port is not None and port > 65535:
                rd.fail(where, f"'{item}': {port} is not a port")
        elif _ambiguous_v6_port(item):
            head, _, tail = item.rpartition(":")
            rd.fail(where, f"'{item}' is ambiguous: address {item}, or {head} port {tail}? "
                           f"Write \"[{head}]:{tail}\" for the port, \"[{item}]\" for the address alone")
        out.append((rd.prefix(where, "entry", addr), port))
    return tuple(out)


def _ambiguous_v6_port(text: str) -> bool:
    """Whether unbracketed IPv6 text reads both as an address and as an
    address and port ("2001:db8::1:22")."""
    head, _, tail = text.rpartition(":")
    if not (tail.isdigit() and int(tail) <= 65535) or "/" in text:
        return False
    try:
        socket.inet_pton(socket.AF_INET6, text)
        socket.inet_pton(socket.AF_INET6, head)
    except OSError:
        return False
    return True


def _single_rule_hint(text: str) -> str:
    """A hint for "[rule]" written where "[[rule]]" was meant (TOML
    reads it as one table; a second one is a syntax error)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if re.fullmatch(r"\s*\[\s*rule\s*\]\s*(#.*)?", line):
            return f"; line {lineno}: [rule] declares one table: write [[rule]] (double brackets) before each rule"
    return ""


def _bool(rd: _Reader, where: str, raw: dict, key: str, default: bool) -> bool:
    val = raw.get(key, default)
    if not isinstance(val, bool):
        rd.fail(where, f"{key} {val!r} is not valid (expected true or false)")
    return val


def _secret_file(rd: _Reader, where: str, fld: str, value, least: int, example: str) -> str:
    """The absolute path of a readable file holding a secret (at least
    `least` bytes); the secret itself is read where it is used."""
    if not isinstance(value, str) or not value:
        rd.fail(where, f"{fld} is required: the path of a file (e.g. {example})")
    path = (rd.path.parent / value).resolve()
    try:
        size = len(path.read_bytes().strip())
    except OSError as e:
        rd.fail(where, f"{fld} '{value}' cannot be read ({e.strerror or e}); expected a file holding the secret")
    if size < least:
        rd.fail(where, f"{fld} '{value}' holds {size} bytes; expected at least {least}")
    return str(path)


def _service_url(rd: _Reader, where: str, fld: str, value, schemes: tuple[str, ...], example: str) -> str:
    from urllib.parse import urlsplit
    if not isinstance(value, str):
        rd.fail(where, f"{fld} {value!r} is not valid (expected a URL like \"{example}\")")
    try:
        u = urlsplit(value)
        u.port
    except ValueError as e:
        rd.fail(where, f"{fld} '{value}' is not a URL ({e}; expected one like \"{example}\")")
    if u.scheme not in schemes or not u.hostname:
        rd.fail(where, f"{fld} '{value}' is not valid (expected {' or '.join(s + '://HOST' for s in schemes)}, "
                       f"like \"{example}\")")
    if u.password is not None:
        rd.fail(where, f"{fld} '{u.scheme}://...' holds a password; put it in password_file (a policy is no place for a secret)")
    return value


_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MACHINE_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")


def _service_table(rd: _Reader, where: str, raw, keys: tuple[str, ...], required: str, example: str) -> dict:
    """A table naming a service ([fleet], [crowdsec]): known keys, and the
    service's URL given."""
    if not isinstance(raw, dict):
        rd.fail(where, "expected a table")
    rd.check_keys(where, raw, keys)
    if required not in raw:
        rd.fail(where, f"{required} is required (e.g. {required} = \"{example}\")")
    return raw


def _read_fleet(rd: _Reader, raw) -> Fleet:
    where = "[fleet]"
    raw = _service_table(rd, where, raw, _FLEET_KEYS, "redis", "redis://127.0.0.1:6379/0")
    url = _service_url(rd, where, "redis", raw["redis"], ("redis", "rediss"), "redis://127.0.0.1:6379/0")
    from urllib.parse import urlsplit
    db = urlsplit(url).path.strip("/")
    if db and not db.isdigit():
        rd.fail(where, f"redis '{url}': database '{db}' is not valid (expected a number, like /0)")
    f = Fleet(redis=url, key_file=_secret_file(rd, where, "key_file", raw.get("key_file"), FLEET_KEY_MIN,
                                               "\"/etc/xdpguard/fleet.key\""))
    if "password_file" in raw:
        f.password_file = _secret_file(rd, where, "password_file", raw["password_file"], 1,
                                       "\"/etc/xdpguard/redis.pass\"")
    for key in ("name", "host"):
        if key in raw:
            if not isinstance(raw[key], str) or not _NAME_RE.fullmatch(raw[key]):
                rd.fail(where, f"{key} {raw[key]!r} is not valid (1-64 letters, digits, '_', '.', ':' or '-')")
            setattr(f, key, raw[key])
    if not f.host:
        f.host = socket.gethostname()[:64] or "localhost"
    f.publish = _bool(rd, where, raw, "publish", True)
    f.subscribe = _bool(rd, where, raw, "subscribe", True)
    if "min_prefix4" in raw:
        f.min_prefix4 = _int_in(rd, where, "min_prefix4", raw["min_prefix4"], 0, 32)
    if "min_prefix6" in raw:
        f.min_prefix6 = _int_in(rd, where, "min_prefix6", raw["min_prefix6"], 0, 128)
    return f


def _read_crowdsec(rd: _Reader, raw) -> CrowdSec:
    where = "[crowdsec]"
    raw = _service_table(rd, where, raw, _CROWDSEC_KEYS, "lapi", "http://127.0.0.1:8080")
    c = CrowdSec(lapi=_service_url(rd, where, "lapi", raw["lapi"], ("http", "https"), "http://127.0.0.1:8080"),
                 key_file=_secret_file(rd, where, "key_file", raw.get("key_file"), 1,
                                       "\"/etc/xdpguard/crowdsec.key\", from 'cscli bouncers add xdpguard -o raw'"))
    if "interval" in raw:
        try:
            c.interval = parse_duration(raw["interval"])
        except ValueError as e:
            rd.fail(where, f"interval {e}")
        if not 0.1 <= c.interval <= 3600:
            rd.fail(where, f"interval {raw['interval']!r} is not valid (expected 100ms..1h)")
    if "scopes" in raw:
        scopes = raw["scopes"]
        if (not isinstance(scopes, list) or not scopes
                or any(s not in CROWDSEC_SCOPES for s in scopes)):
            rd.fail(where, f"scopes {scopes!r} is not valid (expected a non-empty list of \"ip\", \"range\")")
        c.scopes = tuple(dict.fromkeys(scopes))
    c.push = _bool(rd, where, raw, "push", False)
    if "machine_id" in raw:
        if not isinstance(raw["machine_id"], str) or not _MACHINE_RE.fullmatch(raw["machine_id"]):
            rd.fail(where, f"machine_id {raw['machine_id']!r} is not valid (expected the name of 'cscli machines "
                           "add NAME': 1-128 letters, digits, '_', '.', '@' or '-')")
        c.machine_id = raw["machine_id"]
    if "password_file" in raw:
        c.password_file = _secret_file(rd, where, "password_file", raw["password_file"], 1,
                                       "\"/etc/xdpguard/crowdsec-machine.pass\", the password of 'cscli machines add'")
    if c.push:
        for key in ("machine_id", "password_file"):
            if getattr(c, key) is None:
                rd.fail(where, f"push = true needs {key} (a machine of 'cscli machines add NAME --password ...')")
    return c


def load(path, text: str | None = None, set_files: dict[str, str] | None = None) -> Policy:
    """Read and validate a policy file. Raises PolicyError. set_files:
    paths to read set files from instead, by their "file" string (a
    policy kept for rollback: history.py)."""
    path = Path(path)
    rd = _Reader(path, set_files)
    if text is None:
        try:
            data_bytes = path.read_bytes()
        except OSError as e:
            raise PolicyError(f"{path}: cannot read policy: {e.strerror or e}") from None
    else:
        data_bytes = text.encode()
    try:
        # utf-8-sig: a byte order mark, as some Windows editors write, is no error.
        source_text = data_bytes.decode("utf-8-sig")
    except UnicodeDecodeError:
        rd.fail("", "not UTF-8 text")
    try:
        doc = tomllib.loads(source_text)
    except tomllib.TOMLDecodeError as e:
        rd.fail("", f"TOML syntax error: {e}{_single_rule_hint(source_text)}")

    rd.check_keys("", doc, _TOP_KEYS)
    head = doc.get("policy", {})
    if not isinstance(head, dict):
        rd.fail("[policy]", "expected a table")
    rd.check_keys("[policy]", head, _POLICY_KEYS)
    name = head.get("name", re.sub(r"[^A-Za-z0-9_.:-]", "-", path.stem)[:64] or "policy")
    problem = _name_problem(name)
    if problem:
        rd.fail("[policy]", problem)
    default = head.get("default", "allow")
    if default not in ("allow", "deny"):
        rd.fail("[policy]", f"default {default!r} is not valid (expected \"allow\" or \"deny\")")
    log_rate = _int_in(rd, "[policy]", "log_rate", head.get("log_rate", 10), 0, 100000)
    log_flags = {}
    for key in ("log_default", "log_bans"):
        log_flags[key] = _bool(rd, "[policy]", head, key, False)

    sets = _read_sets(rd, doc.get("sets", {}))
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        rd.fail("", "rules must be written as [[rule]] tables" + _single_rule_hint(source_text))
    if not raw_rules and not ("default" in head and "mitigation" in doc):
        # Without rules, a policy is its default and its [mitigation] (a
        # shared host that allows everything and bans abusers); with
        # either missing, an empty file or a half-written one.
        rd.fail("", "empty policy: no [[rule]] tables (add a rule; a policy without rules needs "
                    "[policy] default and a [mitigation] table)")
    from xdpguard.layout import C
    if len(raw_rules) > C.XG_MAX_RULES_LIMIT:
        rd.fail("", f"{len(raw_rules)} rules: at most {C.XG_MAX_RULES_LIMIT} are supported")
    names: dict[str, int] = {}
    rules = [_read_rule(rd, i, r, sets, names) for i, r in enumerate(raw_rules)]
    mitigation = _read_mitigation(rd, doc["mitigation"], sets) if "mitigation" in doc else Mitigation()
    if mitigation.syncookies == "auto" and not any(r.syncookies is None and r.takes_cookies for r in rules):
        rd.fail("[mitigation]", "syncookies = \"auto\", but no rule can take SYN cookies (one with "
                                "proto = \"tcp\", dport and action \"allow\" or \"limit\", not saying syncookies)")
    protect = _read_protect(rd, head["protect"]) if "protect" in head else ()
    fleet = _read_fleet(rd, doc["fleet"]) if "fleet" in doc else None
    crowdsec = _read_crowdsec(rd, doc["crowdsec"]) if "crowdsec" in doc else None
    return Policy(name=name, default=default, rules=rules, sets=sets, mitigation=mitigation,
                  protect=protect, fleet=fleet, crowdsec=crowdsec, log_rate=log_rate, **log_flags,
                  source=str(path.resolve()) if text is None else str(path),
                  sha256=policy_sha256(data_bytes, {k: h for k, (_p, h) in rd.inputs.items()}),
                  warnings=rd.warnings, text=data_bytes, inputs=rd.inputs)


def _set_path(policy_path: Path, name: str) -> Path:
    """Where a set's { file = name } is: beside the policy file."""
    return (policy_path.parent / name).resolve()


def sha256_on_disk(path) -> str:
    """The sha256 `load` would give the policy file at path as it is now
    (its bytes and its set files'), without validating it: OSError when a
    file cannot be read, ValueError when it is no TOML."""
    path = Path(path)
    data = path.read_bytes()
    try:
        doc = tomllib.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(str(e)) from None
    sets = doc.get("sets")
    files = {}
    for spec in (sets.values() if isinstance(sets, dict) else ()):
        if isinstance(spec, dict) and isinstance(spec.get("file"), str):
            h = hashlib.sha256()
            with open(_set_path(path, spec["file"]), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            files[spec["file"]] = h.hexdigest()
    return policy_sha256(data, files)


def policy_sha256(text: bytes, sets: dict[str, str]) -> str:
    """The sha256 of a policy: of its file's bytes alone when it reads no
    set file (what sha256sum says), else also of each set file's name and
    sha256."""
    h = hashlib.sha256(text)
    for name in sorted(sets):
        h.update(b"\0" + name.encode() + b"\0" + sets[name].encode())
    return h.hexdigest()
