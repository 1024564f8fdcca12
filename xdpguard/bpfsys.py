"""Thin ctypes layer over libbpf.so.1 for what bcc does not give us.

bcc compiles and loads; this module pins, opens pins, replaces XDP programs
atomically (XDP_FLAGS_REPLACE), queries attachments, runs BPF_PROG_TEST_RUN
(including live XDP frames), and reads or writes any map by fd, without a
compile. Only the runtime library (Debian's libbpf1) is needed.

Every failure raises OSError with the errno and a message naming the call;
the kernel's netlink error text (extack) is appended when libbpf reports it.
Keys and values are plain bytes: callers pack them (bcc ctypes types,
``struct``).

Struct layouts are those of libbpf 1.1 (``bpf/bpf.h``, ``bpf/libbpf.h``)
and of linux/bpf.h 6.1. Every libbpf opts struct starts with ``sz``: libbpf
reads only the fields that ``sz`` covers, so ``sz`` must be the size of the
struct as *we* define it (a larger ``sz`` with non-zero tail is refused
with EINVAL, by libbpf and by the kernel alike).
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import socket
import struct
import sys
import threading
from contextlib import contextmanager
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
    sizeof,
)
from functools import lru_cache
from typing import Iterator

LIBBPF = "libbpf.so.1"

# XDP attach flags (linux/if_link.h).
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_FLAGS_HW_MODE = 8
XDP_FLAGS_REPLACE = 16
XDP_FLAGS_MODES = XDP_FLAGS_SKB_MODE | XDP_FLAGS_DRV_MODE | XDP_FLAGS_HW_MODE

# XDP actions (program return values).
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4

# BPF_PROG_TEST_RUN flags.
BPF_F_TEST_XDP_LIVE_FRAMES = 2

# Map update flags.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# Map types (the ones xdpguard uses) and creation flags.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1  # required for LPM tries
BPF_F_MMAPABLE = 1 << 10

PERCPU_MAP_TYPES = frozenset(
    {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
)

BPF_PROG_TYPE_XDP = 6
BPF_OBJ_NAME_LEN = 16

# bpf_xdp_query_opts.attach_mode (XDP_ATTACHED_* in linux/if_link.h).
ATTACH_MODES = {0: "none", 1: "native", 2: "generic", 3: "offload", 4: "multi"}

# Kernel-internal errno that leaks to user space (e.g. batch ops on an LPM
# trie); os.strerror only says "Unknown error 524".
ENOTSUPP = 524


# ---- structs ---------------------------------------------------------------


class _TestRunOpts(Structure):
    """struct bpf_test_run_opts (libbpf 1.1, 80 bytes)."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class _XdpAttachOpts(Structure):
    """struct bpf_xdp_attach_opts (16 bytes: the trailing ``size_t :0`` pads)."""

    _fields_ = [("sz", c_size_t), ("old_prog_fd", c_int)]


class _XdpQueryOpts(Structure):
    """struct bpf_xdp_query_opts of libbpf 1.1: no feature_flags yet (1.2+)."""

    _fields_ = [
        ("sz", c_size_t),
        ("prog_id", c_uint32),
        ("drv_prog_id", c_uint32),
        ("hw_prog_id", c_uint32),
        ("skb_prog_id", c_uint32),
        ("attach_mode", c_uint8),
    ]


class _MapBatchOpts(Structure):
    """struct bpf_map_batch_opts."""

    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class _MapCreateOpts(Structure):
    """struct bpf_map_create_opts (libbpf 1.1, 48 bytes)."""

    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


class _ProgInfo(Structure):
    """struct bpf_prog_info as in linux/bpf.h 6.1 (232 bytes).

    Newer kernels have a longer struct; they copy only info_len bytes.
    """

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32, 1),
        ("_pad0", c_uint32, 31),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad1", c_uint32),
    ]


