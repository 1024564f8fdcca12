"""The compiled bit-vector classifier (compiler + lookup) agrees with a
direct first-match evaluation of the rules.

Policies are generated as a *spec* (plain Python), rendered to TOML and read
with ``policy.load``; the oracle below evaluates the spec itself with the
``ipaddress`` module, so the parser, the compiler and the lookup are all
checked against code that shares nothing with them.

Semantics (docs/design.md):
  * first matching rule in file order; no match -> the policy default;
  * ICMPv6 ND (types 133-137, l4 class ND) passes when no rule matches it,
    and only rules that name icmpv6 explicitly match it ("any" does not);
  * tcp_flags = "syn" matches only SYN-without-ACK segments;
  * a packet without ports (ICMP, other protocols, non-first fragments)
    matches only rules that name no ports.
"""
from __future__ import annotations

import ipaddress
import json
import random
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpguard.compiler import compile_policy, find_unreachable
from xdpguard.layout import C
from xdpguard.lookup import decide
from xdpguard.policy import Policy, Mitigation, Prefix, Rule, load

BITS = {4: 32, 6: 128}
PROTO_NAMES = ("tcp", "udp", "icmp", "icmpv6")
L4_CLASSES = (C.XG_L4_OTHER, C.XG_L4_TCP, C.XG_L4_TCP_SYN, C.XG_L4_UDP, C.XG_L4_ICMP,
              C.XG_L4_ICMPV6, C.XG_L4_ND)
# the protocol name a packet's l4 class belongs to (OTHER: none)
CLASS_PROTO = {C.XG_L4_OTHER: None, C.XG_L4_TCP: "tcp", C.XG_L4_TCP_SYN: "tcp", C.XG_L4_UDP: "udp",
               C.XG_L4_ICMP: "icmp", C.XG_L4_ICMPV6: "icmpv6", C.XG_L4_ND: "icmpv6"}
PORT_CLASSES = (C.XG_L4_TCP, C.XG_L4_TCP_SYN, C.XG_L4_UDP)
VERDICT = {"allow": "pass", "deny": "drop", "limit": "limit"}


# ---------------------------------------------------------------- policy specs

