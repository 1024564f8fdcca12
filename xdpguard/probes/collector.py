"""Kernel-probe statistics for the feedback loop: per-source and per-service
TCP counts (SYNs reaching a listener, completed handshakes, SYN-ACK
retransmissions, resets), from kprobes where the kernel has them, else from
tracepoints.

    ps = ProbeSet.open()                  # mode "auto": kprobe, else tracepoint
    prev = ps.snapshot()
    ...                                    # one interval later
    cur = ps.snapshot()
    r = ProbeSet.rates(prev, cur, seconds)
    ps.clear_idle(cur)                     # drop entries unchanged for an interval
    prev = cur
    ...
    ps.close()

The C programs of both sets are bpf/probes/tcp_probes.c (see its header
comment for what each counter counts); the map layout is
bpf/probes/probes.h, read here only through bcc's Key/Leaf ctypes.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from . import btf, detect

MODES = ("kprobe", "tracepoint")

# Public counters of a snapshot entry ("resets" = rst_sent + rst_recv).
COUNTERS = ("syns", "handshakes", "synack_retrans", "resets", "rst_sent", "rst_recv")

SRC_MAP = b"xg_psrc"
DST_MAP = b"xg_pdst"

AF_INET = 2
AF_INET6 = 10

DEFAULT_SRC_ENTRIES = 65536
DEFAULT_DST_ENTRIES = 16384

# The consume_skb raw tracepoint counts a SYN when the skb is freed from
# inside this function (see tcp_probes.c).
SYN_CONSUMER = "tcp_rcv_state_process"


class ProbeError(Exception):
    pass


@dataclass(frozen=True)
class Prog:
    name: str       # C function
    kind: str       # "kprobe" | "tracepoint" | "raw_tracepoint"
    target: str     # kernel function, "category:event", raw tracepoint name
    counter: str    # the kernel-side counter it feeds
    required: bool  # open() fails when it cannot be attached


KPROBE_PROGS = (
    Prog("xg_kp_tcp_conn_request", "kprobe", "tcp_conn_request", "syns", True),
    Prog("xg_kp_tcp_set_state", "kprobe", "tcp_set_state", "handshakes", True),
    Prog("xg_kp_tcp_rtx_synack", "kprobe", "tcp_rtx_synack", "synack_retrans", False),
    Prog("xg_kp_tcp_send_reset_skb", "kprobe", "tcp_v4_send_reset", "rst_sent", False),
    Prog("xg_kp_tcp_send_reset_skb", "kprobe", "tcp_v6_send_reset", "rst_sent", False),
    Prog("xg_kp_tcp_send_active_reset", "kprobe", "tcp_send_active_reset", "rst_sent", False),
    Prog("xg_kp_tcp_reset", "kprobe", "tcp_reset", "rst_recv", False),
)

TRACEPOINT_PROGS = (
    Prog("tracepoint__sock__inet_sock_set_state", "tracepoint",
         "sock:inet_sock_set_state", "handshakes", True),
    Prog("tracepoint__tcp__tcp_retransmit_synack", "tracepoint",
         "tcp:tcp_retransmit_synack", "synack_retrans", False),
    Prog("tracepoint__tcp__tcp_receive_reset", "tracepoint",
         "tcp:tcp_receive_reset", "rst_recv", False),
    Prog("tracepoint__tcp__tcp_send_reset", "tracepoint",
         "tcp:tcp_send_reset", "rst_sent", False),
    Prog("xg_rtp_consume_skb", "raw_tracepoint", "consume_skb", "syns", False),
)

# Optional tracepoint -> the -D that leaves its program out.
_TP_SKIP_FLAG = {
    "tcp:tcp_retransmit_synack": "XG_NO_TP_RETRANSMIT_SYNACK",
    "tcp:tcp_receive_reset": "XG_NO_TP_RECEIVE_RESET",
    "tcp:tcp_send_reset": "XG_NO_TP_SEND_RESET",
}

SOURCE = "tcp_probes.c"     # both sets; -DXG_SET_KPROBE picks the kprobe set


def programs(mode: str) -> tuple[Prog, ...]:
    if mode == "kprobe":
        return KPROBE_PROGS
    if mode == "tracepoint":
        return TRACEPOINT_PROGS
    raise ValueError("mode must be one of %s, not %r" % (MODES, mode))


def source_dir() -> Path:
    """Directory of the probe C sources: the source tree's bpf/probes, or
    the installed package xdpguard/bpf/probes."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "bpf" / "probes", here.parent / "bpf" / "probes"):
        if (cand / "probes.h").is_file():
            return cand
    raise ProbeError("probe sources (probes.h) not found near %s" % here)