class _MapInfo(Structure):
    """struct bpf_map_info as in linux/bpf.h 6.1 (88 bytes)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad0", c_uint32),
        ("map_extra", c_uint64),
    ]


# struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
# egress_ifindex.
_XDP_MD = struct.Struct("=6I")

# Checked against gcc on the libbpf 1.1 / linux 6.1 headers.
assert sizeof(_TestRunOpts) == 80 and sizeof(_XdpAttachOpts) == 16
assert sizeof(_XdpQueryOpts) == 32 and sizeof(_MapBatchOpts) == 24
assert sizeof(_MapCreateOpts) == 48
assert sizeof(_ProgInfo) == 232 and sizeof(_MapInfo) == 88

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

# name -> (restype, argtypes). Pointers are c_void_p so that bytes, ctypes
# buffers, byref() and None all pass.
_PROTOTYPES = {
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_prog_test_run_opts": (c_int, [c_int, c_void_p]),
    "bpf_prog_load": (c_int, [c_int, c_char_p, c_char_p, c_void_p, c_size_t, c_void_p]),
    "bpf_xdp_attach": (c_int, [c_int, c_int, c_uint32, c_void_p]),
    "bpf_xdp_query": (c_int, [c_int, c_int, c_void_p]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_btf_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, POINTER(c_uint32)]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, POINTER(c_uint32), c_void_p],
    ),
    "bpf_map_update_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, POINTER(c_uint32), c_void_p],
    ),
    "bpf_map_delete_batch": (c_int, [c_int, c_void_p, POINTER(c_uint32), c_void_p]),
    "bpf_map_create": (
        c_int,
        [c_int, c_char_p, c_uint32, c_uint32, c_uint32, c_void_p],
    ),
    "libbpf_num_possible_cpus": (c_int, []),
    "ring_buffer__new": (c_void_p, [c_int, c_void_p, c_void_p, c_void_p]),
    "ring_buffer__poll": (c_int, [c_void_p, c_int]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
    "libbpf_set_print": (c_void_p, [c_void_p]),
}


@lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as e:
        raise OSError(
            _errno.ENOENT, f"cannot load {LIBBPF} (install Debian's libbpf1): {e}"
        ) from e
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


# ---- errors and libbpf's messages -----------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc.vsnprintf.restype = c_int
_messages = threading.local()


@_PRINT_FN
def _print_cb(level, fmt, ap):  # pragma: no cover - called from C
    # va_list is passed as a pointer on x86-64 (and aarch64), so vsnprintf can
    # format it here. Warnings only: libbpf's netlink code reports the
    # kernel's extack text ("Kernel error message: ...") at that level.
    if level == 0:
        buf = ctypes.create_string_buffer(1024)
        _libc.vsnprintf(buf, len(buf), fmt, ap)
        msgs = getattr(_messages, "list", None)
        if msgs is not None:
            msgs.append(buf.value.decode(errors="replace").strip())
    return 0


@contextmanager
def _captured() -> Iterator[list[str]]:
    """Collect libbpf warnings (kernel extack) instead of printing them.

    The print hook is process-global and shared with bcc (same libbpf.so.1),
    so it is installed only around our own call and the old one restored.
    """
    lib = _lib()
    msgs: list[str] = []
    _messages.list = msgs
    old = lib.libbpf_set_print(ctypes.cast(_print_cb, c_void_p))
    try:
        yield msgs
    finally:
        lib.libbpf_set_print(old)
        _messages.list = None


def _error(err: int, what: str, msgs: list[str] | None = None) -> OSError:
    text = "ENOTSUPP" if err == ENOTSUPP else os.strerror(err)
    msg = f"{what} failed: {text}"
    kernel = [m.split("Kernel error message:", 1)[-1].strip() for m in msgs or []]
    if kernel:
        msg += " (" + "; ".join(kernel) + ")"
    return OSError(err, msg)


def _check(ret: int, what: str, msgs: list[str] | None = None) -> int:
    # libbpf >= 1.0 returns -errno directly (and sets errno too).
    if ret < 0:
        raise _error(-ret, what, msgs)
    return ret


# ---- fds and pins ----------------------------------------------------------


def close_fd(fd: int | None) -> None:
    """Close fd; None or a negative fd is a no-op."""
    if fd is not None and fd >= 0:
        os.close(fd)


@contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    """``with closing_fd(obj_get(path)) as fd:`` closes fd on exit."""
    try:
        yield fd
    finally:
        close_fd(fd)


def obj_get(path: str) -> int:
    """Open a pinned program or map; returns a new fd."""
    return _check(_lib().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    """Pin fd at path (on bpffs; the parent directory must exist)."""
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin(fd {fd}, {path})")


def prog_name(prog_id: int) -> str:
    """Name of a loaded program by id ("?" when it is gone or unreadable)."""
    try:
        fd = prog_get_fd_by_id(prog_id)
    except OSError:
        return "?"
    try:
        return prog_info(fd)["name"]
    except OSError:
        return "?"
    finally:
        os.close(fd)


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


def map_get_fd_by_id(map_id: int) -> int:
    return _check(_lib().bpf_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id({map_id})")


# ---- object info -----------------------------------------------------------


def _info(fd: int, info: Structure, what: str) -> None:
    size = c_uint32(sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, byref(info), byref(size)), what)


def prog_info(fd: int) -> dict:
    """id, name, tag (hex), type, jited/xlated lengths, map_ids, ... of a program."""
    info = _ProgInfo()
    _info(fd, info, f"prog_info(fd {fd})")
    map_ids: list[int] = []
    if info.nr_map_ids:
        # Second call with a buffer: the kernel fills at most nr_map_ids ids.
        n = info.nr_map_ids
        ids = (c_uint32 * n)()
        info2 = _ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
        _info(fd, info2, f"prog_info(fd {fd})")
        map_ids = list(ids[: min(n, info2.nr_map_ids)])
    return {
        "id": info.id,
        "name": info.name.decode(errors="replace"),
        "tag": bytes(info.tag).hex(),
        "type": info.type,
        "jited_prog_len": info.jited_prog_len,
        "xlated_prog_len": info.xlated_prog_len,
        "load_time": info.load_time,
        "created_by_uid": info.created_by_uid,
        "map_ids": map_ids,
        "ifindex": info.ifindex,
        "gpl_compatible": bool(info.gpl_compatible),
        "btf_id": info.btf_id,
        "run_time_ns": info.run_time_ns,
        "run_cnt": info.run_cnt,
        "verified_insns": info.verified_insns,
    }


def prog_jited_lines(fd: int) -> list[tuple[int, int]]:
    """(address where its JIT code starts, xlated instruction) of each
    line-info record of a program, by address; [] without line info."""
    info = _ProgInfo()
    _info(fd, info, f"prog_info(fd {fd})")
    n, rs = info.nr_line_info, info.line_info_rec_size
    if not n or info.nr_jited_line_info != n or rs < 4:
        return []
    recs = ctypes.create_string_buffer(n * rs)
    addrs = (c_uint64 * n)()
    info2 = _ProgInfo(nr_line_info=n, line_info_rec_size=rs, line_info=ctypes.addressof(recs),
                      nr_jited_line_info=n, jited_line_info_rec_size=8,
                      jited_line_info=ctypes.addressof(addrs))
    _info(fd, info2, f"prog_info(fd {fd})")
    # struct bpf_line_info begins with insn_off.
    insns = [struct.unpack_from("<I", recs.raw, i * rs)[0] for i in range(n)]
    return sorted(zip(list(addrs), insns))


def map_info(fd: int) -> dict:
    """id, name, type, key_size, value_size, max_entries, map_flags of a map."""
    info = _MapInfo()
    _info(fd, info, f"map_info(fd {fd})")
    return {
        "id": info.id,
        "name": info.name.decode(errors="replace"),
        "type": info.type,
        "key_size": info.key_size,
        "value_size": info.value_size,
        "max_entries": info.max_entries,
        "map_flags": info.map_flags,
        "btf_id": info.btf_id,
        "map_extra": info.map_extra,
    }


# ---- test run --------------------------------------------------------------


def xdp_md_ctx(ingress_ifindex: int, rx_queue: int = 0, data_len: int = 0) -> bytes:
    """struct xdp_md bytes for prog_test_run(ctx_in=...).

    ingress_ifindex is resolved in the calling thread's network namespace;
    rx_queue must exist on it (else EINVAL). data_end (data_len) is the
    linear length: 0 lets prog_test_run fill in len(data); a smaller value
    puts the rest into fragments (recent kernels), a larger one is EINVAL.
    """
    return _XDP_MD.pack(0, data_len, 0, ingress_ifindex, rx_queue, 0)


def prog_test_run(
    prog_fd: int,
    data: bytes,
    repeat: int = 1,
    data_out_size: int | None = None,
    ctx_in: bytes | None = None,
    flags: int = 0,
    batch_size: int = 0,
) -> tuple[int, int, bytes]:
    """BPF_PROG_TEST_RUN: returns (retval, average duration ns, data_out).

    data_out_size: output buffer size (default len(data) + 4096; 0 = no
    output). A program whose output is larger fails with ENOSPC.
    With BPF_F_TEST_XDP_LIVE_FRAMES the frames really go out (XDP_TX,
    XDP_REDIRECT) in the *calling thread's* network namespace: the kernel
    forbids data_out there, retval is not reported (0) and data_out is b"".
    """
    live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
    opts = _TestRunOpts(sz=sizeof(_TestRunOpts))
    data = bytes(data)
    inbuf = ctypes.create_string_buffer(data, len(data))
    opts.data_in = ctypes.addressof(inbuf)
    opts.data_size_in = len(data)
    if data_out_size is None:
        data_out_size = 0 if live else len(data) + 4096
    outbuf = None
    if data_out_size:
        # data_size_out 0 would mean "unbounded" to the kernel: never pass a
        # buffer without its size.
        outbuf = ctypes.create_string_buffer(data_out_size)
        opts.data_out = ctypes.addressof(outbuf)
        opts.data_size_out = data_out_size
    ctxbuf = None
    if ctx_in is not None:
        ctx_in = bytes(ctx_in)
        if len(ctx_in) == _XDP_MD.size:
            fields = list(_XDP_MD.unpack(ctx_in))
            if fields[1] == 0:  # data_end must equal the frame length
                fields[1] = len(data)
                ctx_in = _XDP_MD.pack(*fields)
        ctxbuf = ctypes.create_string_buffer(ctx_in, len(ctx_in))
        opts.ctx_in = ctypes.addressof(ctxbuf)
        opts.ctx_size_in = len(ctx_in)
    opts.repeat = repeat
    opts.flags = flags
    opts.batch_size = batch_size
    ret = _lib().bpf_prog_test_run_opts(prog_fd, byref(opts))
    what = f"bpf_prog_test_run(fd {prog_fd}, {len(data)} bytes, flags {flags})"
    if ret == -_errno.ENOSPC and outbuf is not None:
        raise OSError(
            _errno.ENOSPC,
            f"{what} failed: data_out_size {data_out_size} too small, "
            f"the program produced {opts.data_size_out} bytes",
        )
    _check(ret, what)
    out = outbuf.raw[: opts.data_size_out] if outbuf is not None else b""
    return opts.retval, opts.duration, out


class FrameRunner:
    """BPF_PROG_TEST_RUN of one frame at a time, its options and buffer
    made once: prog_test_run makes them per call, which is most of a
    call's time where a caller runs a stream of frames (bench/established.py).
    The frame is edited in place (`frame`, a ctypes buffer) between runs."""

    def __init__(self, prog_fd: int, frame: bytes):
        self.fd = prog_fd
        self.frame = ctypes.create_string_buffer(bytes(frame), len(frame))
        self._opts = _TestRunOpts(sz=sizeof(_TestRunOpts), data_in=ctypes.addressof(self.frame),
                                  data_size_in=len(frame), repeat=1)
        self._run = _lib().bpf_prog_test_run_opts

    def run(self) -> int:
        """The program's return value for the frame as it is now."""
        ret = self._run(self.fd, byref(self._opts))
        if ret:
            _check(ret, f"bpf_prog_test_run(fd {self.fd}, {len(self.frame)} bytes)")
        return self._opts.retval