def _addr_text(family: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


@st.composite
def prefix_specs(draw, pool):
    """(family, address int, plen): sometimes with host bits set, often
    nested in or around a prefix of the pool, all lengths incl. /0 and hosts."""
    if pool and draw(st.integers(0, 3)):
        fam, base, bplen = draw(st.sampled_from(pool))
        bits = BITS[fam]
        kind = draw(st.integers(0, 3))
        if kind == 0:                                   # the same prefix
            plen = bplen
        elif kind == 1:                                 # inside it (up to a host route)
            plen = draw(st.integers(bplen, bits))
        elif kind == 2:                                 # around it (down to /0)
            plen = draw(st.integers(0, bplen))
        else:                                           # a sibling: flip one network bit
            plen = bplen
            if bplen:
                base ^= 1 << (bits - draw(st.integers(1, bplen)))
        span = bits - plen
        net = base >> span << span if span < bits else 0
        host = draw(st.integers(0, (1 << span) - 1)) if span and draw(st.integers(0, 9)) == 0 else 0
        return fam, net | host, plen
    fam = draw(st.sampled_from((4, 6)))
    bits = BITS[fam]
    plen = draw(st.one_of(st.sampled_from((0, 1, 8, 16, 24, 31, 32, 48, 64, 127, 128)), st.integers(0, bits)))
    plen = min(plen, bits)
    value = draw(st.integers(0, (1 << bits) - 1))
    span = bits - plen
    if draw(st.integers(0, 9)):                          # mostly without host bits
        value = value >> span << span if span < bits else 0
    return fam, value, plen


def prefix_text(spec) -> str:
    fam, value, plen = spec
    return f"{_addr_text(fam, value)}/{plen}" if plen != BITS[fam] or value % 3 else _addr_text(fam, value)


@st.composite
def port_specs(draw):
    """A list of (lo, hi) ranges, biased to the edges."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        lo = draw(st.one_of(st.sampled_from((0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 65534, 65535)),
                            st.integers(0, 65535)))
        if draw(st.booleans()):
            hi = lo
        else:
            hi = draw(st.one_of(st.integers(lo, 65535), st.integers(lo, min(65535, lo + 20)), st.just(65535)))
        out.append((lo, hi))
    return out


def port_text(ranges):
    items = [lo if lo == hi and lo % 2 else (str(lo) if lo == hi else f"{lo}-{hi}") for lo, hi in ranges]
    return items[0] if len(items) == 1 and random.Random(ranges[0][0]).random() < 0.5 else items


@st.composite
def rule_specs(draw, pool, set_names):
    r = {}

    def addresses():
        items = []
        for _ in range(draw(st.integers(1, 3))):
            if set_names and draw(st.integers(0, 3)) == 0:
                items.append("@" + draw(st.sampled_from(set_names)))
            else:
                items.append(draw(prefix_specs(pool)))
        return items

    # mostly narrow rules, so that later rules get their turn; some catch-alls
    if draw(st.integers(0, 6)):
        r["src"] = addresses()
    if draw(st.integers(0, 4)) == 0:
        r["dst"] = addresses()
    k = draw(st.integers(0, 9))
    if k == 0:
        proto = None
    elif k == 1:
        proto = "any"
    elif k <= 6:
        proto = draw(st.sampled_from(PROTO_NAMES + ("tcp", "tcp", "udp")))
    elif k <= 8:
        proto = draw(st.sampled_from((["tcp", "udp"], ["udp", "tcp"], ["tcp"], ["icmp", "icmpv6"],
                                      ["tcp", "icmpv6"], ["udp", "icmp"])))
    else:
        proto = draw(st.lists(st.sampled_from(PROTO_NAMES + ("any",)), min_size=1, max_size=3, unique=True))
    if proto is not None:
        r["proto"] = proto
    names = None if proto is None or proto == "any" or (isinstance(proto, list) and "any" in proto) \
        else set([proto] if isinstance(proto, str) else proto)
    if names is not None and names <= {"tcp", "udp"}:
        if draw(st.integers(0, 2)) == 0:
            r["sport"] = draw(port_specs())
        if draw(st.integers(0, 3)):
            r["dport"] = draw(port_specs())
    if names == {"tcp"} and draw(st.integers(0, 2)) == 0:
        r["tcp_flags"] = "syn"
    r["action"] = draw(st.sampled_from(("allow", "deny", "limit")))
    if r["action"] == "limit":
        r["rate"] = draw(st.sampled_from(("200/s", "2k/s", "10Mbit/s", "1.5MB/s", "0.5/s")))
        if draw(st.booleans()):
            r["burst"] = draw(st.integers(1, 100000))
        r["per"] = draw(st.sampled_from(("source", "rule")))
    return r


@st.composite
def policy_specs(draw, min_rules=1, max_rules=40):
    pool = draw(st.lists(prefix_specs([]), min_size=1, max_size=8))
    sets = {}
    for i in range(draw(st.integers(0, 3))):
        sets[f"set{i}"] = draw(st.lists(prefix_specs(pool), min_size=0 if i == 2 else 1, max_size=6))
    names = sorted(sets)
    n = draw(st.one_of(st.integers(min_rules, max_rules), st.integers(min_rules, min(max_rules, min_rules + 5))))
    rules = draw(st.lists(rule_specs(pool, names), min_size=n, max_size=n))
    default = draw(st.sampled_from(("allow", "deny")))
    return {"default": default, "sets": sets, "rules": rules}


def render(spec) -> str:
    def addr_list(items):
        return json.dumps([it if isinstance(it, str) else prefix_text(it) for it in items])

    out = [f'[policy]\nname = "prop"\ndefault = "{spec["default"]}"\n', "[sets]"]
    for name, items in spec["sets"].items():
        out.append(f"{name} = {addr_list(items)}")
    for i, r in enumerate(spec["rules"]):
        out.append(f'\n[[rule]]\nname = "r{i}"')
        for key in ("src", "dst"):
            if key in r:
                out.append(f"{key} = {addr_list(r[key])}")
        for key, val in r.items():
            if key in ("src", "dst"):
                continue
            if key in ("sport", "dport"):
                val = port_text(val)
            out.append(f"{key} = {json.dumps(val)}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the oracle

class Oracle:
    """First-match evaluation of a spec, written from the semantics alone."""

    def __init__(self, spec):
        self.default = spec["default"]
        self.rules = []
        for r in spec["rules"]:
            def nets(items):
                out = []
                for it in items:
                    for p in (spec["sets"][it[1:]] if isinstance(it, str) else [it]):
                        out.append(ipaddress.ip_network(prefix_text(p), strict=False))
                return out
            proto = r.get("proto")
            if proto is None or proto == "any" or (isinstance(proto, list) and "any" in proto):
                protos = None
            else:
                protos = {proto} if isinstance(proto, str) else set(proto)
            self.rules.append({
                "src": nets(r["src"]) if "src" in r else None,
                "dst": nets(r["dst"]) if "dst" in r else None,
                "protos": protos, "sport": r.get("sport"), "dport": r.get("dport"),
                "syn": r.get("tcp_flags") == "syn", "action": r["action"]})

    @staticmethod
    def _in(nets, addr):
        return nets is None or any(addr in n for n in nets)   # a v4 address is never in a v6 net

    @staticmethod
    def _port_ok(ranges, port):
        if ranges is None:
            return True
        return port is not None and any(lo <= port <= hi for lo, hi in ranges)

    def matches(self, r, src, dst, l4, sport, dport):
        if r["protos"] is None:
            if l4 == C.XG_L4_ND:
                return False                      # "any" never takes ND
        elif CLASS_PROTO[l4] not in r["protos"]:
            return False
        if r["syn"] and l4 != C.XG_L4_TCP_SYN:
            return False
        return (self._port_ok(r["sport"], sport) and self._port_ok(r["dport"], dport)
                and self._in(r["src"], src) and self._in(r["dst"], dst))

    def decide(self, src, dst, l4, sport, dport):
        for i, r in enumerate(self.rules):
            if self.matches(r, src, dst, l4, sport, dport):
                return i, r["action"], VERDICT[r["action"]]
        if l4 == C.XG_L4_ND:
            return None, "allow", "pass"
        return None, self.default, VERDICT[self.default]


# ---------------------------------------------------------------- packets

def _policy_prefixes(spec, family):
    out = []
    for items in list(spec["sets"].values()) + [r.get(k, []) for r in spec["rules"] for k in ("src", "dst")]:
        out += [p for p in items if not isinstance(p, str) and p[0] == family]
    return out


def _policy_ports(spec):
    out = []
    for r in spec["rules"]:
        for k in ("sport", "dport"):
            out += r.get(k, [])
    return out


@st.composite
def addresses(draw, family, prefixes):
    bits = BITS[family]
    top = (1 << bits) - 1
    if prefixes and draw(st.integers(0, 4)):
        fam, value, plen = draw(st.sampled_from(prefixes))
        span = bits - plen
        first = value >> span << span if span < bits else 0
        last = first | ((1 << span) - 1)
        a = draw(st.sampled_from((first, last, first - 1, last + 1, first + 1, last - 1,
                                  draw(st.integers(first, last)))))
        return min(max(a, 0), top)
    return draw(st.one_of(st.integers(0, top), st.sampled_from((0, top, 1 << (bits - 1)))))


@st.composite
def ports(draw, edges):
    if edges and draw(st.integers(0, 3)):
        lo, hi = draw(st.sampled_from(edges))
        p = draw(st.sampled_from((lo, hi, lo - 1, hi + 1, (lo + hi) // 2)))
        return min(max(p, 0), 65535)
    return draw(st.one_of(st.sampled_from((0, 1, 65535)), st.integers(0, 65535)))


def _expand(spec, items):
    out = []
    for it in items:
        out += spec["sets"][it[1:]] if isinstance(it, str) else [it]
    return out


_CLASSES_OF = {"tcp": (C.XG_L4_TCP, C.XG_L4_TCP_SYN), "udp": (C.XG_L4_UDP,), "icmp": (C.XG_L4_ICMP,),
               "icmpv6": (C.XG_L4_ICMPV6, C.XG_L4_ND)}


@st.composite
def packets(draw, spec):
    """Half the packets aim at one rule (its prefixes, protocols and port
    edges, so later rules get matched too), the rest at the whole policy."""
    target = draw(st.sampled_from(spec["rules"])) if draw(st.booleans()) else None
    if target is not None:
        src_p = _expand(spec, target.get("src", []))
        dst_p = _expand(spec, target.get("dst", []))
        fams = sorted({p[0] for p in src_p + dst_p}) or [4, 6]
        family = draw(st.sampled_from(fams))
        proto = target.get("proto")
        names = [] if proto is None or proto == "any" else ([proto] if isinstance(proto, str) else proto)
        classes = [c for n in names if n != "any" for c in _CLASSES_OF[n]] or list(L4_CLASSES)
        if target.get("tcp_flags"):
            classes = [C.XG_L4_TCP_SYN, C.XG_L4_TCP]
        classes = [c for c in classes if family == 6 or c != C.XG_L4_ND] or [C.XG_L4_OTHER]
        l4 = draw(st.sampled_from(classes))
        src_p = [p for p in src_p if p[0] == family] or _policy_prefixes(spec, family)
        dst_p = [p for p in dst_p if p[0] == family] or _policy_prefixes(spec, family)
        edges = target.get("sport", []) + target.get("dport", []) or _policy_ports(spec)
    else:
        family = draw(st.sampled_from((4, 6)))
        l4 = draw(st.sampled_from(L4_CLASSES if family == 6 else L4_CLASSES[:-1]))
        src_p = dst_p = _policy_prefixes(spec, family)
        edges = _policy_ports(spec)
    src = draw(addresses(family, src_p))
    dst = draw(addresses(family, dst_p))
    sport = dport = None
    if l4 in PORT_CLASSES:
        if draw(st.integers(0, 5)) == 0:
            # a non-first fragment: no ports, never SYN
            if l4 == C.XG_L4_TCP_SYN:
                l4 = C.XG_L4_TCP
        else:
            sport = draw(ports(edges))
            dport = draw(ports(edges))
    return family, src, dst, l4, sport, dport


# ---------------------------------------------------------------- the properties

def _unreachable(policy) -> set[int]:
    out = set()
    for w in find_unreachable(policy):
        m = re.search(r"\(rule (\d+)\): can never match", w)
        assert m, w
        out.add(int(m.group(1)) - 1)
    return out


def check_spec(spec, data, npackets, tmp_path):
    path = tmp_path / "prop.toml"
    policy = load(path, text=render(spec))
    assert [r.name for r in policy.rules] == [f"r{i}" for i in range(len(spec["rules"]))]
    tables = compile_policy(policy)
    assert tables.nwords == max(1, (len(spec["rules"]) + 63) // 64)
    oracle = Oracle(spec)
    unreachable = _unreachable(policy)
    for _ in range(npackets):
        family, src, dst, l4, sport, dport = data.draw(packets(spec))
        ip = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
        want = oracle.decide(ip(src), ip(dst), l4, sport, dport)
        got = decide(tables, family, src, dst, l4, sport, dport)
        assert (got.index, got.action, got.verdict) == want, (
            f"packet family={family} src={ip(src)} dst={ip(dst)} l4={l4} sport={sport} dport={dport}: "
            f"tables say {got}, first match says {want}")
        assert got.rule == (None if want[0] is None else f"r{want[0]}")
        assert got.index not in unreachable, f"rule {got.index + 1} matched but was reported unreachable"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=policy_specs(), data=st.data())
def test_tables_agree_with_first_match(spec, data, tmp_path_factory):
    check_spec(spec, data, 25, tmp_path_factory.getbasetemp())


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=policy_specs(min_rules=65, max_rules=200), data=st.data())
def test_tables_agree_with_first_match_multiword(spec, data, tmp_path_factory):
    """More than 64 rules: vectors of several 64-bit words."""
    check_spec(spec, data, 40, tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------- hand-picked cases

def _rule(i, action="deny", src=None, dst=None, protos=None, sport=None, dport=None, syn=False):
    return Rule(name=f"r{i}", index=i, action=action, src=src, dst=dst, protos=protos,
                sport=sport, dport=dport, syn_only=syn)


def _policy(rules, default="allow"):
    return Policy(name="t", default=default, rules=rules, sets={}, mitigation=Mitigation())


def _p(text):
    n = ipaddress.ip_network(text)
    return Prefix(n.version, int(n.network_address), n.prefixlen)


def test_rule_in_last_word_after_many_misses():
    """Rule 130 (third word) is the first match when 0..129 do not match."""
    rules = [_rule(i, src=(_p(f"10.{i}.0.0/16"),)) for i in range(130)]
    rules.append(_rule(130, action="allow", src=(_p("10.0.0.0/8"),)))
    t = compile_policy(_policy(rules, default="deny"))
    assert t.nwords == 3
    a = int(ipaddress.IPv4Address("10.200.1.1"))
    assert decide(t, 4, a, 0, C.XG_L4_UDP, 1, 2).rule == "r130"
    assert decide(t, 4, int(ipaddress.IPv4Address("10.129.0.1")), 0, C.XG_L4_UDP, 1, 2).rule == "r129"
    assert decide(t, 4, int(ipaddress.IPv4Address("11.0.0.1")), 0, C.XG_L4_UDP, 1, 2).rule is None


def test_nd_only_for_rules_naming_icmpv6():
    rules = [_rule(0, action="deny"),                                          # any proto
             _rule(1, action="allow", protos=frozenset({"icmpv6"}), src=(_p("fe80::/10"),))]
    t = compile_policy(_policy(rules, default="deny"))
    ll, glob = int(ipaddress.IPv6Address("fe80::1")), int(ipaddress.IPv6Address("2001:db8::1"))
    assert decide(t, 6, ll, 0, C.XG_L4_ND, None, None).rule == "r1"
    d = decide(t, 6, glob, 0, C.XG_L4_ND, None, None)
    assert (d.rule, d.verdict) == (None, "pass")
    assert decide(t, 6, glob, 0, C.XG_L4_ICMPV6, None, None).rule == "r0"


def test_fragments_skip_port_and_flag_rules():
    rules = [_rule(0, protos=frozenset({"tcp"}), dport=((80, 80),)),
             _rule(1, protos=frozenset({"tcp"}), syn=True),
             _rule(2, action="allow", protos=frozenset({"tcp"}))]
    t = compile_policy(_policy(rules))
    assert decide(t, 4, 1, 2, C.XG_L4_TCP, None, None).rule == "r2"
    assert decide(t, 4, 1, 2, C.XG_L4_TCP_SYN, 1000, 80).rule == "r0"
    assert decide(t, 4, 1, 2, C.XG_L4_TCP_SYN, 1000, 81).rule == "r1"


def test_source_vectors_that_decide_alone():
    """struct xg_vec.decides: set exactly for source vectors whose lowest
    rule matches any protocol (but ND), port and destination."""
    from xdpguard.compiler import decides
    rules = [_rule(0, src=(_p("10.1.0.0/16"),), protos=frozenset({"tcp"}), dport=((22, 22),)),
             _rule(1, src=(_p("10.0.0.0/8"),)),                                 # blocklist-like
             _rule(2, action="allow", src=(_p("192.0.2.0/24"),)),
             _rule(3, action="allow", dst=(_p("198.51.100.0/24"),))]
    t = compile_policy(_policy(rules, default="deny"))
    u = t.universal
    assert u == 0b0110     # r0 names ports, r3 a narrow dst
    vec = {value: t.vecs[v] for dim, value, plen, v in t.lpm[4] if dim == C.XG_DIM_SRC}
    a = lambda text: int(ipaddress.IPv4Address(text))   # noqa: E731
    assert decides(vec[a("10.0.0.0")], u) == 2           # r1 + 1
    assert decides(vec[a("10.1.0.0")], u) == 0           # r0 comes first and names a port
    assert decides(vec[a("192.0.2.0")], u) == 3
    assert decides(vec[0], u) == 0                        # only r3 (narrow dst)
    # The shortcut and the full AND agree, ND excepted.
    assert decide(t, 4, a("10.1.2.3"), 0, C.XG_L4_TCP, 1, 22).rule == "r0"
    assert decide(t, 4, a("10.1.2.3"), 0, C.XG_L4_TCP, 1, 23).rule == "r1"
    assert decide(t, 4, a("10.9.9.9"), 0, C.XG_L4_UDP, None, None).rule == "r1"
    assert decide(t, 4, a("192.0.2.1"), a("198.51.100.1"), C.XG_L4_ICMP, None, None).rule == "r2"
    # Universal means for both families: a dst of 0.0.0.0/0 is not ::/0.
    t2 = compile_policy(_policy(rules[:3] + [_rule(3, dst=(_p("0.0.0.0/0"),))]))
    assert t2.universal == 0b0110
    assert decide(t, 4, a("203.0.113.1"), a("198.51.100.1"), C.XG_L4_UDP, 1, 2).rule == "r3"


# ---------------------------------------------------------------- scale

def test_100k_prefixes_compile(tmp_path):
    rnd = random.Random(7)
    lines = set()
    while len(lines) < 95_000:
        plen = rnd.choice((16, 20, 24, 24, 28, 32, 32, 32))
        v = rnd.getrandbits(32) >> (32 - plen) << (32 - plen)
        lines.add(f"{ipaddress.IPv4Address(v)}/{plen}")
    while len(lines) < 100_000:
        plen = rnd.choice((32, 48, 64, 128))
        v = (0x2001_0db8 << 96 | rnd.getrandbits(96)) >> (128 - plen) << (128 - plen)
        lines.add(f"{ipaddress.IPv6Address(v)}/{plen}")
    (tmp_path / "big.netset").write_text("\n".join(sorted(lines)) + "\n")
    (tmp_path / "p.toml").write_text(
        '[sets]\nbig = { file = "big.netset" }\nadmin = ["192.0.2.0/24"]\n'
        '[[rule]]\nname = "admin"\nsrc = "@admin"\nproto = "tcp"\ndport = 22\naction = "allow"\n'
        '[[rule]]\nname = "big"\nsrc = "@big"\naction = "deny"\n'
        '[[rule]]\nname = "web"\nproto = "tcp"\ndport = [80, 443]\naction = "limit"\nrate = "100/s"\n')
    policy = load(tmp_path / "p.toml")
    assert len(policy.sets["big"]) == 100_000
    t = compile_policy(policy)
    s = t.summary()
    assert s["lpm4_entries"] + s["lpm6_entries"] >= 100_000
    assert s["vectors"] < 50                       # 100k prefixes share a few vectors
    # every listed prefix decides to 'big' (or the admin rule for SSH from 192.0.2.0/24)
    for text in rnd.sample(sorted(lines), 300):
        n = ipaddress.ip_network(text)
        for a in (n.network_address, n.broadcast_address):
            d = decide(t, n.version, int(a), 0, C.XG_L4_UDP, 1, 53)
            assert d.rule == "big", (text, d)
