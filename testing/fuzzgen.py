"""Random and damaged Ethernet frames for the fuzz tests (tests/test_fuzz.py,
tests/test_packet.py): test tooling, so outside the product package. The
frames carry the MAC addresses ``packet.build`` puts in.
"""
from __future__ import annotations

import functools
import ipaddress
import struct
from ipaddress import IPv4Address, IPv6Address

from xdpguard.packet import (_MACS, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6,
                             IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_EXT_FRAGMENT)

__all__ = ["mutate", "random_frame"]

ETH_P_ARP = 0x0806

_P16 = struct.Struct("!H").pack
_P32 = struct.Struct("!HH").pack
_IP4 = struct.Struct("!BBHHHBBH4s4s").pack
_IP6 = struct.Struct("!IHBB16s16s").pack
_TCP = struct.Struct("!HHIIBBHHH").pack
_UDP = struct.Struct("!HHHH").pack
_FRAG6 = struct.Struct("!BBHI").pack

_ADDR4 = tuple(IPv4Address(a).packed for a in (
    "192.0.2.1", "192.0.2.200", "198.51.100.1", "198.51.100.77", "203.0.113.7",
    "10.0.0.1", "10.255.255.255", "172.16.5.4", "127.0.0.1", "0.0.0.0", "255.255.255.255"))
_ADDR6 = tuple(IPv6Address(a).packed for a in (
    "2001:db8::1", "2001:db8::2", "2001:db8:1::1", "2001:db8:ffff::1", "fe80::1",
    "fe80::2", "::1", "::", "ff02::1", "ff02::1:ff00:1", "fd00::1"))
_PORTS = (0, 1, 22, 25, 53, 80, 123, 443, 1023, 1024, 3306, 8080, 40000, 65535)
_TCP_FLAGS = (0x02, 0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x03, 0x06, 0x00, 0xFF, 0x16, 0x42, 0xC2)
_ICMP_TYPES = (0, 8, 3, 11, 5, 13)
_ICMP6_TYPES = (128, 129, 133, 134, 135, 136, 137, 132, 138, 1, 2, 3, 4, 143)
_OTHER_PROTOS = (47, 50, 51, 59, 0, 43, 44, 60, 132, 4, 41, 89, 255)
_MUT_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x40, 0x45, 0x46, 0x4F, 0x44, 0x60, 0x65, 0x06, 0x11,
              0x01, 0x3A, 0x2C, 0x2B, 0x3C, 0x3B, 0x32, 0x33, 0x81, 0x88, 0x86, 0xDD, 0x08,
              0x02, 0x12, 0x10, 0x85, 0x89)
_ETHERTYPES = (ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, ETH_P_ARP, 0x88CC, 0x0000,
               0xFFFF, 0x0801, 0x86DC)
_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)


@functools.lru_cache(maxsize=64)
def _pools(addresses: tuple) -> tuple:
    """Address pools: per family a tuple of (network int, host bits)."""
    p4, p6 = [], []
    for a in addresses:
        net = ipaddress.ip_network(a, strict=False) if not isinstance(a, (IPv4Address, IPv6Address)) \
            else ipaddress.ip_network(a)
        (p4 if net.version == 4 else p6).append(
            (int(net.network_address), net.max_prefixlen - net.prefixlen))
    return tuple(p4), tuple(p6)


def _addr(rng, family: int, pool) -> bytes:
    r = rng.random()
    if pool and r < 0.5:
        base, hb = pool[rng.randrange(len(pool))]
        v = base | (rng.getrandbits(hb) if hb else 0)
        return v.to_bytes(4 if family == 4 else 16, "big")
    fixed = _ADDR4 if family == 4 else _ADDR6
    if r < 0.8:
        return fixed[rng.randrange(len(fixed))]
    return rng.randbytes(4 if family == 4 else 16)


def _port_rand(rng) -> int:
    return _PORTS[rng.randrange(len(_PORTS))] if rng.random() < 0.7 else rng.getrandbits(16)


