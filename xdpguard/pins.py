"""The pin directory: where an applied policy lives after `apply` exits.

Layout (versioned by XG_LAYOUT_VERSION in the record; see docs/design.md):

    /sys/fs/bpf/xdpguard/<netns or "host">/<iface>/
        prog            the XDP program
        <map>           every map under its C name (bpf/xdpguard.c)
        meta            array map, one value: the JSON record

Readers (`stats`, `status`, `bans`) never compile: the record carries bcc's
type descriptions of each map, turned back into ctypes types here.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

from xdpguard import bpfsys
from xdpguard.layout import C

ROOT = Path("/sys/fs/bpf/xdpguard")
# bpffs refuses names with a '.', and interface and netns names may have
# one: it is written '~' there. '@' cannot start a netns name (netns.py).
STAGE = ROOT / "@stage"
META_SIZE = 1 << 20


class PinError(Exception):
    """The pin directory is missing, locked or of another layout."""


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when it is missing."""
    if os.path.ismount("/sys/fs/bpf"):
        return
    os.makedirs("/sys/fs/bpf", exist_ok=True)
    r = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], capture_output=True, text=True)
    if r.returncode != 0:
        raise PinError(f"cannot mount bpffs at /sys/fs/bpf: {r.stderr.strip()}")


def _enc(name: str) -> str:
    return name.replace(".", "~")


def _dec(name: str) -> str:
    return name.replace("~", ".")


def iface_dir(netns: str | None, iface: str) -> Path:
    return ROOT / _enc(netns or "host") / _enc(iface)


_held = threading.local()


class Abandoned(Exception):
    """Raised by a signal handler to give up waiting for the lock (see waiting())."""


def waiting() -> bool:
    """Whether this thread waits for the lock in locked(interruptible=True):
    a signal handler may then raise Abandoned (nothing is held yet)."""
    return getattr(_held, "waiting", False)


