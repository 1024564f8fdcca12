"""Member offsets of kernel structs, read from the running kernel's BTF.

bcc compiles the probe programs against whatever kernel headers are
installed (here Debian's 6.1 headers under a 6.18 kernel), so
``offsetof(struct sk_buff, head)`` in C may be wrong for the running
kernel. The few raw fields the probes read (``sk_buff.head`` /
``network_header`` / ``transport_header`` and a handful of
``sock_common`` fields) are therefore looked up here, in
``/sys/kernel/btf/vmlinux``, and handed to the C code as ``-D`` flags.

Only what is needed is implemented: the BTF type section is walked once,
structs and unions are indexed by name, and a member is searched through
anonymous struct/union members (``sock_common``'s ``skc_daddr`` sits in an
anonymous struct inside an anonymous union).
"""

from __future__ import annotations

import functools
import os
import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(Exception):
    pass


class BTF:
    """The parsed type section of one BTF blob (only what offsets need)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("bad BTF magic %#x" % magic)
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._types_base = hdr_len + type_off
        self._strs = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._data = data
        # type id -> (kind, name_off, vlen, kflag, size_or_type, extra_offset)
        self._types: list[tuple | None] = [None]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        self._parse(type_len)

    def _name(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _parse(self, type_len: int) -> None:
        data = self._data
        pos = self._types_base
        end = pos + type_len
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = info >> 31
            extra = pos + 12
            if kind == KIND_INT:
                skip = 4
            elif kind in (KIND_PTR, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST,
                          KIND_RESTRICT, KIND_FUNC, KIND_FLOAT, KIND_TYPE_TAG):
                skip = 0
            elif kind == KIND_ARRAY:
                skip = 12
            elif kind in (KIND_STRUCT, KIND_UNION):
                skip = 12 * vlen
            elif kind == KIND_ENUM:
                skip = 8 * vlen
            elif kind == KIND_FUNC_PROTO:
                skip = 8 * vlen
            elif kind == KIND_VAR:
                skip = 4
            elif kind == KIND_DATASEC:
                skip = 12 * vlen
            elif kind == KIND_DECL_TAG:
                skip = 4
            elif kind == KIND_ENUM64:
                skip = 12 * vlen
            else:
                raise BTFError("unknown BTF kind %d" % kind)
            tid = len(self._types)
            self._types.append((kind, name_off, vlen, kflag, size_or_type, extra))
            if kind in (KIND_STRUCT, KIND_UNION) and name_off:
                self._by_name.setdefault((kind, self._name(name_off)), tid)
            pos = extra + skip

    def _resolve(self, tid: int) -> int:
        """Follow typedef/const/volatile/... to the underlying type id."""
        for _ in range(32):
            t = self._types[tid]
            if t is None or t[0] not in _MODIFIERS:
                return tid
            tid = t[4]
        raise BTFError("modifier chain too long")

    def type_size(self, tid: int) -> int:
        tid = self._resolve(tid)
        t = self._types[tid]
        if t is None:
            return 0
        kind = t[0]
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return t[4]
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", self._data, t[5])
            return self.type_size(elem) * nelems
        raise BTFError("no size for BTF kind %d" % kind)

    def _members(self, tid: int):
        kind, _name_off, vlen, kflag, _size, extra = self._types[tid]
        for i in range(vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", self._data, extra + 12 * i)
            if kflag:
                bitfield = m_off >> 24
                bit_off = m_off & 0xFFFFFF
            else:
                bitfield = 0
                bit_off = m_off
            yield m_name, m_type, bit_off, bitfield

    def _find(self, tid: int, member: str, depth: int = 0):
        if depth > 8:
            return None
        for m_name, m_type, bit_off, bitfield in self._members(tid):
            if m_name:
                if self._name(m_name) == member:
                    return bit_off, bitfield, m_type
                continue
            inner = self._resolve(m_type)
            if self._types[inner][0] in (KIND_STRUCT, KIND_UNION):
                found = self._find(inner, member, depth + 1)
                if found is not None:
                    return found[0] + bit_off, found[1], found[2]
        return None

    def member(self, struct_name: str, member: str) -> tuple[int, int]:
        """(byte offset, byte size) of ``struct_name.member``."""
        tid = self._by_name.get((KIND_STRUCT, struct_name)) or self._by_name.get(
            (KIND_UNION, struct_name))
        if tid is None:
            raise BTFError("struct %s not in BTF" % struct_name)
        found = self._find(tid, member)
        if found is None:
            raise BTFError("%s.%s not in BTF" % (struct_name, member))
        bit_off, bitfield, m_type = found
        if bitfield or bit_off % 8:
            raise BTFError("%s.%s is a bitfield" % (struct_name, member))
        return bit_off // 8, self.type_size(m_type)


@functools.lru_cache(maxsize=4)
def load(path: str = VMLINUX_BTF) -> BTF:
    with open(path, "rb") as f:
        return BTF(f.read())


# (macro, struct, member, expected size) of every raw field the probes read.
# Expected sizes guard against a field whose type changed: refuse, never misread.
PROBE_FIELDS = (
    ("XG_OFF_SKB_HEAD", "sk_buff", "head", 8),
    ("XG_OFF_SKB_NETWORK_HEADER", "sk_buff", "network_header", 2),
    ("XG_OFF_SKB_TRANSPORT_HEADER", "sk_buff", "transport_header", 2),
    ("XG_OFF_SKC_DADDR", "sock_common", "skc_daddr", 4),
    ("XG_OFF_SKC_RCV_SADDR", "sock_common", "skc_rcv_saddr", 4),
    ("XG_OFF_SKC_DPORT", "sock_common", "skc_dport", 2),
    ("XG_OFF_SKC_NUM", "sock_common", "skc_num", 2),
    ("XG_OFF_SKC_FAMILY", "sock_common", "skc_family", 2),
    ("XG_OFF_SKC_STATE", "sock_common", "skc_state", 1),
    ("XG_OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr", 16),
    ("XG_OFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr", 16),
)


def probe_offset_cflags(path: str = VMLINUX_BTF) -> list[str]:
    """``-DXG_OFF_...=n`` for every raw field, from the running kernel's BTF.

    Returns [] when there is no BTF: the C code then falls back to
    ``offsetof`` on the installed headers (right only if they match).
    """
    if not os.path.exists(path):
        return []
    btf = load(path)
    flags = []
    for macro, sname, mname, size in PROBE_FIELDS:
        off, got = btf.member(sname, mname)
        if got != size:
            raise BTFError("%s.%s has size %d, expected %d" % (sname, mname, got, size))
        flags.append("-D%s=%d" % (macro, off))
    return flags