# r0 = XDP_DROP; exit (BPF_ALU64|BPF_MOV|BPF_K, BPF_JMP|BPF_EXIT).
_DROP_INSNS = struct.pack("<BBhiBBhi", 0xB7, 0, 0, XDP_DROP, 0x95, 0, 0, 0)


@lru_cache(maxsize=None)
def live_frames_refused() -> int | None:
    """None when the kernel runs BPF_F_TEST_XDP_LIVE_FRAMES test runs, else
    the errno it refuses them with (some builds: EPERM).

    Tried, never inferred from the kernel version. The probe program drops
    its one frame, so no device of any namespace sees it. Raises OSError
    when the probe program itself cannot be loaded (no conclusion then).
    """
    insns = ctypes.create_string_buffer(_DROP_INSNS, len(_DROP_INSNS))
    fd = _check(_lib().bpf_prog_load(BPF_PROG_TYPE_XDP, b"xg_live_probe", b"GPL", insns,
                                     len(_DROP_INSNS) // 8, None), "bpf_prog_load(live-frames probe)")
    try:
        # 60 bytes: the shortest Ethernet frame; never leaves the program.
        prog_test_run(fd, bytes(60), flags=BPF_F_TEST_XDP_LIVE_FRAMES)
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)
    return None


# ---- XDP attach / query ----------------------------------------------------


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        raise OSError(
            _errno.ENODEV, f"no interface with ifindex {ifindex} in this network namespace"
        ) from None


def xdp_attach(ifindex: int, prog_fd: int, flags: int = 0, old_prog_fd: int | None = None) -> None:
    """Attach prog_fd as the XDP program of ifindex (netns of the calling thread).

    flags: XDP_FLAGS_* (mode: SKB_MODE / DRV_MODE / HW_MODE; 0 lets the
    kernel choose native if the driver has it). old_prog_fd: atomic replace,
    only if that program is the one attached (XDP_FLAGS_REPLACE is added);
    otherwise EEXIST. prog_fd -1 detaches.
    """
    opts = _XdpAttachOpts(sz=sizeof(_XdpAttachOpts))
    if old_prog_fd is not None:
        if old_prog_fd <= 0:
            # libbpf treats old_prog_fd 0 as "not given".
            raise ValueError(f"old_prog_fd must be a positive fd, not {old_prog_fd}")
        opts.old_prog_fd = old_prog_fd
        flags |= XDP_FLAGS_REPLACE
    name = _ifname(ifindex)
    what = (
        f"bpf_xdp_attach({name} ifindex {ifindex}, prog fd {prog_fd}, "
        f"flags {flags:#x}, old fd {old_prog_fd})"
    )
    with _captured() as msgs:
        ret = _lib().bpf_xdp_attach(ifindex, prog_fd, flags, byref(opts))
    _check(ret, what, msgs)


_MODE_FLAGS = {
    "native": XDP_FLAGS_DRV_MODE,
    "generic": XDP_FLAGS_SKB_MODE,
    "offload": XDP_FLAGS_HW_MODE,
}


def xdp_detach(ifindex: int, flags: int = 0, old_prog_fd: int | None = None) -> None:
    """Detach the XDP program of ifindex (attach fd -1).

    The kernel detaches only in the mode the flags name (no mode flag:
    native if the driver has it) and silently does nothing in a mode
    without a program. So without a mode flag the attached mode is looked
    up first. old_prog_fd: only if that program is attached (else EEXIST).
    """
    if not flags & XDP_FLAGS_MODES:
        flags |= _MODE_FLAGS.get(xdp_query(ifindex)["attach_mode"], 0)
    xdp_attach(ifindex, -1, flags, old_prog_fd)


def xdp_query(ifindex: int) -> dict:
    """XDP attachment of ifindex: prog_id, attach_mode, drv/skb/hw_prog_id."""
    name = _ifname(ifindex)
    opts = _XdpQueryOpts(sz=sizeof(_XdpQueryOpts))
    with _captured() as msgs:
        ret = _lib().bpf_xdp_query(ifindex, 0, byref(opts))
    _check(ret, f"bpf_xdp_query({name} ifindex {ifindex})", msgs)
    return {
        "prog_id": opts.prog_id,
        "attach_mode": ATTACH_MODES.get(opts.attach_mode, str(opts.attach_mode)),
        "drv_prog_id": opts.drv_prog_id,
        "skb_prog_id": opts.skb_prog_id,
        "hw_prog_id": opts.hw_prog_id,
    }


# ---- maps ------------------------------------------------------------------


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0,
    inner_map_fd: int = 0, btf: tuple[int, int, int] | None = None,
) -> int:
    """Create a map; returns its fd. name: up to 15 of [A-Za-z0-9_.].
    inner_map_fd: the template of a map of maps' inner maps; btf: (btf fd,
    key type id, value type id) to describe key and value."""
    opts = _MapCreateOpts(sz=sizeof(_MapCreateOpts), map_flags=flags, inner_map_fd=inner_map_fd)
    if btf is not None:
        opts.btf_fd, opts.btf_key_type_id, opts.btf_value_type_id = btf
    ret = _lib().bpf_map_create(
        map_type, name.encode(), key_size, value_size, max_entries, byref(opts)
    )
    return _check(
        ret,
        f"bpf_map_create(type {map_type}, {name!r}, key {key_size}, value {value_size}, "
        f"max {max_entries}, flags {flags:#x})",
    )