def _l4_rand(rng, proto: int, nonfirst: bool) -> bytes:
    if nonfirst:
        return rng.randbytes(rng.randrange(25))
    tail = rng.randbytes(rng.randrange(17)) if rng.random() < 0.3 else b""
    if proto == IPPROTO_TCP:
        flags = _TCP_FLAGS[rng.randrange(len(_TCP_FLAGS))] if rng.random() < 0.9 else rng.getrandbits(8)
        return _TCP(_port_rand(rng), _port_rand(rng), 1, 0, 0x50, flags, 1024, 0, 0) + tail
    if proto == IPPROTO_UDP:
        return _UDP(_port_rand(rng), _port_rand(rng), 8 + len(tail), 0) + tail
    if proto == IPPROTO_ICMP:
        return bytes((_ICMP_TYPES[rng.randrange(len(_ICMP_TYPES))], 0, 0, 0, 0, 1, 0, 1)) + tail
    if proto == IPPROTO_ICMPV6:
        t = _ICMP6_TYPES[rng.randrange(len(_ICMP6_TYPES))] if rng.random() < 0.9 else rng.getrandbits(8)
        return bytes((t, 0, 0, 0, 0, 0, 0, 0)) + tail
    return rng.randbytes(rng.randrange(25))


def _proto_rand(rng) -> int:
    r = rng.random()
    if r < 0.35:
        return IPPROTO_TCP
    if r < 0.6:
        return IPPROTO_UDP
    if r < 0.7:
        return IPPROTO_ICMP
    if r < 0.85:
        return IPPROTO_ICMPV6
    if r < 0.95:
        return _OTHER_PROTOS[rng.randrange(len(_OTHER_PROTOS))]
    return rng.getrandbits(8)


def _ipv4_rand(rng, pool) -> bytes:
    r = rng.random()
    ihl = 5 if r < 0.8 else rng.randrange(5, 16) if r < 0.97 else rng.randrange(5)
    r = rng.random()
    if r < 0.75:
        fw = 0x4000 if r < 0.4 else 0                 # DF or nothing
    elif r < 0.85:
        fw = 0x2000                                   # first fragment, MF
    elif r < 0.95:
        fw = rng.randrange(1, 0x2000) | (0x2000 if rng.random() < 0.5 else 0)
    else:
        fw = rng.getrandbits(16)
    proto = _proto_rand(rng)
    seg = _l4_rand(rng, proto, fw & 0x1FFF != 0)
    hlen = ihl * 4
    return _IP4(0x40 | ihl, 0, hlen + len(seg), rng.getrandbits(16), fw, 64, proto, 0,
                _addr(rng, 4, pool), _addr(rng, 4, pool)) + rng.randbytes(max(0, hlen - 20)) + seg


def _ipv6_rand(rng, pool) -> bytes:
    r = rng.random()
    nexts = 0 if r < 0.5 else rng.randrange(1, 5) if r < 0.8 else rng.randrange(5, 9)
    kinds = []
    nonfirst = False
    for _ in range(nexts):
        k = (0, 43, 60, 44)[rng.randrange(4)]
        kinds.append(k)
    proto = _proto_rand(rng)
    parts = []
    nh = proto
    for k in reversed(kinds):
        if k == IPV6_EXT_FRAGMENT:
            off = 0 if rng.random() < 0.6 else rng.randrange(1, 8192)
            # low 3 bits: 2 reserved bits and M, all ignored by the parser
            parts.append(_FRAG6(nh, 0, (off << 3) | rng.getrandbits(3), rng.getrandbits(32)))
            nonfirst = nonfirst or off != 0
        else:
            r = rng.random()
            hl = 0 if r < 0.7 else rng.randrange(1, 4) if r < 0.97 else rng.getrandbits(8)
            parts.append(bytes((nh, hl)) + rng.randbytes(hl * 8 + 6))
        nh = k
    parts.reverse()
    seg = _l4_rand(rng, proto, nonfirst)
    chain = b"".join(parts)
    return _IP6(0x60000000, len(chain) + len(seg), nh, 64,
                _addr(rng, 6, pool), _addr(rng, 6, pool)) + chain + seg


def _l3_offset(frame) -> int:
    """Offset of the L3 header (after up to 3 tags), or -1 if too short."""
    off = 12
    for _ in range(4):
        if off + 2 > len(frame):
            return -1
        et = frame[off] << 8 | frame[off + 1]
        if et != ETH_P_8021Q and et != ETH_P_8021AD:
            return off + 2
        off += 4
    return off + 2


