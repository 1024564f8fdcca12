"""Frame parsing exactly as bpf/xdpguard.c parses, plus frame builders.

``parse`` is the Python mirror of the XDP program's parser: every
byte-level decision here is one the C makes too, by the rules in
docs/design.md, "Packet parsing" (the one place they are written down);
the fuzz test pushes random frames through both and compares.
A malformed frame gets its cause (one of MALFORMED: TRUNCATED,
BAD_HEADER, VLANS, EXTHDRS), whose value is the counter slot the program
counts it in.
"""
from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from xdpguard.layout import C

__all__ = [
    "Packet", "Verdict", "NON_IP", "MALFORMED", "TRUNCATED", "BAD_HEADER", "VLANS", "EXTHDRS",
    "parse", "build", "from_fields", "PROTO_NUMBERS", "IPV4_SRC", "IPV6_SRC",
]

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPV6_EXT_HOP = 0
IPV6_EXT_ROUTING = 43
IPV6_EXT_FRAGMENT = 44
IPV6_EXT_DSTOPTS = 60

# The source address in an untagged Ethernet frame (IPv4: without options),
# as build() makes them: for callers that rewrite it in place, one frame
# carrying a stream of sources.
IPV4_SRC = slice(14 + 12, 14 + 16)
IPV6_SRC = slice(14 + 8, 14 + 24)

_MAX_VLANS = C.XG_MAX_VLANS
_MAX_EXTHDRS = C.XG_MAX_EXTHDRS
_L4_OTHER = C.XG_L4_OTHER
_L4_TCP = C.XG_L4_TCP
_L4_TCP_SYN = C.XG_L4_TCP_SYN
_L4_UDP = C.XG_L4_UDP
_L4_ICMP = C.XG_L4_ICMP
_L4_ICMPV6 = C.XG_L4_ICMPV6
_L4_ND = C.XG_L4_ND

# Class of a non-first fragment (and of the port-less protocols) by protocol.
_FRAG_CLASS = {IPPROTO_TCP: _L4_TCP, IPPROTO_UDP: _L4_UDP, IPPROTO_ICMP: _L4_ICMP,
               IPPROTO_ICMPV6: _L4_ICMPV6}
_EXT_LEN_HDRS = (IPV6_EXT_HOP, IPV6_EXT_ROUTING, IPV6_EXT_DSTOPTS)
_EXT_HDRS = frozenset((IPV6_EXT_HOP, IPV6_EXT_ROUTING, IPV6_EXT_DSTOPTS, IPV6_EXT_FRAGMENT))


class Verdict(enum.Enum):
    """Outcome of parse() for frames that never reach the classifier: the
    counter slot the program counts them in."""
    NON_IP = C.XG_NO_SLOT                  # pass, uncounted
    TRUNCATED = C.XG_SLOT_TRUNCATED        # the rest: malformed, dropped
    BAD_HEADER = C.XG_SLOT_BAD_HEADER
    VLANS = C.XG_SLOT_VLANS
    EXTHDRS = C.XG_SLOT_EXTHDRS

    def __repr__(self) -> str:
        return self.name


NON_IP = Verdict.NON_IP
TRUNCATED, BAD_HEADER, VLANS, EXTHDRS = Verdict.TRUNCATED, Verdict.BAD_HEADER, Verdict.VLANS, Verdict.EXTHDRS
MALFORMED = frozenset((TRUNCATED, BAD_HEADER, VLANS, EXTHDRS))


@dataclass(frozen=True)
class Packet:
    family: int                          # 4 or 6
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int                           # IP protocol (IPv6: after the extension headers)
    l4: int                              # XG_L4_*
    sport: int | None                    # None: no ports (see l4 / nonfirst_fragment)
    dport: int | None
    nonfirst_fragment: bool
    vlans: tuple[int, ...]               # VLAN ids, outermost first
    length: int                          # frame length in bytes


# --------------------------------------------------------------------------
# parsing

