"""Deterministic benchmark policies and the packets that exercise them.

Every policy has the same skeleton, so the per-packet numbers compare:

    rule 0            deny-bl     src = @bl (the size under test)
    rule 1            deny-doc6   src = 2001:db8::/32 (IPv6 flood sources)
    rule 2            deny-ch6    src = @ch6 (775 IPv6 prefixes; b, c, d only)
    rules 3..N-9      fillers     10.2xx.y.0/24, tcp/udp, one dport each,
                                  a third of them per-source limits
    rules N-8..N-1    key rules   limits, allow ssh/web/dns/icmp/ntp
    default           deny

The key rules sit at the *end*, so a passing packet has to scan every word
of the rule vector: the worst case of the bit-vector AND loop.

| policy | rules | IPv4 prefixes in @bl                         |
|--------|-------|----------------------------------------------|
| a      | 10    | 8 hand-written                               |
| b      | 100   | firehol_level1 (~6.3k)                       |
| c      | 1,000 | level1 + level3 + synthetic /24, /32 = 100k  |
| d      | 1,000 | same, 1,000,000                              |

Test addresses live in a /16 that no blocklist touches (found at run time
and excluded from the synthetic prefixes), so a passing class really
passes whatever the blocklist.
"""
from __future__ import annotations

import bisect
import ipaddress
import random
from dataclasses import dataclass, field
from pathlib import Path

from testing.blocklists import BLOCKLISTS
from xdpguard import packet
from xdpguard.policy import read_set_lines

SEED = 20240611
KEY_RULES = 8
# Flood sources: 10.0.0.0 + i (i < 10M stays inside 10.0.0.0/8, which
# firehol_level1 lists as a bogon) and 2001:db8:<i>::1 (deny-doc6).
FLOOD_BASE4 = 0x0A000000
FLOOD_DOC6 = "2001:db8::/32"


def read_netset(path: Path) -> list[tuple[int, int, int]]:
    """(family, value, plen) of every entry of a blocklist file."""
    v4, v6, _bad = read_set_lines(path.read_text().splitlines(), path, lambda msg: None)
    return [(4, k >> 8, k & 0xFF) for k in v4] + [(6, k >> 8, k & 0xFF) for k in v6]


def _text(fam: int, value: int, plen: int) -> str:
    addr = ipaddress.IPv4Address(value) if fam == 4 else ipaddress.IPv6Address(value)
    full = 32 if fam == 4 else 128
    return str(addr) if plen == full else f"{addr}/{plen}"


class _Cover:
    """Is an address inside any of a list of IPv4 prefixes (sorted intervals)."""

    def __init__(self, prefixes):
        from xdpguard.compiler import merged_intervals
        from xdpguard.policy import Prefix
        self.firsts, self.lasts = merged_intervals([Prefix(*p) for p in prefixes])[4]

    def hits(self, lo: int, hi: int) -> bool:
        """Does [lo, hi] overlap any prefix?"""
        i = bisect.bisect_right(self.firsts, hi) - 1
        return i >= 0 and self.lasts[i] >= lo


@dataclass
class Addresses:
    block: int                 # the free /16 (network value) holding the test sources
    deny4: str
    pass4: str
    limok4: str
    limover4: str
    banned4: str
    admin_net: str
    pass6: str
    deny6: str = "2001:db8:5::1"   # in FLOOD_DOC6: deny-doc6 in every policy
    xdpf_deny: list[str] = field(default_factory=list)   # 10 addresses for xdp-filter