def mutate(rng, frame: bytes) -> bytes:
    """One random damaging change to a frame (for fuzzing)."""
    n = len(frame)
    if n == 0:
        return rng.randbytes(rng.randrange(1, 64))
    op = rng.randrange(12)
    if op <= 2:                                       # truncate at any length
        return frame[:rng.randrange(n + 1)]
    b = bytearray(frame)
    if op == 3:                                       # bit flips in the headers
        lim = min(n, 100)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(lim)] ^= 1 << rng.randrange(8)
    elif op == 4:                                     # interesting byte in the headers
        b[rng.randrange(min(n, 100))] = _MUT_BYTES[rng.randrange(len(_MUT_BYTES))]
    elif op == 5:                                     # version / IHL nibbles
        l3 = _l3_offset(b)
        if 0 <= l3 < n:
            r = rng.random()
            if r < 0.4:
                b[l3] = (b[l3] & 0xF0) | rng.randrange(16)
            elif r < 0.8:
                b[l3] = (rng.randrange(16) << 4) | (b[l3] & 0x0F)
            else:
                b[l3] = rng.getrandbits(8)
    elif op == 6:                                     # ethertype / inner ethertype
        l3 = _l3_offset(b)
        at = l3 - 2 if l3 > 0 else 12
        if at + 2 <= n:
            b[at:at + 2] = _P16(_ETHERTYPES[rng.randrange(len(_ETHERTYPES))])
    elif op == 7:                                     # add a VLAN tag
        return frame[:12] + _P32(_TPIDS[rng.getrandbits(1)], rng.getrandbits(16)) + frame[12:]
    elif op == 8:                                     # remove the outer VLAN tag
        if n >= 16 and (frame[12] << 8 | frame[13]) in _TPIDS:
            return frame[:12] + frame[16:]
        b[rng.randrange(n)] = rng.getrandbits(8)
    elif op == 9:                                     # fragment / next header fields
        l3 = _l3_offset(b)
        if 0 <= l3 and l3 + 10 <= n:
            if b[l3] >> 4 == 6:
                b[l3 + 6] = (0, 43, 60, 44, 6, 17, 58, 59, 1)[rng.randrange(9)]
            else:
                b[l3 + 6:l3 + 8] = _P16(rng.getrandbits(16) if rng.random() < 0.5
                                        else rng.randrange(1, 0x2000))
        else:
            b[rng.randrange(n)] = rng.getrandbits(8)
    elif op == 10:                                    # random bytes appended or cut
        if rng.random() < 0.5:
            return frame + rng.randbytes(rng.randrange(1, 33))
        return frame[:max(0, n - rng.randrange(1, 9))]
    else:                                             # random byte anywhere
        b[rng.randrange(n)] = rng.getrandbits(8)
    return bytes(b)


def random_frame(rng, addresses: tuple = ()) -> bytes:
    """A random frame for fuzzing: mostly well-formed IPv4/IPv6 frames with
    0..3 VLAN tags, IPv4 options and fragments, IPv6 chains of 0..8
    extension headers, and all L4 classes; a quarter truncated or damaged
    (mutate), a few pure random bytes or non-IP.

    ``addresses`` (a tuple of address / network strings or objects) adds
    pools that half of the addresses are drawn from (a random host in the
    network), so that policy prefixes get hit.
    """
    r = rng.random()
    if r < 0.03:
        return rng.randbytes(rng.randrange(80))
    p4, p6 = _pools(addresses) if addresses else ((), ())
    r = rng.random()
    tags = b""
    if r >= 0.6:
        ntags = 1 if r < 0.8 else 2 if r < 0.95 else 3
        for _ in range(ntags):
            tags += _P32(_TPIDS[rng.getrandbits(1)], rng.getrandbits(16))
    r = rng.random()
    if r < 0.45:
        frame = _MACS + tags + b"\x08\x00" + _ipv4_rand(rng, p4)
    elif r < 0.92:
        frame = _MACS + tags + b"\x86\xdd" + _ipv6_rand(rng, p6)
    elif r < 0.96:
        frame = _MACS + tags + b"\x08\x06" + rng.randbytes(28)
    else:
        frame = _MACS + tags + _P16(_ETHERTYPES[rng.randrange(len(_ETHERTYPES))]) \
            + rng.randbytes(rng.randrange(64))
    r = rng.random()
    if r < 0.12:
        frame = frame[:rng.randrange(len(frame) + 1)]
    elif r < 0.27:
        frame = mutate(rng, frame)
        if r < 0.15:
            frame = mutate(rng, frame)
    return frame