def map_create_like(template_fd: int, name: str, max_entries: int) -> int:
    """A new map shaped as an inner-map template: same type, key, value,
    flags and BTF, its own size. Inner maps must carry the template's BTF:
    kernels before 6.2 compare the spin-lock and timer offsets that BTF
    sets (-ENOENT with BTF, -EINVAL without), so a trie without BTF is
    refused (EINVAL) in a template bcc made with BTF."""
    info = _MapInfo()
    _info(template_fd, info, f"map_info(fd {template_fd})")
    btf_fd = None
    try:
        if info.btf_id:
            btf_fd = _check(_lib().bpf_btf_get_fd_by_id(info.btf_id),
                            f"bpf_btf_get_fd_by_id({info.btf_id})")
        btf = (btf_fd, info.btf_key_type_id, info.btf_value_type_id) if btf_fd else None
        return map_create(info.type, name, info.key_size, info.value_size, max_entries,
                          info.map_flags, btf=btf)
    finally:
        close_fd(btf_fd)


def inner_map_fd(outer_fd: int, index: int) -> int | None:
    """An fd of the map in slot `index` of an array of maps, or None when
    the slot is empty. The caller closes it."""
    raw = map_lookup(outer_fd, index.to_bytes(4, sys.byteorder), 4)
    return map_get_fd_by_id(int.from_bytes(raw, sys.byteorder)) if raw else None


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Value of key, or None if absent. Per-CPU maps: percpu_value_size()."""
    buf = ctypes.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, bytes(key), buf)
    if ret == -_errno.ENOENT:
        return None
    _check(ret, f"bpf_map_lookup_elem(map fd {fd})")
    return buf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(
        _lib().bpf_map_update_elem(fd, bytes(key), bytes(value), flags),
        f"bpf_map_update_elem(map fd {fd}, flags {flags})",
    )


def map_delete(fd: int, key: bytes) -> bool:
    """Delete key; False if it was absent. Arrays refuse with EINVAL."""
    ret = _lib().bpf_map_delete_elem(fd, bytes(key))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, f"bpf_map_delete_elem(map fd {fd})")
    return True


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """Key after key (first key if key is None or absent); None at the end."""
    buf = ctypes.create_string_buffer(key_size)
    ret = _lib().bpf_map_get_next_key(fd, None if key is None else bytes(key), buf)
    if ret == -_errno.ENOENT:
        return None
    _check(ret, f"bpf_map_get_next_key(map fd {fd})")
    return buf.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Iterate keys with get_next_key (entries may change meanwhile)."""
    key = map_get_next_key(fd, None, key_size)
    while key is not None:
        yield key
        key = map_get_next_key(fd, key, key_size)