def parse(frame: bytes) -> Packet | Verdict:
    """Parse an Ethernet frame exactly as the XDP program does."""
    n = len(frame)
    if n < 14:
        return TRUNCATED
    etype = frame[12] << 8 | frame[13]
    off = 14
    vlans: tuple[int, ...] = ()
    while etype == ETH_P_8021Q or etype == ETH_P_8021AD:
        if len(vlans) == _MAX_VLANS:
            return VLANS
        if off + 4 > n:
            return TRUNCATED
        vlans += (((frame[off] << 8) | frame[off + 1]) & 0x0FFF,)
        etype = frame[off + 2] << 8 | frame[off + 3]
        off += 4

    if etype == ETH_P_IP:
        if off + 20 > n:
            return TRUNCATED
        b0 = frame[off]
        ihl = b0 & 0x0F
        if b0 >> 4 != 4 or ihl < 5:
            return BAD_HEADER
        if off + ihl * 4 > n:
            return TRUNCATED
        family = 4
        nonfirst = ((frame[off + 6] << 8) | frame[off + 7]) & 0x1FFF != 0
        proto = frame[off + 9]
        src = IPv4Address(frame[off + 12:off + 16])
        dst = IPv4Address(frame[off + 16:off + 20])
        p = off + ihl * 4
    elif etype == ETH_P_IPV6:
        if off + 40 > n:
            return TRUNCATED
        if frame[off] >> 4 != 6:
            return BAD_HEADER
        family = 6
        nonfirst = False
        proto = frame[off + 6]
        src = IPv6Address(frame[off + 8:off + 24])
        dst = IPv6Address(frame[off + 24:off + 40])
        p = off + 40
        for _ in range(_MAX_EXTHDRS):
            if proto in _EXT_LEN_HDRS:
                if p + 8 > n:
                    return TRUNCATED
                proto, p = frame[p], p + (frame[p + 1] + 1) * 8
            elif proto == IPV6_EXT_FRAGMENT:
                if p + 8 > n:
                    return TRUNCATED
                proto = frame[p]
                if ((frame[p + 2] << 8) | frame[p + 3]) & 0xFFF8:
                    nonfirst = True
                    break
                p += 8
            else:
                break
        else:
            if proto in _EXT_HDRS:
                return EXTHDRS
    else:
        return NON_IP

    sport = dport = None
    if nonfirst:
        l4 = _FRAG_CLASS.get(proto, _L4_OTHER)
    elif proto == IPPROTO_TCP:
        if p + 20 > n:
            return TRUNCATED
        sport = frame[p] << 8 | frame[p + 1]
        dport = frame[p + 2] << 8 | frame[p + 3]
        l4 = _L4_TCP_SYN if frame[p + 13] & 0x12 == 0x02 else _L4_TCP
    elif proto == IPPROTO_UDP:
        if p + 8 > n:
            return TRUNCATED
        sport = frame[p] << 8 | frame[p + 1]
        dport = frame[p + 2] << 8 | frame[p + 3]
        l4 = _L4_UDP
    elif proto == IPPROTO_ICMPV6:
        if p + 1 > n:
            return TRUNCATED
        l4 = _L4_ND if family == 6 and 133 <= frame[p] <= 137 else _L4_ICMPV6
    elif proto == IPPROTO_ICMP:
        l4 = _L4_ICMP
    else:
        l4 = _L4_OTHER
    return Packet(family, src, dst, proto, l4, sport, dport, nonfirst, vlans, n)


# --------------------------------------------------------------------------
# building

PROTO_NUMBERS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP,
                 "icmpv6": IPPROTO_ICMPV6, "ipv6-icmp": IPPROTO_ICMPV6,
                 "gre": 47, "esp": 50, "ah": 51, "sctp": 132}
_TCP_FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10,
                  "urg": 0x20, "ece": 0x40, "cwr": 0x80}
_FLAG_SPLIT = re.compile(r"[\s,+|/-]+")
_MAC_DST = bytes.fromhex("020000000002")
_MAC_SRC = bytes.fromhex("020000000001")
_MACS = _MAC_DST + _MAC_SRC
_EXT_NAMES = {"hop": IPV6_EXT_HOP, "rt": IPV6_EXT_ROUTING, "dst": IPV6_EXT_DSTOPTS,
              "frag": IPV6_EXT_FRAGMENT}


def _ip(value, field: str) -> IPv4Address | IPv6Address:
    if isinstance(value, (IPv4Address, IPv6Address)):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{field}: not an IP address: {value!r}")


