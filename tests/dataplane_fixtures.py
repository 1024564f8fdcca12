"""Fixture rows for the data-plane tests, katran-style: two policies, and
rows of (description, frame, expected outcome) that tests/test_dataplane.py
runs through the real program and the Python reference (lookup.verdict).

The rows cover every parse path (each cause of a malformed frame too),
every action, default allow / deny, ND, fragments; SWEEP holds the header
stacks whose every prefix the truncation sweep tries.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from scapy.layers.inet import GRE, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RA, IPv6,
                                IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from xdpguard.packet import build


class Row(NamedTuple):
    desc: str
    frame: bytes
    verdict: str             # "pass" or "drop"
    why: str | None          # the deciding rule, a reason (testrun.outcome), None: the default
    repeat: int              # runs of the frame; the expectation is the last one's


def row(desc, frame, verdict, why=None, repeat=1) -> Row:
    return Row(desc, bytes(frame), verdict, why, repeat)


def E(**kw):
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


def with_byte(frame: bytes, at: int, value: int) -> bytes:
    return frame[:at] + bytes((value,)) + frame[at + 1:]


def set_ihl(frame: bytes, ihl: int, l3: int = 14) -> bytes:
    return with_byte(frame, l3, 0x40 | ihl)


def eth(etype: int, payload: bytes = b"") -> bytes:
    return bytes.fromhex("020000000002020000000001") + struct.pack("!H", etype) + payload


# Addresses: S*/D* hit no address rule.
S4, D4 = "192.0.2.100", "198.51.100.1"
S6, D6 = "2001:db8:1::100", "2001:db8:2::1"
ADMIN4, ADMIN6 = "192.0.2.5", "2001:db8:a::5"
BAD4, BAD6 = "203.0.113.9", "2001:db8:bad::9"


# ---------------------------------------------------------------- policies

ALLOW_POLICY = """
[policy]
name = "dp-allow"
default = "allow"

[sets]
bad = ["203.0.113.0/24", "2001:db8:bad::/48"]
admin = ["192.0.2.0/28", "2001:db8:a::/64"]

[[rule]]
name = "deny-bad"
src = "@bad"
action = "deny"

[[rule]]
name = "ssh-admin"
src = "@admin"
proto = "tcp"
dport = 22
action = "allow"

[[rule]]
name = "ssh-deny"
proto = "tcp"
dport = 22
action = "deny"

[[rule]]
name = "syn-8080"
proto = "tcp"
dport = 8080
tcp_flags = "syn"
action = "deny"

[[rule]]
name = "dns-replies"
proto = "udp"
sport = 53
dport = "1024-65535"
action = "allow"

[[rule]]
name = "udp-low"
proto = "udp"
dport = "0-1023"
action = "deny"

[[rule]]
name = "frag-dst"
dst = ["198.51.100.50", "2001:db8:50::1"]
proto = ["tcp", "udp"]
action = "deny"

[[rule]]
name = "icmp-dst"
dst = "198.51.100.99"
proto = "icmp"
action = "deny"

[[rule]]
name = "icmpv6-dst"
dst = "2001:db8:99::/64"
proto = "icmpv6"
action = "deny"

[[rule]]
name = "any-from"
src = ["198.51.100.200", "2001:db8:200::1"]
action = "deny"

[[rule]]
name = "lim-loose"
dst = ["198.51.100.60", "2001:db8:60::1"]
action = "limit"
rate = "1G/s"
burst = 1000000

[[rule]]
name = "lim-tight"
dst = ["198.51.100.61", "2001:db8:61::1"]
action = "limit"
rate = "1/s"
burst = 1
"""

DENY_POLICY = """
[policy]
name = "dp-deny"
default = "deny"

[[rule]]
name = "web"
proto = "tcp"
dport = [80, 443]
action = "allow"

[[rule]]
name = "dns"
proto = "udp"
dport = 53
action = "allow"

[[rule]]
name = "ping4"
proto = "icmp"
action = "allow"

[[rule]]
name = "udp-from-lan"
src = ["192.0.2.0/24", "2001:db8:1::/48"]
proto = "udp"
action = "allow"

[[rule]]
name = "icmpv6-bad"
src = "2001:db8:bad::/48"
proto = "icmpv6"
action = "deny"

