"""The kernel against `explain`: hypothesis-generated policies and packets
through the real program, lookup.decide and a direct first-match
evaluation of the rules; the `xdpguard test --packets --json` CLI against
explain.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import require_kernel
from dataplane_fixtures import ALLOW_POLICY
from testing.timing import scaled
from testrun import compile_text, make_rig, reset_buckets, run
from xdpguard import lookup, packet
from xdpguard.layout import C
from xdpguard.lookup import decide
from xdpguard.packet import build

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
BIG_SHAPE = dict(nwords=2, vec_per_gen=1024)


# ---------------------------------------------------------------- test vs explain (hypothesis)

# Nested, disjoint and adjacent prefixes (an adjacent pair is where an LPM
# compiler gets containment wrong), and hosts on every edge.
P4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.1.2.4/30", "10.1.2.8/32",
      "192.0.2.0/25", "192.0.2.128/25", "0.0.0.0/0"]
P6 = ["2001:db8::/32", "2001:db8:1::/48", "2001:db8:2::/48", "2001:db8:1::5/128", "2001:db8:1::6/127",
      "fe80::/10", "::/0"]
HOSTS4 = ["10.1.2.3", "10.1.2.4", "10.1.2.7", "10.1.2.8", "10.1.2.9", "10.1.3.1", "10.2.0.1", "192.0.2.1",
          "192.0.2.127", "192.0.2.128", "192.0.2.255", "8.8.8.8", "0.0.0.0"]
HOSTS6 = ["2001:db8:1::5", "2001:db8:1::6", "2001:db8:1::7", "2001:db8:1::8", "2001:db8:2::1",
          "2001:db8:3::1", "fe80::1", "2001:db9::1", "::"]
PORTS = [0, 22, 53, 80, 443, 1023, 1024, 1500, 2000, 2001, 65535]
PORT_SPECS = ["22", "53", "80", "443", '"1000-2000"', '"0-1023"', "65535", '"2001-65535"']


def _q(s):
    return json.dumps(s)


@st.composite
def policies(draw):
    nrules = draw(st.integers(1, 10))
    lines = [f'[policy]\nname = "hyp"\ndefault = {_q(draw(st.sampled_from(["allow", "deny"])))}\n']
    filler = draw(st.sampled_from([0, 0, 0, 70]))    # push rules into the second vector word
    for i in range(filler):
        lines.append(f'[[rule]]\nname = "f{i}"\nsrc = "100.64.{i}.1"\naction = "deny"\n')
    for i in range(nrules):
        r = [f'name = "r{i}"']
        if draw(st.booleans()):
            r.append("src = [" + ", ".join(_q(p) for p in draw(st.lists(st.sampled_from(P4 + P6), min_size=1,
                                                                             max_size=3))) + "]")
        if draw(st.integers(0, 3)) == 0:
            r.append("dst = [" + ", ".join(_q(p) for p in draw(st.lists(st.sampled_from(P4 + P6), min_size=1,
                                                                             max_size=2))) + "]")
        proto = draw(st.sampled_from([None, "tcp", "udp", "icmp", "icmpv6", ["tcp", "udp"], "any"]))
        if proto is not None:
            r.append(f"proto = {json.dumps(proto)}")
        if proto in ("tcp", "udp", ["tcp", "udp"]):
            for fld in ("sport", "dport"):
                if draw(st.integers(0, 2)) == 0:
                    r.append(f"{fld} = [" + ", ".join(draw(st.lists(st.sampled_from(PORT_SPECS), min_size=1,
                                                                     max_size=2, unique=True))) + "]")
            if proto == "tcp" and draw(st.integers(0, 3)) == 0:
                r.append('tcp_flags = "syn"')
        action = draw(st.sampled_from(["allow", "deny", "deny", "limit"]))
        r.append(f"action = {_q(action)}")
        if action == "limit":
            r.append(f'rate = "{draw(st.sampled_from(["1/s", "1G/s", "1Mbit/s"]))}"')
            r.append(f'per = {_q(draw(st.sampled_from(["source", "rule"])))}')
        lines.append("[[rule]]\n" + "\n".join(r) + "\n")
    return "\n".join(lines)


@st.composite
def frames(draw):
    fam = draw(st.sampled_from([4, 6]))
    hosts = HOSTS4 if fam == 4 else HOSTS6
    src, dst = draw(st.sampled_from(hosts)), draw(st.sampled_from(hosts))
    proto = draw(st.sampled_from(["tcp", "tcp", "udp", "udp", "icmp", "icmpv6", "gre", "esp"]))
    kw = {}
    if proto in ("tcp", "udp"):
        kw["sport"] = draw(st.sampled_from(PORTS) | st.integers(0, 65535))
        kw["dport"] = draw(st.sampled_from(PORTS) | st.integers(0, 65535))
    if proto == "tcp":
        kw["tcp_flags"] = draw(st.sampled_from(["syn", "ack", "syn,ack", None, "fin,syn", "rst"]))
    if proto == "icmpv6":
        kw["icmp_type"] = draw(st.sampled_from([128, 129, 133, 134, 135, 136, 137, 1, 143]))
    kw["vlans"] = draw(st.sampled_from([(), (), (7,), (1, 2)]))
    frag = draw(st.sampled_from([None, None, None, (0, True), (5, False)]))
    if frag is not None:
        kw["fragment"] = frag
    if fam == 6 and draw(st.integers(0, 3)) == 0:
        kw["ipv6_exthdrs"] = [("hop",), ("dst",)]
    return build(src, dst, proto, **kw)


def first_match(policy, pkt):
    """Direct first-match evaluation of the rules (no tables): the spec."""
    name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(pkt.proto)
    for r in policy.rules:
        if r.src is not None and not any(p.contains(pkt.family, int(pkt.src)) for p in r.src):
            continue
        if r.dst is not None and not any(p.contains(pkt.family, int(pkt.dst)) for p in r.dst):
            continue
        if r.protos is None:
            if pkt.l4 == C.XG_L4_ND:
                continue
        elif name not in r.protos:
            continue
        if r.syn_only and pkt.l4 != C.XG_L4_TCP_SYN:
            continue
        ok = True
        for ranges, port in ((r.sport, pkt.sport), (r.dport, pkt.dport)):
            if ranges is not None and (port is None or not any(lo <= port <= hi for lo, hi in ranges)):
                ok = False
        if ok:
            return r
    return None


@pytest.fixture(scope="module")
def big_rig():
    _, tables = compile_text(ALLOW_POLICY)
    rig = make_rig(tables, **BIG_SHAPE)
    yield rig
    rig.close()


ADJACENT_EXAMPLE = """
[policy]
default = "allow"
[[rule]]
name = "low-half"
src = ["192.0.2.0/25", "2001:db8:1::/48", "10.1.2.3"]
action = "deny"
[[rule]]
name = "high-half"
src = ["192.0.2.128/25", "2001:db8:2::/48", "10.1.2.4/30"]
proto = "udp"
action = "limit"
rate = "1/s"
"""


@settings(max_examples=int(os.environ.get("XG_HYP_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=policies(), pkts=st.lists(frames(), min_size=1, max_size=40))
@example(text=ADJACENT_EXAMPLE, pkts=[build(s, d, p) for s, d in (("192.0.2.128", "10.0.0.1"),
                                                                  ("192.0.2.127", "10.0.0.1"),
                                                                  ("2001:db8:2::1", "2001:db8::1"),
                                                                  ("10.1.2.4", "10.0.0.1"))
                                      for p in ("tcp", "udp")])
def test_kernel_agrees_with_explain(big_rig, text, pkts):
    policy, tables = compile_text(text, "hyp.toml")
    rig = big_rig
    rig.load(tables)
    for frame in pkts:
        pkt = packet.parse(frame)
        assert isinstance(pkt, packet.Packet)
        d = decide(tables, pkt.family, int(pkt.src), int(pkt.dst), pkt.l4, pkt.sport, pkt.dport)
        fm = first_match(policy, pkt)
        assert d.rule == (fm.name if fm else None), f"lookup {d.rule} vs first-match {fm and fm.name}"
        reset_buckets(rig)
        # Fresh buckets: a limit rule's first packet is within its burst.
        got, ref = run(rig, frame), lookup.verdict(frame, tables)
        assert got == ref, f"kernel {got}, reference {ref}; frame {frame.hex()}\n{text}"
        assert got.rule == d.rule and got.reason == ("rule" if d.rule else "nd" if pkt.l4 == C.XG_L4_ND
                                                     else "default")


# ---------------------------------------------------------------- the CLI

CLI_PACKETS = [
    {"src": "192.0.2.5", "proto": "tcp", "dport": 22, "tcp_flags": "syn"},
    {"src": "192.0.2.100", "dport": 22},
    {"src": "2001:db8:a::1", "dst": "2001:db8::1", "proto": "tcp", "dport": 22},
    {"src": "203.0.113.5", "proto": "udp", "sport": 1, "dport": 2},
    {"src": "192.0.2.100", "proto": "tcp", "dport": 8080, "tcp_flags": "syn"},
    {"src": "192.0.2.100", "proto": "tcp", "dport": 8080},
    {"src": "192.0.2.100", "proto": "udp", "sport": 53, "dport": 4444},
    {"src": "192.0.2.100", "proto": "udp", "dport": 123},
    {"src": "192.0.2.100", "dst": "198.51.100.99", "proto": "icmp"},
    {"src": "2001:db8::7", "dst": "2001:db8:99::1", "proto": "icmpv6"},
    {"src": "2001:db8::7", "proto": "icmpv6", "icmp_type": 135},
    {"src": "2001:db8:bad::1", "proto": "icmpv6", "icmp_type": 134},
    {"src": "198.51.100.200", "proto": "gre"},
    {"src": "192.0.2.100", "proto": 47},
    {"src": "192.0.2.100", "dport": 22, "vlan": [100, 200]},
    {"src": "192.0.2.100", "dst": "198.51.100.60", "proto": "udp"},
    {"src": "192.0.2.100", "dst": "198.51.100.61", "proto": "udp", "dport": 9000, "count": 10},
    {"src": "2001:db8::7", "dst": "2001:db8:2::1", "proto": "tcp", "dport": 443},
]
# A frame that never reaches a rule: its reason, and a malformed one's cause.
CLI_VLANS = ({"src": "192.0.2.100", "dport": 22, "vlan": [1, 2, 3]},
             {"rule": None, "action": "deny", "verdict": "drop", "result": "drop", "reason": "malformed",
              "cause": "vlans"})


def test_cli_test_matches_explain(tmp_path):
    require_kernel()
    pol = tmp_path / "p.toml"
    pol.write_text(ALLOW_POLICY)
    pk = tmp_path / "packets.jsonl"
    pk.write_text("\n".join(json.dumps(p) for p in CLI_PACKETS + [CLI_VLANS[0]]) + "\n")
    exe = REPO / ".venv" / "bin" / "xdpguard"
    if not exe.exists():
        exe = Path(sys.executable).parent / "xdpguard"
    out = subprocess.run([str(exe), "test", str(pol), "--packets", str(pk), "--json"],
                         capture_output=True, text=True, timeout=scaled(120, cap=900), cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(CLI_PACKETS) + 1
    assert lines.pop() == {"packet": CLI_VLANS[0], **CLI_VLANS[1]}
    assert [ln["packet"] for ln in lines] == CLI_PACKETS     # each line names its packet
    _, tables = compile_text(ALLOW_POLICY)
    for d, got in zip(CLI_PACKETS, lines):
        d = dict(d)
        count = d.pop("count", 1)
        frame = packet.from_fields(d)
        pkt = packet.parse(frame)
        want = decide(tables, pkt.family, int(pkt.src), int(pkt.dst), pkt.l4, pkt.sport, pkt.dport).as_json()
        assert {k: got[k] for k in ("rule", "action", "verdict")} == want, f"{d}: test {got}, explain {want}"
        if want["verdict"] != "limit":
            assert got["result"] == want["verdict"], got
        if count > 1:
            assert (got["passed"], got["dropped"]) == (1, count - 1), got     # lim-tight: 1/s burst 1
    # The explain command itself, for lines it can express (no vlan / count / flag words).
    for i in (0, 2, 6, 10, 12):
        d = CLI_PACKETS[i]
        args = [str(exe), "explain", str(pol), "--json"]
        for k, v in d.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        ex = subprocess.run(args, capture_output=True, text=True, timeout=scaled(60, cap=600), cwd=REPO)
        assert ex.returncode == 0, ex.stderr
        got = json.loads(ex.stdout)
        assert got == {k: lines[i][k] for k in ("rule", "action", "verdict")}, (d, got, lines[i])