def _batch_opts(elem_flags: int = 0) -> _MapBatchOpts:
    return _MapBatchOpts(sz=sizeof(_MapBatchOpts), elem_flags=elem_flags, flags=0)


def map_update_batch(
    fd: int, keys: bytes, values: bytes, count: int, elem_flags: int = BPF_ANY
) -> int:
    """BPF_MAP_UPDATE_BATCH: count keys and values, concatenated.

    Always BPF_ANY: elem_flags may only be 0 or BPF_F_LOCK (the kernel
    refuses BPF_NOEXIST / BPF_EXIST here with EINVAL). Returns count.
    On failure the OSError carries the kernel's ``.count``: the elements
    done before the error, or the input count unchanged if the kernel
    refused the call before starting (EINVAL, EFAULT).
    """
    n = c_uint32(count)
    opts = _batch_opts(elem_flags)
    ret = _lib().bpf_map_update_batch(fd, bytes(keys), bytes(values), byref(n), byref(opts))
    if ret < 0:
        e = _error(-ret, f"bpf_map_update_batch(map fd {fd}, {count} elements)")
        e.count = n.value
        raise e
    return n.value


def map_update_many(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """map_update_batch, or one update per element where the map type
    has no batch operations (LPM tries on some kernels)."""
    if not count:
        return
    try:
        map_update_batch(fd, keys, values, count)
    except OSError as e:
        if e.errno not in (_errno.EINVAL, _errno.EOPNOTSUPP, ENOTSUPP):
            raise
        ks, vs = len(keys) // count, len(values) // count
        for i in range(count):
            map_update(fd, keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])