def _byte_or_name(field: str, value, what: str, by_name) -> int:
    """A header byte given as a number 0..255 or as a name (`by_name`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 255:
            return value
        raise ValueError(f"{field}: {value} is not in 0..255")
    if isinstance(value, str):
        return by_name(value)
    raise ValueError(f"{field}: not {what}: {value!r}")


def _proto_by_name(proto: str) -> int:
    num = PROTO_NUMBERS.get(proto.strip().lower())
    if num is None:
        raise ValueError(f"proto: unknown protocol {proto!r} (expected one of "
                         f"{', '.join(PROTO_NUMBERS)} or a number)")
    return num


def _flags_by_name(flags: str) -> int:
    s = flags.strip().lower()
    if s in ("synack", "syn_ack"):
        return 0x12
    bits = 0
    for name in filter(None, _FLAG_SPLIT.split(s)):
        if name not in _TCP_FLAG_BITS:
            raise ValueError(f"tcp_flags: unknown flag {name!r} in {flags!r}")
        bits |= _TCP_FLAG_BITS[name]
    return bits


def _proto_number(proto) -> int:
    return _byte_or_name("proto", proto, "a protocol", _proto_by_name)


def _tcp_flag_bits(flags) -> int:
    return 0 if flags is None else _byte_or_name("tcp_flags", flags, "valid", _flags_by_name)


def _port(value, field: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{field}: not a port (0..65535): {value!r}")
    return value


def _byte(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise ValueError(f"{field}: not in 0..255: {value!r}")
    return value


def _csum(data: bytes) -> int:
    """Internet checksum (ones' complement of the ones' complement sum)."""
    if len(data) & 1:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src, dst, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def _with_csum(seg: bytes, at: int, pseudo: bytes, udp: bool = False) -> bytes:
    c = _csum(pseudo + seg)
    if udp and c == 0:
        c = 0xFFFF
    return seg[:at] + struct.pack("!H", c) + seg[at + 2:]


def _opt_pad(n: int) -> bytes:
    """n bytes of IPv6 option padding (Pad1 / PadN)."""
    out = b""
    while n > 0:
        if n == 1:
            out += b"\0"
            n = 0
        else:
            k = min(n - 2, 255)
            out += bytes((1, k)) + bytes(k)
            n -= k + 2
    return out


def _ext_list(exthdrs) -> list[tuple]:
    """Normalise ipv6_exthdrs to [(number, hdrlen)] / [(44, offset, more)]."""
    out = []
    for i, e in enumerate(exthdrs):
        if isinstance(e, str):
            e = (e,)
        if not isinstance(e, (tuple, list)) or not e or e[0] not in _EXT_NAMES:
            raise ValueError(f"ipv6_exthdrs[{i}]: expected ('hop'|'dst'|'rt' [, hdrlen]) "
                             f"or ('frag', offset, more), got {e!r}")
        num = _EXT_NAMES[e[0]]
        if num == IPV6_EXT_FRAGMENT:
            off = e[1] if len(e) > 1 else 0
            more = e[2] if len(e) > 2 else False
            if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < 8192 or len(e) > 3:
                raise ValueError(f"ipv6_exthdrs[{i}]: fragment offset must be 0..8191 (8-byte units)")
            out.append((num, off, bool(more)))
        else:
            hl = e[1] if len(e) > 1 else 0
            if len(e) > 2:
                raise ValueError(f"ipv6_exthdrs[{i}]: too many items in {e!r}")
            out.append((num, _byte(hl, f"ipv6_exthdrs[{i}] hdrlen")))
    return out


def _ext_bytes(e: tuple, nh: int) -> bytes:
    num = e[0]
    if num == IPV6_EXT_FRAGMENT:
        return struct.pack("!BBHI", nh, 0, e[1] << 3 | e[2], 0x12345678)
    size = (e[1] + 1) * 8
    if num == IPV6_EXT_ROUTING:      # type 0, segments left 0: ignored by every node
        return bytes((nh, e[1], 0, 0)) + bytes(size - 4)
    return bytes((nh, e[1])) + _opt_pad(size - 2)


def build(src, dst, proto="tcp", sport=None, dport=None, tcp_flags="syn",
          vlans=(), payload: bytes = b"", icmp_type=None, ipv4_options: bytes = b"",
          ipv6_exthdrs=(), fragment=None) -> bytes:
    """A well-formed Ethernet frame.

    * ``proto``: a name from PROTO_NUMBERS or a number; 6/17/1/58 get a
      TCP (20 bytes) / UDP (8) / ICMP (8) / ICMPv6 (8) header, anything
      else carries ``payload`` only. L4 and IPv4 checksums are correct.
    * ``tcp_flags``: "syn" (default: SYN only), "ack", combinations such as
      "syn,ack", an int, or None (no flags).
    * ``sport``/``dport``: TCP and UDP only (defaults 40000 and 80).
    * ``icmp_type``: ICMP/ICMPv6 only (defaults 8 and 128: echo request).
    * ``vlans``: VLAN ids outermost first; the innermost tag is 802.1Q
      (0x8100), the outer ones 802.1ad (0x88a8). An item may also be a
      (tpid, vid) pair.
    * ``ipv4_options``: raw option bytes, zero-padded to a multiple of 4.
    * ``ipv6_exthdrs``: [("hop",), ("dst",), ("rt",), ("frag", offset, more)],
      in order; hop/dst/rt take an optional hdrlen: ("hop", 2) is 24 bytes.
    * ``fragment``: (offset in 8-byte units, more fragments). For IPv4 it
      goes into the IP header; for IPv6 it appends a fragment header to
      ``ipv6_exthdrs``. A non-first fragment (offset != 0) carries
      ``payload`` only, no L4 header.
    """
    s, d = _ip(src, "src"), _ip(dst, "dst")
    if s.version != d.version:
        raise ValueError(f"dst: {d} is not in the address family of src {s}")
    pnum = _proto_number(proto)
    payload = bytes(payload)

    frag_off, frag_more = 0, False
    if fragment is not None:
        try:
            frag_off, frag_more = fragment
        except (TypeError, ValueError):
            raise ValueError(f"fragment: expected (offset, more_fragments), got {fragment!r}") from None
        if isinstance(frag_off, bool) or not isinstance(frag_off, int) or not 0 <= frag_off < 8192:
            raise ValueError(f"fragment: offset must be 0..8191 (8-byte units), got {frag_off!r}")
        frag_more = bool(frag_more)

    exts = _ext_list(ipv6_exthdrs)
    if s.version == 4:
        if exts:
            raise ValueError("ipv6_exthdrs: only valid for IPv6")
        nonfirst = frag_off != 0
    else:
        if ipv4_options:
            raise ValueError("ipv4_options: only valid for IPv4")
        if fragment is not None:
            exts.append((IPV6_EXT_FRAGMENT, frag_off, frag_more))
        nonfirst = any(e[0] == IPV6_EXT_FRAGMENT and e[1] for e in exts)

    if pnum not in (IPPROTO_TCP, IPPROTO_UDP) and (sport is not None or dport is not None):
        raise ValueError(f"{'sport' if sport is not None else 'dport'}: ports exist only for tcp and udp")
    if pnum not in (IPPROTO_ICMP, IPPROTO_ICMPV6) and icmp_type is not None:
        raise ValueError("icmp_type: only valid for icmp and icmpv6")

    # L4
    if nonfirst:
        seg = payload
    elif pnum == IPPROTO_TCP:
        flags = _tcp_flag_bits(tcp_flags)
        seg = struct.pack("!HHIIBBHHH", _port(sport, "sport", 40000), _port(dport, "dport", 80),
                          1000, 2000 if flags & 0x10 else 0, 5 << 4, flags, 65535, 0, 0) + payload
        seg = _with_csum(seg, 16, _pseudo(s, d, pnum, len(seg)))
    elif pnum == IPPROTO_UDP:
        seg = struct.pack("!HHHH", _port(sport, "sport", 40000), _port(dport, "dport", 80),
                          8 + len(payload), 0) + payload
        if len(seg) > 0xFFFF:
            raise ValueError("payload: too long for UDP")
        seg = _with_csum(seg, 6, _pseudo(s, d, pnum, len(seg)), udp=True)
    elif pnum == IPPROTO_ICMP:
        t = 8 if icmp_type is None else _byte(icmp_type, "icmp_type")
        seg = struct.pack("!BBHHH", t, 0, 0, 1, 1) + payload
        seg = _with_csum(seg, 2, b"")
    elif pnum == IPPROTO_ICMPV6:
        t = 128 if icmp_type is None else _byte(icmp_type, "icmp_type")
        body = struct.pack("!HH", 1, 1) if t in (128, 129) else bytes(4)
        seg = struct.pack("!BBH", t, 0, 0) + body + payload
        seg = _with_csum(seg, 2, _pseudo(s, d, pnum, len(seg)))
    else:
        seg = payload

    # L3
    if s.version == 4:
        opts = bytes(ipv4_options)
        opts += bytes(-len(opts) % 4)
        if len(opts) > 40:
            raise ValueError("ipv4_options: longer than 40 bytes")
        ihl = 5 + len(opts) // 4
        total = ihl * 4 + len(seg)
        if total > 0xFFFF:
            raise ValueError("payload: too long for IPv4")
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1,
                          (0x2000 if frag_more else 0) | frag_off, 64, pnum, 0,
                          s.packed, d.packed) + opts
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        l3, etype = hdr + seg, ETH_P_IP
    else:
        chain = b""
        nh = pnum
        for e in reversed(exts):
            chain = _ext_bytes(e, nh) + chain
            nh = e[0]
        plen = len(chain) + len(seg)
        if plen > 0xFFFF:
            raise ValueError("payload: too long for IPv6")
        l3 = struct.pack("!IHBB16s16s", 0x60000000, plen, nh, 64, s.packed, d.packed) + chain + seg
        etype = ETH_P_IPV6

    # L2
    tags = []
    for i, v in enumerate(vlans):
        if isinstance(v, (tuple, list)):
            tpid, vid = v
        else:
            tpid, vid = (ETH_P_8021Q if i == len(vlans) - 1 else ETH_P_8021AD), v
        if isinstance(vid, bool) or not isinstance(vid, int) or not 0 <= vid <= 0x0FFF:
            raise ValueError(f"vlans[{i}]: VLAN id must be 0..4095, got {vid!r}")
        tags.append((tpid, vid))
    out = _MACS
    for tpid, vid in tags:
        out += struct.pack("!HH", tpid, vid)
    return out + struct.pack("!H", etype) + l3


_FIELDS = ("src", "dst", "proto", "sport", "dport", "tcp_flags", "vlan", "icmp_type")


def from_fields(d: dict) -> bytes:
    """The frame for one JSON packet line of the CLI.

    Keys: src (required), dst (default 198.51.100.1 / 2001:db8::1), proto
    (default "tcp"), sport, dport, tcp_flags ("syn"; absent: an ACK-only
    segment), vlan (list of ids, outermost first), icmp_type. A key whose
    value is null counts as absent. Errors: ValueError naming the field.
    """
    if not isinstance(d, dict):
        raise ValueError(f"packet: expected an object with at least \"src\", got {d!r}")
    for k in d:
        if k not in _FIELDS:
            raise ValueError(f"{k}: unknown field (expected one of {', '.join(_FIELDS)})")
    g = {k: v for k, v in d.items() if v is not None}
    if "src" not in g:
        raise ValueError("src: required")
    for k in ("src", "dst"):
        if k in g and not isinstance(g[k], str):
            raise ValueError(f"{k}: expected an address string, got {g[k]!r}")
    src = _ip(g["src"], "src")
    dst = _ip(g.get("dst", "198.51.100.1" if src.version == 4 else "2001:db8::1"), "dst")
    if dst.version != src.version:
        raise ValueError(f"dst: {dst} is not in the address family of src {src}")
    pnum = _proto_number(g.get("proto", "tcp"))
    for k in ("sport", "dport"):
        if k in g:
            if pnum not in (IPPROTO_TCP, IPPROTO_UDP):
                raise ValueError(f"{k}: ports exist only for proto tcp and udp")
            _port(g[k], k, 0)
    if "tcp_flags" in g:
        if pnum != IPPROTO_TCP:
            raise ValueError("tcp_flags: only valid with proto tcp")
        flags = g["tcp_flags"]
        _tcp_flag_bits(flags)
    else:
        flags = "ack"
    if "icmp_type" in g:
        if pnum not in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            raise ValueError("icmp_type: only valid with proto icmp or icmpv6")
        _byte(g["icmp_type"], "icmp_type")
    vl = g.get("vlan", [])
    if not isinstance(vl, list):
        raise ValueError(f"vlan: expected a list of VLAN ids, got {vl!r}")
    for v in vl:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0x0FFF:
            raise ValueError(f"vlan: VLAN id must be 0..4095, got {v!r}")
    return build(src, dst, pnum, sport=g.get("sport"), dport=g.get("dport"),
                 tcp_flags=flags, vlans=tuple(vl), icmp_type=g.get("icmp_type"))