def _bcc():
    try:
        from bcc import BPF
    except ImportError as e:  # pragma: no cover
        raise ProbeError("bcc is not importable: %s" % e) from e
    return BPF


def _bpf_class():
    """bcc's BPF without auto-attach of kprobe__/tracepoint__/... functions:
    programs are loaded and attached explicitly (load_only() must verify
    the kprobe set on a kernel that cannot attach it)."""
    BPF = _bcc()

    class _ExplicitBPF(BPF):
        def _trace_autoload(self):
            pass

    return _ExplicitBPF


_SEND_RESET_SOCKADDR = re.compile(r"__u8 saddr\[28\];.*\n.*__u8 daddr\[28\];")


def build_cflags(mode: str, prefix4: int = 32, prefix6: int = 64,
                 src_entries: int = DEFAULT_SRC_ENTRIES,
                 dst_entries: int = DEFAULT_DST_ENTRIES) -> tuple[list[str], dict[str, str]]:
    """Compiler flags of a set, and {prog target: reason} of programs left
    out because the kernel lacks what they need."""
    programs(mode)
    if not 0 <= int(prefix4) <= 32:
        raise ValueError("prefix4 must be 0..32")
    if not 0 <= int(prefix6) <= 128:
        raise ValueError("prefix6 must be 0..128")
    if int(src_entries) < 1 or int(dst_entries) < 1:
        raise ValueError("map sizes must be positive")
    flags = [
        "-I%s" % source_dir(),
        "-DXG_PROBE_PREFIX4=%d" % int(prefix4),
        "-DXG_PROBE_PREFIX6=%d" % int(prefix6),
        "-DXG_PROBE_SRC_ENTRIES=%d" % int(src_entries),
        "-DXG_PROBE_DST_ENTRIES=%d" % int(dst_entries),
    ]
    if mode == "kprobe":
        flags.append("-DXG_SET_KPROBE")
    try:
        flags += btf.probe_offset_cflags()
    except (OSError, btf.BTFError) as e:
        raise ProbeError("cannot read kernel struct offsets from BTF: %s" % e) from e
    skipped: dict[str, str] = {}
    if mode == "tracepoint":
        if detect.ensure_tracefs() is None:
            raise ProbeError("tracefs is not mounted and cannot be mounted")
        if not detect.tracepoint_exists("sock", "inet_sock_set_state"):
            raise ProbeError("tracepoint sock:inet_sock_set_state missing")
        for target, flag in _TP_SKIP_FLAG.items():
            cat, ev = target.split(":")
            fmt = detect.tracepoint_format(cat, ev)
            if fmt is None:
                skipped[target] = "tracepoint missing"
            elif target == "tcp:tcp_send_reset" and not _SEND_RESET_SOCKADDR.search(fmt):
                skipped[target] = "format without sockaddr fields"
            else:
                continue
            flags.append("-D%s" % flag)
        rng = detect.function_ranges([SYN_CONSUMER]).get(SYN_CONSUMER)
        if rng is None:
            skipped["consume_skb"] = "%s not in /proc/kallsyms" % SYN_CONSUMER
        else:
            flags += ["-DXG_SYN_LOC_START=%#xULL" % rng[0], "-DXG_SYN_LOC_END=%#xULL" % rng[1]]
    return flags, skipped


def _compile(cflags: list[str]):
    BPF = _bpf_class()
    path = source_dir() / SOURCE
    try:
        return BPF(src_file=str(path).encode(), cflags=cflags)
    except Exception as e:
        raise ProbeError("compiling %s failed: %s" % (path.name, e)) from e