@contextmanager
def locked(interruptible: bool = False) -> Iterator[None]:
    """Serialise writers (apply, detach, ban) like xdp-filter: flock on the root.

    Re-entrant in one thread (apply holds it and then changes the record
    through modify_record): a second flock on a new descriptor would wait
    for the first forever. Other threads open their own descriptor, and
    flock serialises them like other processes. interruptible: the wait
    (an apply holds the lock for seconds) may end in Abandoned."""
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    ensure_bpffs()
    ROOT.mkdir(parents=True, exist_ok=True)
    fd = os.open(ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _held.waiting = interruptible
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            _held.waiting = False
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Unpin everything under path (bpffs has no recursive rmdir)."""
    if path.exists():
        shutil.rmtree(path)


def prune() -> None:
    """Remove empty directories left under the root. The root stays: it is
    what writers flock, and a new inode would split the lock."""
    if not ROOT.is_dir():
        return
    if STAGE.is_dir():
        # A stage whose loader died (killed mid-apply) holds map pins, and
        # so locked memory: nobody else will ever remove it.
        for d in list(STAGE.iterdir()):
            if not (d.name.isdigit() and os.path.exists(f"/proc/{d.name}")):
                remove_dir(d)
    for d in list(ROOT.iterdir()):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two directories (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


# ---------------------------------------------------------------- the record

# Policies the record remembers before the running one (`rollback` goes
# back through them one step at a time): at least 3, the issue asked.
HISTORY = 5


@dataclass
class PolicyInfo:
    """The applied policy as the record names it (and an entry of its
    history)."""
    name: str = ""
    sha256: str = ""
    source: str = ""
    applied_at: float = 0.0    # also the token `apply --confirm` waits on
    default: str = "allow"
    rules: int = 0


@dataclass
class RuleSlot:
    name: str
    action: str                # "allow" | "deny" | "limit"
    slot: int


@dataclass
class MitigationInfo:
    enabled: bool = False
    prefix4: int = 32
    prefix6: int = 64
    allow: list[str] = field(default_factory=list)
    max_bans: int | None = None   # None: a record from before it was kept (no limit)


@dataclass
class Protect:
    prefix: str
    port: int | None = None


@dataclass
class Confirm:
    deadline: float


@dataclass
class Syncookies:
    """What xdpguard owns outside XDP while the policy has syncookies
    (xdpguard/syncookies.py): its nftables table, the port ranges in it,
    and the sysctls' values before it set them (restored when it stops)."""
    table: str
    ports: list[list[int]] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    # [mitigation] syncookies = "auto": the ports `watch` may switch.
    auto: list[list[int]] = field(default_factory=list)


@dataclass
class Previous:
    """What `rollback` needs of the policy before the running one (one
    level): its record without types (a "gen" one shares the running
    program's) and where it is, the other generation or the @prev pins."""
    kind: str                  # "gen" | "dir"
    record: "Record"
    gen: int | None = None


@dataclass
class Record:
    """The record of an applied policy, pinned as the map `meta`. Its JSON
    keys are the field names (docs/design.md: Pins); `layout` is checked
    on every read."""
    layout: int = C.XG_LAYOUT_VERSION
    netns: str = "host"
    iface: str = ""
    ifindex: int = 0
    mode: str = ""
    prog_id: int = 0
    policy: PolicyInfo = field(default_factory=PolicyInfo)
    shape: dict[str, int] = field(default_factory=dict)      # loader.Shape's fields
    rules: list[RuleSlot] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)
    lpm: dict[str, int] = field(default_factory=dict)        # trie entries per family
    types: dict = field(default_factory=dict)                # bcc's type descriptions by map
    mitigation: MitigationInfo = field(default_factory=MitigationInfo)
    protect: list[Protect] = field(default_factory=list)
    previous: Previous | None = None
    confirm: Confirm | None = None
    probes: str | None = None  # set by `watch`: the probe set it runs
    syncookies: Syncookies | None = None
    # The generation (of the program's two) this record describes: the
    # active word is flipped to it only after the record is written, and
    # a writer that finds them apart (a kill in between) flips it
    # (loader.settle). None: a record written before it was kept (0).
    generation: int | None = None
    # The policies applied before this one, newest first, at most HISTORY:
    # `rollback` goes to the first and drops it (history.py keeps copies).
    history: list[PolicyInfo] = field(default_factory=list)
    fleet: dict | None = None  # [fleet] as policy.Fleet's fields (paths of secrets, no secret)

    @property
    def ns(self) -> str | None:
        """The namespace as in_netns takes it (None: the host's)."""
        return None if self.netns == "host" else self.netns

    def as_previous(self, kind: str, gen: int | None = None) -> Previous:
        return Previous(kind, replace(self, types={}, previous=None, confirm=None, history=[]), gen)

    def to_json(self) -> dict:
        doc = {"layout": self.layout, "netns": self.netns, "iface": self.iface,
               "ifindex": self.ifindex, "mode": self.mode, "prog_id": self.prog_id,
               "policy": asdict(self.policy), "shape": self.shape,
               "rules": [asdict(r) for r in self.rules], "slots": self.slots, "lpm": self.lpm,
               "types": self.types, "mitigation": {k: v for k, v in asdict(self.mitigation).items()
                                                 if v is not None},
               "protect": [asdict(p) for p in self.protect]}
        if self.previous is not None:
            prev = {k: v for k, v in self.previous.record.to_json().items() if k != "types"}
            prev["kind"] = self.previous.kind
            if self.previous.gen is not None:
                prev["gen"] = self.previous.gen
            doc["previous"] = prev
        if self.confirm is not None:
            doc["confirm"] = asdict(self.confirm)
        if self.probes is not None:
            doc["probes"] = self.probes
        if self.syncookies is not None:
            doc["syncookies"] = asdict(self.syncookies)
        if self.generation is not None:
            doc["generation"] = self.generation
        if self.history:
            doc["history"] = [asdict(p) for p in self.history]
        if self.fleet is not None:
            doc["fleet"] = self.fleet
        return doc

    @classmethod
    def from_json(cls, doc: dict, where: str | Path = "record") -> "Record":
        """The record of a JSON document; PinError for another layout."""
        if not isinstance(doc, dict) or doc.get("layout") != C.XG_LAYOUT_VERSION:
            got = doc.get("layout") if isinstance(doc, dict) else None
            raise PinError(f"{where}: pinned by another xdpguard version (layout "
                           f"{got}, this one reads {C.XG_LAYOUT_VERSION}); "
                           f"run 'xdpguard detach' with that version, or remove {where}")
        try:
            return cls._from(doc)
        except (TypeError, KeyError, AttributeError) as e:
            raise PinError(f"{where}: unreadable record ({e!r}); remove {where}") from None

    @classmethod
    def _from(cls, doc: dict) -> "Record":
        prev = doc.get("previous")
        if prev is not None:
            prev = Previous(prev["kind"], cls._from(prev), prev.get("gen"))
        confirm = doc.get("confirm")
        cookies = doc.get("syncookies")
        plain = {k: v for k, v in _known(cls, doc).items() if k not in _NESTED}
        return cls(**plain,
                   policy=PolicyInfo(**_known(PolicyInfo, doc.get("policy", {}))),
                   rules=[RuleSlot(**_known(RuleSlot, r)) for r in doc.get("rules", [])],
                   mitigation=MitigationInfo(**_known(MitigationInfo, doc.get("mitigation", {}))),
                   protect=[Protect(**_known(Protect, p)) for p in doc.get("protect", [])],
                   previous=prev,
                   confirm=None if confirm is None else Confirm(**_known(Confirm, confirm)),
                   syncookies=None if cookies is None else Syncookies(**_known(Syncookies, cookies)),
                   history=[PolicyInfo(**_known(PolicyInfo, p)) for p in doc.get("history", [])])