[[rule]]
name = "per-rule-limit"
dst = "198.51.100.61"
action = "limit"
rate = "1/s"
burst = 2
per = "rule"
"""


# ---------------------------------------------------------------- fixture tables

def tcp(src=S4, dst=D4, dport=80, flags="syn", **kw):
    return build(src, dst, "tcp", dport=dport, tcp_flags=flags, **kw)


def udp(src=S4, dst=D4, sport=40000, dport=5000, **kw):
    return build(src, dst, "udp", sport=sport, dport=dport, **kw)


EXT6 = [("hop",), ("dst", 1), ("rt",), ("dst",), ("hop", 2), ("rt", 3)]


ALLOW_ROWS = [
    # ---- basics, every action, default allow
    row("ipv4 tcp syn :80, no rule -> default allow", tcp(), "pass", None),
    row("ipv6 tcp syn :80, no rule -> default allow", tcp(S6, D6), "pass", None),
    row("ipv4 ssh from admin set", tcp(ADMIN4, dport=22), "pass", "ssh-admin"),
    row("ipv6 ssh from admin set", tcp(ADMIN6, D6, dport=22), "pass", "ssh-admin"),
    row("ipv4 ssh from elsewhere", tcp(dport=22), "drop", "ssh-deny"),
    row("ipv6 ssh from elsewhere", tcp(S6, D6, dport=22, flags="ack"), "drop", "ssh-deny"),
    row("admin /28 edge: .15 in", tcp("192.0.2.15", dport=22), "pass", "ssh-admin"),
    row("admin /28 edge: .16 out", tcp("192.0.2.16", dport=22), "drop", "ssh-deny"),
    row("bad set ipv4, udp", udp(BAD4), "drop", "deny-bad"),
    row("bad set ipv6, tcp ssh (first rule wins)", tcp(BAD6, D6, dport=22), "drop", "deny-bad"),
    row("tcp syn :8080", tcp(dport=8080), "drop", "syn-8080"),
    row("tcp ack :8080 (not a syn)", tcp(dport=8080, flags="ack"), "pass", None),
    row("tcp syn+ack :8080 (not a syn)", tcp(dport=8080, flags="syn,ack"), "pass", None),
    row("tcp syn+fin :8080 (syn, no ack)", tcp(dport=8080, flags="syn,fin"), "drop", "syn-8080"),
    row("tcp no flags :8080", tcp(dport=8080, flags=None), "pass", None),
    row("ipv6 tcp syn :8080", tcp(S6, D6, dport=8080), "drop", "syn-8080"),
    row("udp 53 -> 40000 (sport + dport range)", udp(sport=53, dport=40000), "pass", "dns-replies"),
    row("udp 53 -> 1024 (range low edge)", udp(sport=53, dport=1024), "pass", "dns-replies"),
    row("udp 53 -> 53 (dport below range)", udp(sport=53, dport=53), "drop", "udp-low"),
    row("udp 40000 -> 53", udp(dport=53), "drop", "udp-low"),
    row("udp 40000 -> 1023", udp(dport=1023), "drop", "udp-low"),
    row("udp 40000 -> 0", udp(dport=0), "drop", "udp-low"),
    row("udp 40000 -> 5000", udp(), "pass", None),
    row("ipv6 udp 53 -> 65535", udp(S6, D6, sport=53, dport=65535), "pass", "dns-replies"),
    row("limit within (1G/s)", udp(dst="198.51.100.60", dport=5000), "pass", "lim-loose"),
    row("ipv6 limit within (1G/s)", tcp(S6, "2001:db8:60::1"), "pass", "lim-loose"),
    row("limit: first packet within burst 1", tcp(dst="198.51.100.61"), "pass", "lim-tight"),
    row("limit over: 3rd packet at 1/s burst 1", tcp(dst="198.51.100.61"), "drop", "lim-tight", 3),
    row("ipv6 limit over", udp(S6, "2001:db8:61::1"), "drop", "lim-tight", 2),
    # ---- ICMP, ICMPv6, ND, other protocols
    row("icmp echo, no rule", build(S4, D4, "icmp"), "pass", None),
    row("icmp echo to icmp-dst", build(S4, "198.51.100.99", "icmp"), "drop", "icmp-dst"),
    row("tcp to icmp-dst host is not icmp", tcp(dst="198.51.100.99"), "pass", None),
    row("icmpv6 echo, no rule", build(S6, D6, "icmpv6"), "pass", None),
    row("icmpv6 echo to icmpv6-dst", build(S6, "2001:db8:99::1", "icmpv6"), "drop", "icmpv6-dst"),
    row("ND NS, no rule -> nd", E() / IPv6(src="fe80::1", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=D6),
        "pass", "nd"),
    row("ND RA, no rule -> nd", E() / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(), "pass", "nd"),
    *[row(f"ND type {t} -> nd", build(S6, D6, "icmpv6", icmp_type=t), "pass", "nd")
      for t in (133, 134, 135, 136, 137)],
    row("icmpv6 type 132 is not ND", build(S6, D6, "icmpv6", icmp_type=132), "pass", None),
    row("icmpv6 type 138 is not ND", build(S6, D6, "icmpv6", icmp_type=138), "pass", None),
    row("ND to icmpv6-dst: a rule names icmpv6", build(S6, "2001:db8:99::1", "icmpv6", icmp_type=135),
        "drop", "icmpv6-dst"),
    row("ND from bad set: 'any' rules never match ND", build(BAD6, D6, "icmpv6", icmp_type=136), "pass", "nd"),
    row("icmpv6 echo from bad set", build(BAD6, D6, "icmpv6"), "drop", "deny-bad"),
    row("ipv4 proto 58 type 135 is icmpv6, not ND", eth(0x0800, bytes(IP(src=S4, dst=D4, proto=58))
                                                       + b"\x87\0\0\0"), "pass", None),
    row("GRE, no rule", E() / IP(src=S4, dst=D4) / GRE(), "pass", None),
    row("GRE from any-from", E() / IP(src="198.51.100.200", dst=D4) / GRE(), "drop", "any-from"),
    row("ESP over ipv6 from any-from", build("2001:db8:200::1", D6, "esp", payload=bytes(16)),
        "drop", "any-from"),
    row("ipv6 no-next-header (59)", build(S6, D6, 59), "pass", None),
    # ---- VLAN
    row("vlan ipv4 ssh", tcp(dport=22, vlans=(100,)), "drop", "ssh-deny"),
    row("vlan ipv6 ssh admin", tcp(ADMIN6, D6, dport=22, vlans=(4095,)), "pass", "ssh-admin"),
    row("qinq 88a8+8100 ipv4 ssh (scapy)",
        E() / Dot1AD(vlan=100) / Dot1Q(vlan=200) / IP(src=S4, dst=D4) / TCP(dport=22), "drop", "ssh-deny"),
    row("qinq 8100+8100 ipv6 udp 53",
        E() / Dot1Q(vlan=1) / Dot1Q(vlan=2) / IPv6(src=S6, dst=D6) / UDP(sport=1, dport=53), "drop", "udp-low"),
    row("qinq 8100+88a8", tcp(dport=22, vlans=((0x8100, 1), (0x88a8, 2))), "drop", "ssh-deny"),
    row("single 88a8 tag", tcp(dport=22, vlans=((0x88a8, 9),)), "drop", "ssh-deny"),
    row("triple tag -> vlans", tcp(dport=22, vlans=(1, 2, 3)), "drop", "vlans"),
    row("triple tag before ARP -> vlans",
        E() / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / ARP(), "drop", "vlans"),
    row("triple 8100 tag before ipv6 -> vlans", tcp(S6, D6, vlans=((0x8100, 1), (0x8100, 2), (0x8100, 3))),
        "drop", "vlans"),
    row("third tag cut short: judged by its TPID -> vlans",
        eth(0x8100, b"\x00\x01\x81\x00" + b"\x00\x02\x88\xa8" + b"\x00"), "drop", "vlans"),
    row("vlan tag truncated", eth(0x8100, b"\x00\x07"), "drop", "truncated"),
    row("second vlan tag truncated", eth(0x88A8, b"\x00\x07\x81\x00\x00"), "drop", "truncated"),
    row("vlan ARP -> non-ip", E() / Dot1Q(vlan=7) / ARP(), "pass", "non-ip"),
    row("qinq ARP -> non-ip", E() / Dot1AD(vlan=7) / Dot1Q(vlan=8) / ARP(), "pass", "non-ip"),
    # ---- non-IP
    row("ARP", E() / ARP(psrc=S4, pdst=D4), "pass", "non-ip"),
    row("LLDP ethertype", eth(0x88CC, bytes(30)), "pass", "non-ip"),
    row("802.3 length field", eth(46, bytes(46)), "pass", "non-ip"),
    row("14 bytes, ethertype ARP", eth(0x0806), "pass", "non-ip"),
    row("14 bytes, ethertype IPv4", eth(0x0800), "drop", "truncated"),
    row("14 bytes, ethertype IPv6", eth(0x86DD), "drop", "truncated"),
    # ---- IPv4 header
    *[row(f"ipv4 IHL {ihl} (NOP options) ssh", tcp(dport=22, ipv4_options=b"\x01" * (4 * (ihl - 5))),
          "drop", "ssh-deny") for ihl in range(6, 16)],
    row("ipv4 IHL 15 admin ssh (scapy options)",
        E() / IP(src=ADMIN4, dst=D4, options=[IPOption_NOP()] * 40) / TCP(dport=22), "pass", "ssh-admin"),
    row("ipv4 IHL 9 udp 53 -> 40000", udp(sport=53, dport=40000, ipv4_options=bytes(16)), "pass", "dns-replies"),
    *[row(f"ipv4 IHL {ihl} -> bad_header", set_ihl(tcp(dport=22), ihl), "drop", "bad_header")
      for ihl in range(0, 5)],
    row("vlan ipv4 IHL 4 -> bad_header", set_ihl(tcp(dport=22, vlans=(5,)), 4, l3=18), "drop", "bad_header"),
    row("ipv4 IHL 15, options missing", set_ihl(tcp(dport=22), 15), "drop", "truncated"),
    row("ipv4 IHL 6, 20 header bytes only", set_ihl(build(S4, D4, "gre"), 6), "drop", "truncated"),
    row("ipv4 IHL 15, 60 header bytes exact, GRE",
        set_ihl(build(S4, D4, "gre", payload=bytes(40)), 15), "pass", None),
    row("ipv4 version 6 under 0x0800", with_byte(tcp(dport=22), 14, 0x65), "drop", "bad_header"),
    row("ipv4 version 0", with_byte(tcp(dport=22), 14, 0x05), "drop", "bad_header"),
    row("ipv6 version 4 under 0x86dd", with_byte(tcp(S6, D6, dport=22), 14, 0x45), "drop", "bad_header"),
    row("ipv6 version 0", with_byte(udp(S6, D6), 14, 0x00), "drop", "bad_header"),
    row("ipv6 under 0x86dd, 39 bytes of it", tcp(S6, D6)[:14 + 39], "drop", "truncated"),
    row("ipv4 tcp 19 bytes", tcp(dport=22)[:14 + 20 + 19], "drop", "truncated"),
    row("ipv4 udp 7 bytes", udp()[:14 + 20 + 7], "drop", "truncated"),
    row("ipv4 icmp without icmp bytes", eth(0x0800, bytes(IP(src=S4, dst=D4, proto=1))), "pass", None),
    row("ipv4 proto 58 without a byte", eth(0x0800, bytes(IP(src=S4, dst=D4, proto=58))), "drop", "truncated"),
    row("ipv6 icmpv6 without a byte", eth(0x86DD, bytes(IPv6(src=S6, dst=D6, nh=58))), "drop", "truncated"),
    # ---- IPv4 fragments: non-first ones match only port-less rules
    row("ipv4 first fragment (MF) ssh", tcp(dport=22, fragment=(0, True)), "drop", "ssh-deny"),
    row("ipv4 non-first tcp fragment: no ports -> default", tcp(dport=22, fragment=(10, True)), "pass", None),
    row("ipv4 non-first last fragment", tcp(dport=22, fragment=(1, False)), "pass", None),
    row("ipv4 non-first tcp fragment, syn rule never", build(S4, D4, "tcp", fragment=(100, False),
                                                             payload=bytes(8)), "pass", None),
    row("ipv4 non-first tcp frag to frag-dst", tcp(dst="198.51.100.50", fragment=(5, False)), "drop", "frag-dst"),
    row("ipv4 non-first udp frag to frag-dst", udp(dst="198.51.100.50", fragment=(5, True)), "drop", "frag-dst"),
    row("ipv4 non-first udp frag (udp-low needs ports)", udp(dport=53, fragment=(5, True)), "pass", None),
    row("ipv4 non-first frag from bad set", tcp(BAD4, fragment=(5, True)), "drop", "deny-bad"),
    row("ipv4 non-first frag, 0 bytes of L4", eth(0x0800, bytes(IP(src=S4, dst=D4, proto=6, frag=3))),
        "pass", None),
    row("ipv4 non-first icmp frag to icmp-dst", build(S4, "198.51.100.99", "icmp", fragment=(2, False)),
        "drop", "icmp-dst"),
    row("ipv4 DF set, offset 0: not a fragment",
        E() / IP(src=S4, dst=D4, flags="DF") / TCP(dport=22), "drop", "ssh-deny"),
    # ---- IPv6 extension headers
    row("ipv6 hop-by-hop ssh", tcp(S6, D6, dport=22, ipv6_exthdrs=[("hop",)]), "drop", "ssh-deny"),
    row("ipv6 dst-opts ssh", tcp(S6, D6, dport=22, ipv6_exthdrs=[("dst",)]), "drop", "ssh-deny"),
    row("ipv6 routing ssh", tcp(S6, D6, dport=22, ipv6_exthdrs=[("rt",)]), "drop", "ssh-deny"),
    row("ipv6 hop hdrlen 2 (24 bytes) ssh", tcp(S6, D6, dport=22, ipv6_exthdrs=[("hop", 2)]), "drop", "ssh-deny"),
    row("ipv6 first fragment (M=1) ssh", tcp(S6, D6, dport=22, fragment=(0, True)), "drop", "ssh-deny"),
    row("ipv6 hop+dst+rt+frag0 (scapy) admin ssh",
        E() / IPv6(src=ADMIN6, dst=D6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting()
        / IPv6ExtHdrFragment(offset=0, m=1) / TCP(dport=22), "pass", "ssh-admin"),
    row("ipv6 6 extension headers ssh", tcp(S6, D6, dport=22, ipv6_exthdrs=EXT6), "drop", "ssh-deny"),
    row("ipv6 5 ext + first frag (6) udp", udp(S6, D6, dport=53, ipv6_exthdrs=EXT6[:5] + [("frag", 0, True)]),
        "drop", "udp-low"),
    row("ipv6 7 extension headers -> exthdrs",
        tcp(S6, D6, dport=22, ipv6_exthdrs=EXT6 + [("dst",)]), "drop", "exthdrs"),
    row("ipv6 6 ext + non-first frag (7th) -> exthdrs",
        tcp(S6, D6, ipv6_exthdrs=EXT6, fragment=(3, False)), "drop", "exthdrs"),
    row("ipv6 6 ext, a 7th by number alone, no bytes -> exthdrs",
        E() / IPv6(src=S6, dst=D6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt(nh=43), "drop", "exthdrs"),
    row("ipv6 5 ext + non-first frag (6th) -> fragment",
        tcp(S6, D6, ipv6_exthdrs=EXT6[:5], fragment=(3, False)), "pass", None),
    row("ipv6 non-first tcp fragment: no ports -> default", tcp(S6, D6, dport=22, fragment=(10, True)),
        "pass", None),
    row("ipv6 non-first fragment (scapy) to frag-dst",
        E() / IPv6(src=S6, dst="2001:db8:50::1") / IPv6ExtHdrFragment(offset=8, nh=17) / Raw(b"x" * 8),
        "drop", "frag-dst"),
    row("ipv6 hop+dst then non-first udp frag to frag-dst",
        udp(S6, "2001:db8:50::1", ipv6_exthdrs=[("hop",), ("dst",)], fragment=(1, False)), "drop", "frag-dst"),
    row("ipv6 non-first frag whose next header is an ext header",
        E() / IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=8, nh=60) / Raw(bytes(8)), "pass", None),
    row("ipv6 non-first icmpv6 type 135 frag is not ND",
        E() / IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=8, nh=58) / Raw(b"\x87" + bytes(7)), "pass", None),
    row("ipv6 non-first frag from any-from", tcp("2001:db8:200::1", D6, fragment=(9, False)), "drop", "any-from"),
    row("ipv6 ext header truncated (7 of 8 bytes)",
        eth(0x86DD, bytes(IPv6(src=S6, dst=D6, nh=0)) + bytes((6, 0, 1, 4, 0, 0, 0))), "drop", "truncated"),
    row("ipv6 ext header length past the frame",
        eth(0x86DD, bytes(IPv6(src=S6, dst=D6, nh=60)) + bytes((6, 5)) + bytes(6) + bytes(20)), "drop", "truncated"),
    row("ipv6 AH is 'other'", build(S6, D6, "ah", payload=bytes(16)), "pass", None),
]


DENY_ROWS = [
    row("web :80", tcp(dport=80), "pass", "web"),
    row("web :443 ipv6", tcp(S6, D6, dport=443, flags="ack"), "pass", "web"),
    row("web :443 over qinq", tcp(dport=443, vlans=(5, 6)), "pass", "web"),
    row("tcp :22 -> default deny", tcp(dport=22), "drop", None),
    row("dns udp :53", udp("10.9.9.9", dport=53), "pass", "dns"),
    row("udp :54 from elsewhere -> default deny", udp("10.9.9.9", dport=54), "drop", None),
    row("udp :54 from lan", udp(dport=54), "pass", "udp-from-lan"),
    row("icmp echo", build(S4, D4, "icmp"), "pass", "ping4"),
    row("icmp echo over vlan", build(S4, D4, "icmp", vlans=(10,)), "pass", "ping4"),
    row("icmpv6 echo -> default deny", E() / IPv6(src=S6, dst=D6) / ICMPv6EchoRequest(), "drop", None),
    row("ND NS under default deny -> nd", build(S6, D6, "icmpv6", icmp_type=135), "pass", "nd"),
    row("ND RA under default deny -> nd", E() / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6ND_RA(), "pass", "nd"),
    row("ND redirect under default deny -> nd", build(S6, D6, "icmpv6", icmp_type=137), "pass", "nd"),
    row("ND from a source an icmpv6 rule names", build(BAD6, D6, "icmpv6", icmp_type=135), "drop", "icmpv6-bad"),
    row("icmpv6 echo from bad", build(BAD6, D6, "icmpv6"), "drop", "icmpv6-bad"),
    row("GRE -> default deny", E() / IP(src=S4, dst=D4) / GRE(), "drop", None),
    row("ipv4 non-first tcp frag -> default deny", tcp(dport=80, fragment=(4, False)), "drop", None),
    row("ipv4 non-first udp frag from lan", udp(dport=53, fragment=(4, False)), "pass", "udp-from-lan"),
    row("ipv4 non-first udp frag elsewhere: dns rule needs ports", udp("10.9.9.9", dport=53, fragment=(4, True)),
        "drop", None),
    row("ipv6 non-first udp frag from lan", udp("2001:db8:1::5", D6, fragment=(4, False)), "pass", "udp-from-lan"),
    row("ipv6 non-first tcp frag -> default deny", tcp(S6, D6, dport=443, fragment=(4, False)), "drop", None),
    row("ARP passes under default deny", E() / ARP(), "pass", "non-ip"),
    row("bad header under default deny", set_ihl(tcp(dport=80), 4), "drop", "bad_header"),
    row("truncated under default deny", tcp(dport=80)[:14 + 20 + 10], "drop", "truncated"),
    row("triple tag under default deny", tcp(dport=80, vlans=(1, 2, 3)), "drop", "vlans"),
    row("7 extension headers under default deny", udp(S6, D6, dport=53, ipv6_exthdrs=EXT6 + [("hop",)]),
        "drop", "exthdrs"),
    row("per-rule limit within burst 2", tcp(dst="198.51.100.61", dport=9000), "pass", "per-rule-limit", 2),
    row("per-rule limit over", udp("10.9.9.9", "198.51.100.61", dport=9000), "drop", "per-rule-limit", 3),
]


SWEEP = [
    ("ipv4/tcp", tcp(dport=22), "ssh-deny"),
    ("ipv4/udp", udp(dport=53), "udp-low"),
    ("ipv6/tcp", tcp(S6, D6, dport=22), "ssh-deny"),
    ("ipv6+ext/udp", udp(S6, D6, dport=53, ipv6_exthdrs=[("hop",), ("dst", 1), ("rt",)], fragment=(0, True)),
     "udp-low"),
    ("vlan/ipv4/tcp", tcp(dport=22, vlans=(42,)), "ssh-deny"),
    ("qinq/ipv6/tcp", tcp(S6, D6, dport=22, vlans=(1, 2)), "ssh-deny"),
    ("ipv4+options/tcp", tcp(dport=22, ipv4_options=bytes(40)), "ssh-deny"),
    ("ipv6/icmpv6-nd", build(S6, D6, "icmpv6", icmp_type=135)[:14 + 40 + 1], "nd"),
]