def _prog_type(kind: str):
    BPF = _bcc()
    return {"kprobe": BPF.KPROBE, "tracepoint": BPF.TRACEPOINT,
            "raw_tracepoint": BPF.RAW_TRACEPOINT}[kind]


def compiled_programs(mode: str, skipped: dict[str, str]) -> list[Prog]:
    """The programs of a set that build_cflags() leaves in, given its
    ``skipped``: a tracepoint program it compiles out is not in the object;
    each C function once (one may serve several targets)."""
    out: list[Prog] = []
    for p in programs(mode):
        if any(q.name == p.name for q in out) or (p.kind == "tracepoint" and p.target in skipped):
            continue
        out.append(p)
    return out


def load_only(mode: str, prefix4: int = 32, prefix6: int = 64) -> list[str]:
    """Compile the set of ``mode`` and load every program into the kernel
    (which runs the verifier) without attaching anything. Returns the names
    of the loaded programs; raises ProbeError if one fails to load."""
    cflags, skipped = build_cflags(mode, prefix4, prefix6)
    b = _compile(cflags)
    try:
        names = []
        for p in compiled_programs(mode, skipped):
            try:
                b.load_func(p.name.encode(), _prog_type(p.kind))
            except Exception as e:
                raise ProbeError("loading %s failed: %s" % (p.name, e)) from e
            names.append(p.name)
        return names
    finally:
        b.cleanup()


def _fmt_addr(family: int, addr: bytes) -> str:
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, addr[:4])
    return str(ipaddress.IPv6Address(addr[:16]))