def map_delete_batch(fd: int, keys: bytes, count: int) -> int:
    """BPF_MAP_DELETE_BATCH; a missing key stops it with ENOENT, ``.count``
    on the OSError as in map_update_batch. Arrays refuse (EINVAL)."""
    n = c_uint32(count)
    ret = _lib().bpf_map_delete_batch(fd, bytes(keys), byref(n), byref(_batch_opts()))
    if ret < 0:
        e = _error(-ret, f"bpf_map_delete_batch(map fd {fd}, {count} elements)")
        e.count = n.value
        raise e
    return n.value


def map_lookup_batch(
    fd: int, key_size: int, value_size: int, count: int, in_batch: bytes | None = None
) -> tuple[bytes, bytes, int, bytes | None]:
    """One BPF_MAP_LOOKUP_BATCH step: up to count elements after in_batch.

    Returns (keys, values, n, next_batch); next_batch is None when the map
    is exhausted (the kernel's ENOENT). value_size of a per-CPU map:
    percpu_value_size(). A hash bucket larger than count fails with ENOSPC.
    """
    keys = ctypes.create_string_buffer(key_size * count)
    values = ctypes.create_string_buffer(value_size * count)
    # The batch token is a u32 for hashes and a key for other maps.
    token_size = max(key_size, 8)
    out_batch = ctypes.create_string_buffer(token_size)
    in_buf = None
    if in_batch is not None:
        in_buf = ctypes.create_string_buffer(bytes(in_batch), token_size)
    n = c_uint32(count)
    opts = _batch_opts()
    ret = _lib().bpf_map_lookup_batch(fd, in_buf, out_batch, keys, values, byref(n), byref(opts))
    done = ret == -_errno.ENOENT
    if ret < 0 and not done:
        e = _error(-ret, f"bpf_map_lookup_batch(map fd {fd}, {count} elements)")
        e.count = n.value
        raise e
    got = n.value
    return (
        keys.raw[: got * key_size],
        values.raw[: got * value_size],
        got,
        None if done else out_batch.raw,
    )


