"""Addresses and default gateways of the calling thread's network
namespace, from one rtnetlink dump each.

Written out here instead of through pyroute2: importing pyroute2 costs
0.15-0.2 s, and every `apply` (the lockout guard) and every ban needs
these lists, which would make that import a fifth of a re-apply.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct

RTM_GETADDR = 22
RTM_GETROUTE = 26
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
RTA_GATEWAY = 5

_NLMSG = struct.Struct("=IHHII")     # struct nlmsghdr
_RTATTR = struct.Struct("=HH")       # struct rtattr
_IFADDRMSG = struct.Struct("=BBBBI")  # struct ifaddrmsg
_RTMSG = struct.Struct("=BBBBBBBBI")  # struct rtmsg


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(buf: bytes, off: int, end: int):
    while off + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(buf, off)
        if alen < _RTATTR.size:
            break
        yield atype & 0x3FFF, buf[off + _RTATTR.size:off + alen]
        off += _align(alen)


def _dump(msg_type: int, body: bytes):
    """(buffer, offset of the message body, end of the message) for each
    message of one dump request."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        req = _NLMSG.pack(_NLMSG.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
        s.send(req)
        while True:
            buf = s.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(buf):
                mlen, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(buf, off)
                if mlen < _NLMSG.size:
                    return
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, off + _NLMSG.size)[0]
                    if err:
                        raise OSError(err, f"rtnetlink dump (type {msg_type}): {os.strerror(err)}")
                    return
                yield buf, off + _NLMSG.size, off + mlen
                off += _align(mlen)


def addresses() -> list[str]:
    """Every interface address (IPv4 and IPv6) of the namespace."""
    out = []
    for buf, off, end in _dump(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        fam = buf[off]
        for atype, data in _attrs(buf, off + _IFADDRMSG.size, end):
            if atype == IFA_ADDRESS and fam in (socket.AF_INET, socket.AF_INET6):
                out.append(str(ipaddress.ip_address(data)))
    return out


def default_gateways() -> list[str]:
    """Gateways of the default routes of both families, in every routing
    table: under policy routing, another table's gateway is as much the
    host's way out."""
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        for buf, off, end in _dump(RTM_GETROUTE, body):
            fam, dst_len = _RTMSG.unpack_from(buf, off)[:2]
            gw = None
            for atype, data in _attrs(buf, off + _RTMSG.size, end):
                if atype == RTA_GATEWAY:
                    gw = data
            if fam == family and dst_len == 0 and gw:
                out.append(str(ipaddress.ip_address(gw)))
    return out