class ProbeSet:
    """An attached probe set and its two count maps."""

    def __init__(self, bpf, mode: str, prefix4: int, prefix6: int,
                 attached: list[Prog], skipped: dict[str, str]):
        self.bpf = bpf
        self.mode = mode
        self.prefix4 = prefix4
        self.prefix6 = prefix6
        self.attached = list(attached)
        self.skipped = dict(skipped)
        fed = {p.counter for p in attached}
        # Which public counters this set can measure on this kernel.
        self.supported = {
            "syns": "syns" in fed,
            "handshakes": "handshakes" in fed,
            "synack_retrans": "synack_retrans" in fed,
            "rst_sent": "rst_sent" in fed,
            "rst_recv": "rst_recv" in fed,
            "resets": "rst_sent" in fed or "rst_recv" in fed,
        }
        src = bpf[SRC_MAP]
        self._leaf_type = getattr(src, "sLeaf", None) or src.Leaf
        self._fields = [f[0] for f in self._leaf_type._fields_]
        # The batch reader sums a flat u64 view: only if the leaf is
        # nothing but u64 counters (as probes.h declares it).
        self._batch_ok = (
            all(f[1] in (ct.c_uint64, ct.c_ulonglong) for f in self._leaf_type._fields_)
            and ct.sizeof(self._leaf_type) == 8 * len(self._fields)
            and ct.sizeof(src.Leaf) == ct.sizeof(self._leaf_type) * src.total_cpu)
        self._idle_ref: dict[bytes, dict[bytes, tuple]] = {}
        self._closed = False

    # ---- opening --------------------------------------------------------

    @classmethod
    def open(cls, mode: str = "auto", prefix4: int = 32, prefix6: int = 64,
             src_entries: int = DEFAULT_SRC_ENTRIES,
             dst_entries: int = DEFAULT_DST_ENTRIES) -> "ProbeSet":
        """Compile and attach a probe set.

        mode "auto" uses kprobes when the kernel has them (detected at run
        time) and falls back to tracepoints, also when attaching kprobes
        fails; "kprobe" / "tracepoint" force a set (ProbeError if it cannot
        be attached).
        """
        if mode == "auto":
            if detect.kprobes_available():
                try:
                    return cls._open("kprobe", prefix4, prefix6, src_entries, dst_entries)
                except ProbeError:
                    if not detect.tracepoints_available():
                        raise
            return cls._open("tracepoint", prefix4, prefix6, src_entries, dst_entries)
        programs(mode)
        return cls._open(mode, prefix4, prefix6, src_entries, dst_entries)

    @classmethod
    def _open(cls, mode, prefix4, prefix6, src_entries, dst_entries) -> "ProbeSet":
        if mode == "kprobe" and not detect.kprobes_available():
            raise ProbeError("kprobes are not available on this kernel")
        if mode == "tracepoint" and not detect.tracepoints_available():
            raise ProbeError("tracepoints are not available on this kernel")
        cflags, skipped = build_cflags(mode, prefix4, prefix6, src_entries, dst_entries)
        b = _compile(cflags)
        attached: list[Prog] = []
        try:
            for p in programs(mode):
                if p.target in skipped:
                    continue
                try:
                    cls._attach(b, p)
                except Exception as e:
                    if p.required:
                        raise ProbeError("attaching %s to %s failed: %s"
                                         % (p.name, p.target, e)) from e
                    skipped[p.target] = "attach failed: %s" % e
                    continue
                attached.append(p)
        except BaseException:
            b.cleanup()
            raise
        return cls(b, mode, int(prefix4), int(prefix6), attached, skipped)

    @staticmethod
    def _attach(b, p: Prog) -> None:
        name = p.name.encode()
        if p.kind == "kprobe":
            b.attach_kprobe(event=p.target.encode(), fn_name=name)
        elif p.kind == "tracepoint":
            b.attach_tracepoint(tp=p.target.encode(), fn_name=name)
        elif p.kind == "raw_tracepoint":
            b.attach_raw_tracepoint(tp=p.target.encode(), fn_name=name)
        else:  # pragma: no cover
            raise ValueError(p.kind)

    # ---- reading --------------------------------------------------------

    def _read(self, mapname: bytes) -> dict[bytes, tuple]:
        """{raw key bytes: (key, counts summed over CPUs, in Leaf field order)}."""
        table = self.bpf[mapname]
        if self._batch_ok:
            try:
                return self._read_batch(table)
            except OSError:
                self._batch_ok = False
        return self._read_iter(table)

    def _read_iter(self, table) -> dict[bytes, tuple]:
        out = {}
        nf = len(self._fields)
        for key, percpu in table.items():
            sums = [0] * nf
            for v in percpu:
                for i, f in enumerate(self._fields):
                    sums[i] += getattr(v, f)
            raw = bytes(key)
            out[raw] = (type(key).from_buffer_copy(raw), tuple(sums))
        return out

    def _read_batch(self, table, chunk: int = 1024) -> dict[bytes, tuple]:
        """BPF_MAP_LOOKUP_BATCH in chunks; the per-CPU values (bcc's Leaf:
        sLeaf * ncpus, all-u64 fields, checked in __init__) are summed over
        a flat u64 view."""
        from bcc.libbcc import lib

        Key, Leaf = table.Key, table.Leaf
        keys = (Key * chunk)()
        vals = (Leaf * chunk)()
        flat = memoryview(vals).cast("B").cast("Q")
        ksize = ct.sizeof(Key)
        kbytes = memoryview(keys).cast("B")
        nf = len(self._fields)
        per_entry = nf * table.total_cpu
        in_b, out_b, cnt = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        out = {}
        first = True
        # bounded: every round returns >= 1 entry or ends
        for _ in range(table.max_entries + 2):
            cnt.value = chunk
            res = lib.bpf_lookup_batch(table.map_fd, None if first else ct.byref(in_b),
                                       ct.byref(out_b), keys, vals, ct.byref(cnt))
            err = ct.get_errno()
            if res != 0 and err != errno.ENOENT:
                raise OSError(err, "BPF_MAP_LOOKUP_BATCH: %s" % os.strerror(err))
            for i in range(cnt.value):
                raw = bytes(kbytes[i * ksize:(i + 1) * ksize])
                base = i * per_entry
                sums = tuple(sum(flat[base + f:base + per_entry:nf]) for f in range(nf))
                out[raw] = (Key.from_buffer_copy(raw), sums)
            if res != 0 or cnt.value == 0:
                break
            in_b.value = out_b.value
            first = False
        return out

    def _counts(self, sums: tuple) -> dict[str, int]:
        d = dict(zip(self._fields, sums))
        return {
            "syns": d["syns"],
            "handshakes": d["handshakes"],
            "synack_retrans": d["synack_retrans"],
            "resets": d["rst_sent"] + d["rst_recv"],
            "rst_sent": d["rst_sent"],
            "rst_recv": d["rst_recv"],
        }

    def _src_str(self, key) -> str:
        # the kernel stored the address already masked to the prefix
        fam = key.family
        plen = self.prefix4 if fam == AF_INET else self.prefix6
        return "%s/%d" % (_fmt_addr(fam, bytes(key.addr)), plen)

    @staticmethod
    def _dst_str(key) -> str:
        a = _fmt_addr(key.family, bytes(key.addr))
        return ("%s:%d" if key.family == AF_INET else "[%s]:%d") % (a, key.port)

    def snapshot(self) -> dict:
        """Cumulative counts since each entry was created:
        {"sources": {"198.18.0.2/32": counts}, "dests": {"198.18.0.1:80": counts}}
        with counts {"syns", "handshakes", "synack_retrans", "resets",
        "rst_sent", "rst_recv"}; IPv6 destinations are "[addr]:port"."""
        self._check_open()
        out = {"sources": {}, "dests": {}}
        for raw, (key, sums) in self._read(SRC_MAP).items():
            out["sources"][self._src_str(key)] = self._counts(sums)
        for raw, (key, sums) in self._read(DST_MAP).items():
            out["dests"][self._dst_str(key)] = self._counts(sums)
        return out

    @staticmethod
    def rates(prev: dict, cur: dict, seconds: float) -> dict:
        """Per-second rates between two snapshots, same shape as a snapshot.

        An entry absent from ``prev``, or with a counter lower than in
        ``prev`` (deleted by clear_idle() or evicted by the LRU, then
        re-created), counts from zero."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        out = {}
        for section in ("sources", "dests"):
            p_sec = (prev or {}).get(section, {})
            res = {}
            for k, c in cur.get(section, {}).items():
                p = p_sec.get(k)
                if p is None or any(c[n] < p.get(n, 0) for n in c):
                    p = {}
                res[k] = {n: (c[n] - p.get(n, 0)) / seconds for n in c}
            out[section] = res
        return out

    def clear_idle(self, snap: dict | None = None) -> int:
        """Delete the map entries whose counts did not change since the
        previous clear_idle() call (the first call only records); returns
        how many were deleted. Keeps the maps small between LRU evictions.

        If ``snap`` (a snapshot) is given, the deleted entries are also
        removed from it, so that rates(snap, later) counts an entry that is
        re-created afterwards from zero. Events that hit an entry between
        the read and the delete are lost (it was idle for an interval)."""
        self._check_open()
        removed = 0
        for mapname, section, to_str in ((SRC_MAP, "sources", self._src_str),
                                         (DST_MAP, "dests", self._dst_str)):
            table = self.bpf[mapname]
            cur = self._read(mapname)
            ref = self._idle_ref.get(mapname, {})
            keep = {}
            for raw, (key, sums) in cur.items():
                if ref.get(raw) == sums:
                    try:
                        del table[key]
                    except KeyError:
                        pass
                    else:
                        removed += 1
                        if snap is not None:
                            snap.get(section, {}).pop(to_str(key), None)
                    continue
                keep[raw] = sums
            self._idle_ref[mapname] = keep
        return removed

    decay = clear_idle

    # ---- lifetime -------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise ProbeError("probe set is closed")

    def close(self) -> None:
        """Detach every program and free the maps (idempotent)."""
        if not self._closed:
            self._closed = True
            self.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<ProbeSet mode=%s prefix4=%d prefix6=%d programs=%s>" % (
            self.mode, self.prefix4, self.prefix6,
            ["%s@%s" % (p.name, p.target) for p in self.attached])