_NESTED = {"policy", "rules", "mitigation", "protect", "previous", "confirm", "syncookies", "history"}


def _known(cls, doc: dict) -> dict:
    """The fields of cls that doc has (a previous record has no types)."""
    return {f.name: doc[f.name] for f in fields(cls) if f.name in doc}


def _write(fd: int, record: Record) -> None:
    data = json.dumps(record.to_json(), separators=(",", ":")).encode()
    if len(data) + 4 > META_SIZE:
        raise PinError(f"policy record too large ({len(data)} bytes)")
    value = len(data).to_bytes(4, "little") + data
    bpfsys.map_update(fd, b"\0\0\0\0", value.ljust(META_SIZE, b"\0"))


def create_meta(record: Record) -> int:
    """A new `meta` map holding record, for a directory being staged
    (nobody reads it before it is pinned: no lock needed)."""
    fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, "xg_meta", 4, META_SIZE, 1)
    _write(fd, record)
    return fd


def read_record(directory: Path) -> Record | None:
    """The record of an applied policy, or None when nothing is pinned there."""
    try:
        fd = bpfsys.obj_get(str(directory / "meta"))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    try:
        info = bpfsys.map_info(fd)
        raw = None
        if (info["type"], info["key_size"], info["value_size"]) == (bpfsys.BPF_MAP_TYPE_ARRAY, 4, META_SIZE):
            raw = bpfsys.map_lookup(fd, b"\0\0\0\0", META_SIZE)
    except OSError:
        raw = None    # not a map at all (a program pinned there)
    finally:
        os.close(fd)
    n = int.from_bytes(raw[:4], "little") if raw else 0
    try:
        doc = json.loads(raw[4:4 + n]) if raw else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if doc is None:
        # Replaced by something xdpguard did not pin.
        raise PinError(f"{directory / 'meta'}: not an xdpguard record; 'xdpguard detach "
                       f"--force' removes what is pinned in {directory}")
    return Record.from_json(doc, directory)


class NotPinned(PinError):
    """modify_record: nothing is pinned in the directory."""


def modify_record(directory: Path, fn: Callable[[Record], Record]) -> Record:
    """The one way to change a pinned record: under the pin lock, fn gets
    the record and returns the one to write (which is returned)."""
    with locked():
        record = read_record(directory)
        if record is None:
            raise NotPinned(f"{directory}: xdpguard is not applied here")
        record = fn(record)
        fd = bpfsys.obj_get(str(directory / "meta"))
        try:
            _write(fd, record)
        finally:
            os.close(fd)
        return record


def all_pinned() -> list[tuple[str, str, Path]]:
    """(netns, iface, dir) of every interface with an xdpguard pin."""
    out = []
    if not ROOT.is_dir():
        return out
    for ns in sorted(ROOT.iterdir()):
        if ns.name.startswith("@") or not ns.is_dir():
            continue
        for ifd in sorted(ns.iterdir()):
            if "@" not in ifd.name and (ifd / "meta").exists():
                out.append((_dec(ns.name), _dec(ifd.name), ifd))
    return out