@dataclass
class Material:
    """Blocklists read once, test addresses chosen once, synthetic prefixes by size."""
    level1: list
    level3: list
    ch6: list
    addrs: Addresses
    _synthetic: dict = field(default_factory=dict)

    def blocklist(self, name: str, n: int | None = None) -> list[tuple[int, int, int]]:
        if name == "a":
            return self.small()
        if name == "b":
            return [p for p in self.level1 if p[0] == 4]
        base = list(dict.fromkeys(p for p in self.level1 + self.level3 if p[0] == 4))
        return self.synthetic(base, n)

    def small(self) -> list:
        d = int(ipaddress.IPv4Address(self.addrs.deny4))
        return [(4, FLOOD_BASE4, 8), (4, d & 0xFFFFFF00, 24), (4, 0x64400000, 10),   # 100.64/10
                (4, 0xC0000200, 24), (4, 0xC6120000, 15), (4, 0xCB007100, 24),     # 192.0.2/24 198.18/15 203.0.113/24
                (4, 0xE0000000, 3), (4, 0x7F000000, 8)]

    def synthetic(self, base: list, n: int) -> list:
        key = n
        if key in self._synthetic:
            return self._synthetic[key]
        rng = random.Random(SEED + n)
        seen = set(base)
        out = list(base)
        block = self.addrs.block
        while len(out) < n:
            if rng.random() < 0.5:
                v, pl = rng.getrandbits(24) << 8, 24
            else:
                v, pl = rng.getrandbits(32), 32
            first = v >> 24
            if first == 0 or first >= 224 or (v & 0xFFFF0000) == block:
                continue
            t = (4, v, pl)
            if t not in seen:
                seen.add(t)
                out.append(t)
        self._synthetic[key] = out
        return out


def material() -> Material:
    level1 = read_netset(BLOCKLISTS / "firehol_level1.netset")
    level3 = read_netset(BLOCKLISTS / "firehol_level3.netset")
    ch6 = read_netset(BLOCKLISTS / "country-ip-blocks_ipv6_ch.cidr")
    cover = _Cover(level1 + level3)
    # A /16 that no blocklist entry touches, for the passing test sources.
    block = None
    for first in (45, 46, 62, 77, 78, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95):
        for second in range(1, 255):
            v = (first << 24) | (second << 16)
            if not cover.hits(v, v | 0xFFFF):
                block = v
                break
        if block is not None:
            break
    if block is None:
        raise RuntimeError("no blocklist-free /16 for the test addresses")
    b = ipaddress.IPv4Address(block)
    o = str(b).split(".")
    net = f"{o[0]}.{o[1]}"
    # deny4: a single address listed in level1, not a bogon range.
    deny = None
    for fam, v, pl in level1:
        if fam == 4 and pl >= 24 and 1 <= (v >> 24) < 224 and (v >> 24) not in (10, 127):
            deny = str(ipaddress.IPv4Address(v | (1 if pl < 32 else 0)))
            break
    ch = [ipaddress.ip_network(_text(f, v, pl)) for f, v, pl in ch6 if f == 6]
    pass6 = next(a for a in ("2001:470:1:2::1", "2a01:4f8:1:2::1", "2604:a880::1", "2400:cb00::1")
                 if not any(ipaddress.IPv6Address(a) in n for n in ch)
                 and ipaddress.IPv6Address(a) not in ipaddress.ip_network(FLOOD_DOC6))
    xdpf = [deny] + [str(ipaddress.IPv4Address(v | 1)) for f, v, pl in level1[50:59] if f == 4]
    addrs = Addresses(block=block, deny4=deny, pass4=f"{net}.1.1", limok4=f"{net}.2.1",
                      limover4=f"{net}.3.1", banned4=f"{net}.4.1", admin_net=f"{net}.5.0/24",
                      pass6=pass6, xdpf_deny=xdpf[:10])
    return Material(level1=level1, level3=level3, ch6=ch6, addrs=addrs)


# ---------------------------------------------------------------- policy text

def _rule(**kw) -> str:
    lines = ["[[rule]]"]
    for k, v in kw.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, list):
            items = ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in v)
            lines.append(f"{k} = [{items}]")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines)


def filler(i: int, variant: int = 0) -> str:
    """Filler rule i: never matched by a test packet (10.2xx.y.0/24 sources)."""
    src = f"10.{200 + i // 256}.{i % 256}.0/24"
    proto = "tcp" if i % 2 == 0 else "udp"
    kind = i % 3
    dport = 20000 + i + variant
    if kind == 0:
        return _rule(name=f"f{i}", src=src, proto=proto, dport=dport, action="limit",
                     rate=f"{1000 + i}/s", per="source")
    return _rule(name=f"f{i}", src=src, proto=proto, dport=dport,
                 action="allow" if kind == 1 else "deny")