def map_dump_batch(
    fd: int, key_size: int, value_size: int, chunk: int = 256
) -> tuple[bytes, bytes, int]:
    """Every key and value with lookup_batch, growing chunk on ENOSPC:
    (keys, values, n), each buffer the n entries back to back."""
    keys_out, values_out, total = [], [], 0
    token = None
    while True:
        try:
            keys, values, n, token = map_lookup_batch(fd, key_size, value_size, chunk, token)
        except OSError as e:
            if e.errno == _errno.ENOSPC and chunk < (1 << 20):
                chunk *= 2
                continue
            raise
        keys_out.append(keys)
        values_out.append(values)
        total += n
        if token is None:
            return b"".join(keys_out), b"".join(values_out), total


def map_items_batch(
    fd: int, key_size: int, value_size: int, chunk: int = 256
) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs with lookup_batch, growing chunk on ENOSPC."""
    keys, values, n = map_dump_batch(fd, key_size, value_size, chunk)
    return [(keys[i * key_size : (i + 1) * key_size], values[i * value_size : (i + 1) * value_size])
            for i in range(n)]


# ---- per-CPU values --------------------------------------------------------


@lru_cache(maxsize=None)
def num_possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus()")


def percpu_value_size(value_size: int) -> int:
    """Buffer size of one per-CPU map value: each CPU's copy is rounded up
    to 8 bytes by the kernel, for every *possible* CPU."""
    return ((value_size + 7) & ~7) * num_possible_cpus()


def percpu_split(buf: bytes, value_size: int) -> list[bytes]:
    """Per-CPU value buffer -> one value_size bytes value per possible CPU."""
    stride = (value_size + 7) & ~7
    return [buf[i * stride : i * stride + value_size] for i in range(len(buf) // stride)]


def percpu_join(values: list[bytes], value_size: int) -> bytes:
    """Values (one per possible CPU) -> buffer for map_update on a per-CPU map."""
    if len(values) != num_possible_cpus():
        raise ValueError(f"{len(values)} values for {num_possible_cpus()} possible CPUs")
    stride = (value_size + 7) & ~7
    return b"".join(bytes(v).ljust(stride, b"\0") for v in values)


# ---- ring buffers ----------------------------------------------------------

_RB_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


class RingBuffer:
    """A BPF ring buffer map read with libbpf's ring_buffer__poll.

    callback(bytes) gets each record; it must not raise (errors are kept
    and re-raised from poll())."""

    def __init__(self, map_fd: int, callback):
        self._error = None

        def _cb(_ctx, data, size):
            try:
                callback(ctypes.string_at(data, size))
            except BaseException as e:  # surfaced from poll()
                self._error = e
                return -1
            return 0

        self._fn = _RB_SAMPLE_FN(_cb)   # keep a reference while C holds it
        self._rb = _lib().ring_buffer__new(map_fd, ctypes.cast(self._fn, c_void_p), None, None)
        if not self._rb:
            err = ctypes.get_errno() or _errno.EINVAL
            raise _error(err, f"ring_buffer__new(map fd {map_fd})")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were read."""
        n = _lib().ring_buffer__poll(self._rb, timeout_ms)
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        if n < 0 and n != -_errno.EINTR:
            raise _error(-n, "ring_buffer__poll")
        return max(n, 0)

    def consume(self) -> int:
        n = _lib().ring_buffer__consume(self._rb)
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        return max(n, 0)

    def close(self) -> None:
        if self._rb:
            _lib().ring_buffer__free(self._rb)
            self._rb = None