def unrecorded() -> list[Path]:
    """Interface directories with pins but no record (a removed `meta`):
    `detach` removes them, `apply` replaces them."""
    if not ROOT.is_dir():
        return []
    return [ifd for ns in sorted(ROOT.iterdir()) if not ns.name.startswith("@") and ns.is_dir()
            for ifd in sorted(ns.iterdir())
            if "@" not in ifd.name and ifd.is_dir() and not (ifd / "meta").exists() and any(ifd.iterdir())]


# ---------------------------------------------------------------- maps

_CTYPES = {
    "_Bool": ctypes.c_bool, "char": ctypes.c_char, "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short, "unsigned short": ctypes.c_ushort, "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint, "long": ctypes.c_long, "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong, "unsigned long long": ctypes.c_ulonglong,
}


def decode_type(desc):
    """bcc's JSON type description -> ctypes type.

    The same decoding as bcc's BPF._decode_table_type, for the subset of C
    types bpf/xdpguard.h uses, because importing bcc costs `stats` 0.2 s.
    tests/test_pins.py checks it against bcc's own decoder."""
    if isinstance(desc, str):
        return _CTYPES[desc]
    fields = []
    for t in desc[1]:
        if len(t) == 2:
            fields.append((t[0], decode_type(t[1])))
        elif len(t) == 3 and isinstance(t[2], list):
            fields.append((t[0], decode_type(t[1]) * t[2][0]))
        elif len(t) == 3 and isinstance(t[2], int):
            fields.append((t[0], decode_type(t[1]), t[2]))
        elif len(t) == 3 and t[2] in ("struct", "union", "struct_packed"):
            fields.append((t[0], decode_type(t)))
        else:
            raise PinError(f"cannot decode map type {t!r}")
    base = ctypes.Union if len(desc) > 2 and desc[2] == "union" else ctypes.Structure
    attrs = {"_fields_": fields}
    if len(desc) > 2 and desc[2] == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]), (base,), attrs)


@dataclass
class Map:
    """A map by fd with its key and value ctypes types (from bcc)."""
    name: str
    fd: int
    Key: type
    Leaf: type
    map_type: int
    max_entries: int
    owned: bool = True

    @property
    def percpu(self) -> bool:
        return self.map_type in bpfsys.PERCPU_MAP_TYPES

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update_batch(self, keys, values) -> None:
        """keys / values: ctypes arrays (or bytes) of equal count."""
        n = len(keys)
        if n:
            bpfsys.map_update_batch(self.fd, bytes(keys), bytes(values), n)

    def lookup(self, key):
        size = ctypes.sizeof(self.Leaf)
        if self.percpu:
            raw = bpfsys.map_lookup(self.fd, bytes(key), bpfsys.percpu_value_size(size))
            if raw is None:
                return None
            return [self.Leaf.from_buffer_copy(v) for v in bpfsys.percpu_split(raw, size)]
        raw = bpfsys.map_lookup(self.fd, bytes(key), size)
        return None if raw is None else self.Leaf.from_buffer_copy(raw)

    def update(self, key, value) -> None:
        bpfsys.map_update(self.fd, bytes(key), bytes(value))

    def delete(self, key) -> bool:
        return bpfsys.map_delete(self.fd, bytes(key))

    def items(self):
        ks, vs = ctypes.sizeof(self.Key), ctypes.sizeof(self.Leaf)
        if self.percpu:
            vs_all = bpfsys.percpu_value_size(vs)
            for k in bpfsys.map_keys(self.fd, ks):
                raw = bpfsys.map_lookup(self.fd, k, vs_all)
                if raw is not None:
                    yield self.Key.from_buffer_copy(k), [self.Leaf.from_buffer_copy(v) for v in bpfsys.percpu_split(raw, vs)]
            return
        for k in bpfsys.map_keys(self.fd, ks):
            raw = bpfsys.map_lookup(self.fd, k, vs)
            if raw is not None:
                yield self.Key.from_buffer_copy(k), self.Leaf.from_buffer_copy(raw)

    def count(self) -> int:
        return sum(1 for _ in bpfsys.map_keys(self.fd, ctypes.sizeof(self.Key)))


def open_map(directory: Path, name: str, record: Record) -> Map:
    """Open a pinned map with the types recorded when it was loaded."""
    types = record.types[name]
    fd = bpfsys.obj_get(str(directory / name))
    info = bpfsys.map_info(fd)
    return Map(name, fd, decode_type(types["key"]), decode_type(types["leaf"]),
               info["type"], info["max_entries"])