def key_rules(a: Addresses) -> list[str]:
    t = a.admin_net.rsplit(".", 2)[0]
    return [
        _rule(name="lim-ok", src=f"{t}.2.0/24", proto="udp", dport=5001, action="limit",
              rate="1000G/s", per="source"),
        _rule(name="lim-over", src=f"{t}.3.0/24", proto="udp", dport=5002, action="limit",
              rate="1/s", burst=1, per="source"),
        _rule(name="allow-ssh", src=a.admin_net, proto="tcp", dport=22, action="allow"),
        _rule(name="allow-web", proto="tcp", dport=[80, 443], action="allow"),
        _rule(name="allow-dns", proto="udp", dport=53, action="allow"),
        _rule(name="allow-icmp", proto=["icmp", "icmpv6"], action="allow"),
        _rule(name="syn-limit", proto="tcp", tcp_flags="syn", dport=8080, action="limit",
              rate="10000/s", per="rule"),
        _rule(name="allow-ntp", proto="udp", dport=123, action="allow"),
    ]


SIZES = {"a": (10, None), "b": (100, None), "c": (1000, 100_000), "d": (1000, 1_000_000)}


def write_policy(mat: Material, key: str, directory: Path, nprefixes: int | None = None,
                 nrules: int | None = None, variant: int = 0) -> tuple[Path, int]:
    """Write policy `key` (a/b/c/d) into directory; returns (path, IPv4 prefixes).

    variant != 0 changes the filler ports (a re-apply of the same shape).
    """
    rules_n, default_n = SIZES[key]
    rules_n = nrules or rules_n
    n = nprefixes or default_n
    bl = mat.blocklist(key, n)
    tag = f"{key}{n or len(bl)}"
    setfile = directory / f"bl-{tag}.txt"
    if not setfile.exists():
        setfile.write_text("\n".join(_text(*p) for p in bl) + "\n")
    parts = [f'[policy]\nname = "bench-{tag}-v{variant}"\ndefault = "deny"\n', "[sets]",
             f'bl = {{ file = "{setfile.name}" }}']
    head = [_rule(name="deny-bl", src="@bl", action="deny"),
            _rule(name="deny-doc6", src=FLOOD_DOC6, action="deny")]
    if key != "a":
        parts.append(f'ch6 = {{ file = "{BLOCKLISTS / "country-ip-blocks_ipv6_ch.cidr"}" }}')
        head.append(_rule(name="deny-ch6", src="@ch6", action="deny"))
    parts.append("")
    nfill = rules_n - len(head) - KEY_RULES
    body = head + [filler(i, variant) for i in range(max(0, nfill))] + key_rules(mat.addrs)
    path = directory / f"policy-{tag}-v{variant}.toml"
    path.write_text("\n".join(parts) + "\n" + "\n\n".join(body) + "\n")
    return path, len(bl)


# ---------------------------------------------------------------- packet classes

@dataclass(frozen=True)
class PacketClass:
    name: str
    frame: bytes
    expect: int          # XDP action of the xdpguard program (1 drop, 2 pass)
    expect_rule: str | None
    src: str


def classes(a: Addresses, dst_mac: bytes | None = None) -> list[PacketClass]:
    d4, d6 = "198.51.100.1", "2001:db8:ffff::1"

    def b(*args, **kw):
        f = packet.build(*args, **kw)
        return (dst_mac + f[6:]) if dst_mac else f

    return [
        PacketClass("v4 udp denied", b(a.deny4, d4, "udp", sport=40000, dport=53), 1, "deny-bl", a.deny4),
        PacketClass("v4 tcp syn pass", b(a.pass4, d4, "tcp", dport=443), 2, "allow-web", a.pass4),
        PacketClass("v6 udp pass", b(a.pass6, d6, "udp", sport=40000, dport=53), 2, "allow-dns", a.pass6),
        PacketClass("v6 udp denied", b(a.deny6, d6, "udp", sport=40000, dport=53), 1, "deny-doc6", a.deny6),
        PacketClass("vlan v4 syn pass", b(a.pass4, d4, "tcp", dport=443, vlans=(100,)), 2, "allow-web", a.pass4),
        PacketClass("limit within", b(a.limok4, d4, "udp", sport=40000, dport=5001), 2, "lim-ok", a.limok4),
        PacketClass("limit over", b(a.limover4, d4, "udp", sport=40000, dport=5002), 1, "lim-over", a.limover4),
        PacketClass("banned", b(a.banned4, d4, "tcp", dport=443), 1, None, a.banned4),
    ]
