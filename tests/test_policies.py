"""The example policies in policies/: they pass `xdpguard check` without
warnings and decide sample packets the way their comments say."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xdpguard import cli

POLICIES = Path(__file__).resolve().parent.parent / "policies"
EXAMPLES = ("shared-web-host.toml", "amplification-guard.toml", "ipv6-host.toml", "lab.toml")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def explain(capsys, policy, **fields):
    argv = ["explain", POLICIES / policy, "--json"]
    for k, v in fields.items():
        argv += [f"--{k.replace('_', '-')}", v]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert err == ""
    d = json.loads(out)
    # A limit rule's rate and burst come with it (and only with a limit rule).
    limit = d.pop("limit", None)
    assert (limit is not None) == (d["action"] == "limit")
    assert limit is None or limit["rate"] and limit["burst"] >= 1
    return d


def verdict(rule, action, v):
    """explain's answer; rule None: the policy default, the rule "default"."""
    return {"rule": rule or "default", "action": action, "verdict": v}


# ---------------------------------------------------------------- check

def test_all_examples_present():
    present = {p.name for p in POLICIES.glob("*.toml")}
    assert set(EXAMPLES) <= present


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.toml")))
def test_check_passes_without_warnings(capsys, name):
    code, out, err = run(capsys, "check", POLICIES / name)
    assert code == 0, err
    assert "valid policy" in out
    assert "warning" not in out and "warning" not in err
    code, out, err = run(capsys, "check", POLICIES / name, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["valid"] is True
    assert summary["warnings"] == []
    assert summary["rules"] >= 3


def test_shared_web_host_summary(capsys):
    code, out, _ = run(capsys, "check", POLICIES / "shared-web-host.toml", "--json")
    s = json.loads(out)
    assert s["policy"] == "shared-web-host" and s["default"] == "allow"
    assert s["mitigation"] is True
    assert s["prefixes_v4"] > 6000            # the FireHOL import
    # 6000+ blocklist prefixes share a handful of vectors
    assert s["maps"]["vecs"] < 40


def test_shared_web_host_mitigation():
    from xdpguard.policy import load
    p = load(POLICIES / "shared-web-host.toml")
    m = p.mitigation
    assert m.enabled and not m.dry_run
    assert m.syn_rate and m.conn_rate and m.pps and m.bps
    assert m.ban < m.ban_max
    assert set(m.allow) == set(p.sets["admin"])
    # the admin rule comes before the blocklist rule (the list holds the TEST-NETs)
    order = [r.name for r in p.rules]
    assert order.index("admin-ssh") < order.index("blocklist") < order.index("no-ssh")


def test_lab_does_not_import_the_blocklist():
    from xdpguard.policy import load
    text = (POLICIES / "lab.toml").read_text()
    assert "file =" not in text
    p = load(POLICIES / "lab.toml")
    assert [r.name for r in p.rules] == ["ping-client", "app-8080", "http-per-source",
                                         "spoofed-udp", "no-ssh"]
    assert p.default == "allow"


def test_operator_forms(tmp_path):
    """Rates, durations and protect entries as the README's units table
    writes them."""
    from xdpguard.policy import load, parse_prefix
    p = tmp_path / "forms.toml"
    p.write_text("""[policy]
protect = ["192.0.2.10:22", "[2001:db8::1]:22", "[2001:db8::1:22]", "2001:db8::5", "[2001:db8::/64]:443"]

[[rule]]
name = "per-minute"
proto = "tcp"
dport = 25
action = "limit"
rate = "10/min"

[[rule]]
name = "tc-style"
proto = "udp"
action = "limit"
rate = "100mbit"
burst = 1500000

[mitigation]
enabled = true
syn_rate = "6000/min"
conn_rate = "600/h"
pps = "20kpps"
bps = "100Mbps"
window = "10s"
ban = "1h30m"
ban_max = "1w"
""")
    pol = load(p)
    pfx = [parse_prefix(a)[0] for a in ("192.0.2.10", "2001:db8::1", "2001:db8::1:22", "2001:db8::5", "2001:db8::/64")]
    assert pol.protect == tuple(zip(pfx, (22, 22, None, None, 443)))
    assert pol.rules[0].rate.per_second == 10 / 60 and pol.rules[0].rate.unit == "packets"
    assert pol.rules[0].burst == 1
    assert pol.rules[1].rate.per_second == 12.5e6 and pol.rules[1].rate.unit == "bytes"
    m = pol.mitigation
    assert (m.syn_rate.per_second, m.conn_rate.per_second, m.pps.per_second) == (100, 600 / 3600, 20000)
    assert m.bps.per_second == 12.5e6 and m.bps.unit == "bytes"
    assert (m.window, m.ban, m.ban_max) == (10, 5400, 604800)


# ---------------------------------------------------------------- explain

WEB = "shared-web-host.toml"


@pytest.mark.parametrize("fields, expect", [
    # blocklisted sources: a FireHOL entry and a private range (fullbogons)
    (dict(src="185.220.101.1", proto="tcp", dport=80), verdict("blocklist", "deny", "drop")),
    (dict(src="10.1.2.3", proto="udp", dport=53), verdict("blocklist", "deny", "drop")),
    (dict(src="192.168.7.7", proto="icmp"), verdict("blocklist", "deny", "drop")),
    # admin SSH, even from TEST-NET addresses that are on the blocklist
    (dict(src="192.0.2.10", proto="tcp", dport=22, tcp_flags="syn"), verdict("admin-ssh", "allow", "pass")),
    (dict(src="198.51.100.7", proto="tcp", dport=22), verdict("admin-ssh", "allow", "pass")),
    (dict(src="2001:db8:a0:1::5", proto="tcp", dport=22), verdict("admin-ssh", "allow", "pass")),
    # ... but only SSH: their other traffic meets the blocklist
    (dict(src="192.0.2.10", proto="tcp", dport=80), verdict("blocklist", "deny", "drop")),
    # other SSH
    (dict(src="198.51.100.8", proto="tcp", dport=22), verdict("blocklist", "deny", "drop")),
    (dict(src="8.8.8.8", proto="tcp", dport=22, tcp_flags="syn"), verdict("no-ssh", "deny", "drop")),
    (dict(src="2001:db8:ff::1", proto="tcp", dport=22), verdict("no-ssh", "deny", "drop")),
    # web: limited per source
    (dict(src="8.8.8.8", proto="tcp", dport=443, tcp_flags="syn"), verdict("web-syn-per-source", "limit", "limit")),
    (dict(src="8.8.8.8", proto="tcp", dport=80), verdict("web-per-source", "limit", "limit")),
    (dict(src="2001:db8:ff::1", proto="tcp", dport=443), verdict("web-per-source", "limit", "limit")),
    (dict(src="9.9.9.9", proto="udp", dport=443), verdict("quic-per-source", "limit", "limit")),
    # anything else: default allow
    (dict(src="8.8.8.8", proto="udp", dport=53), verdict(None, "allow", "pass")),
    (dict(src="1.1.1.1", proto="tcp", dport=25), verdict(None, "allow", "pass")),
])
def test_shared_web_host_explain(capsys, fields, expect):
    assert explain(capsys, WEB, **fields) == expect


AMP = "amplification-guard.toml"


@pytest.mark.parametrize("fields, expect", [
    # reflected traffic: from the reflector ports to an arbitrary port
    (dict(src="203.0.113.5", proto="udp", sport=123, dport=4444), verdict("udp-reflection", "deny", "drop")),
    (dict(src="203.0.113.5", proto="udp", sport=53, dport=80), verdict("udp-reflection", "deny", "drop")),
    (dict(src="203.0.113.5", proto="udp", sport=1900, dport=1024), verdict("udp-reflection", "deny", "drop")),
    (dict(src="2001:db8:bad::1", proto="udp", sport=11211, dport=65535), verdict("udp-reflection", "deny", "drop")),
    # DNS "replies" from a server the resolver does not ask, even to the resolver ports
    (dict(src="203.0.113.5", proto="udp", sport=53, dport=20500), verdict("udp-reflection", "deny", "drop")),
    # replies from an upstream server, but outside the resolver port range
    (dict(src="192.0.2.53", proto="udp", sport=53, dport=21000), verdict("udp-reflection", "deny", "drop")),
    # legitimate replies
    (dict(src="192.0.2.53", proto="udp", sport=53, dport=20000), verdict("dns-replies", "allow", "pass")),
    (dict(src="198.51.100.53", proto="udp", sport=53, dport=20999), verdict("dns-replies", "allow", "pass")),
    (dict(src="2001:db8:53::53", proto="udp", sport=53, dport=20123), verdict("dns-replies", "allow", "pass")),
    (dict(src="203.0.113.123", proto="udp", sport=123, dport=123), verdict("ntp-replies", "allow", "pass")),
    # not a reflector for memcached
    (dict(src="203.0.113.5", proto="udp", sport=40000, dport=11211), verdict("no-memcached-udp", "deny", "drop")),
    # unrelated traffic: default allow (TCP from port 53 is not reflection)
    (dict(src="203.0.113.5", proto="tcp", sport=53, dport=4444), verdict(None, "allow", "pass")),
    (dict(src="203.0.113.5", proto="udp", sport=40000, dport=53), verdict(None, "allow", "pass")),
])
def test_amplification_guard_explain(capsys, fields, expect):
    assert explain(capsys, AMP, **fields) == expect


V6 = "ipv6-host.toml"


@pytest.mark.parametrize("fields, expect", [
    # neighbour discovery from link-local and global sources, to multicast and unicast
    (dict(src="fe80::1", dst="ff02::1:ff00:10", proto="icmpv6", icmp_type=135), verdict("icmpv6", "allow", "pass")),
    (dict(src="fe80::1", dst="ff02::1", proto="icmpv6", icmp_type=134), verdict("icmpv6", "allow", "pass")),
    (dict(src="2001:db8:ff::77", dst="2001:db8:1::10", proto="icmpv6", icmp_type=136), verdict("icmpv6", "allow", "pass")),
    (dict(src="2001:db8:ff::77", proto="icmpv6", icmp_type=128), verdict("icmpv6", "allow", "pass")),
    (dict(src="2001:db8:ff::77", proto="icmpv6", icmp_type=2), verdict("icmpv6", "allow", "pass")),
    # SSH: admin /48 only
    (dict(src="2001:db8:a0:ffff::1", proto="tcp", dport=22, tcp_flags="syn"), verdict("admin-ssh", "allow", "pass")),
    (dict(src="2001:db8:a1::1", proto="tcp", dport=22, tcp_flags="syn"), verdict(None, "deny", "drop")),
    # web open
    (dict(src="2001:db8:ff::77", proto="tcp", dport=443, tcp_flags="syn"), verdict("web", "allow", "pass")),
    (dict(src="2001:db8:ff::77", proto="udp", dport=443), verdict("quic", "allow", "pass")),
    # replies to the host's own connections
    (dict(src="2001:db8:ff::77", proto="tcp", sport=443, dport=40000), verdict("tcp-replies", "allow", "pass")),
    (dict(src="2001:db8:ff::77", proto="tcp", sport=443, dport=40000, tcp_flags="syn"),
     verdict("no-syn-to-ephemeral", "deny", "drop")),
    (dict(src="2001:db8:ff::53", proto="udp", sport=53, dport=50000), verdict("dns-replies", "allow", "pass")),
    # everything else: default deny
    (dict(src="2001:db8:ff::77", proto="udp", dport=5353), verdict(None, "deny", "drop")),
    (dict(src="2001:db8:ff::77", proto="tcp", dport=25), verdict(None, "deny", "drop")),
    # IPv4: dropped, web included
    (dict(src="192.0.2.1", proto="tcp", dport=80), verdict("no-ipv4", "deny", "drop")),
    (dict(src="192.0.2.1", proto="icmp", icmp_type=8), verdict("no-ipv4", "deny", "drop")),
])
def test_ipv6_host_explain(capsys, fields, expect):
    assert explain(capsys, V6, **fields) == expect


def test_nd_passes_under_default_deny_without_icmpv6_rule(capsys, tmp_path):
    """The built-in ND pass: no rule names icmpv6, default deny."""
    text = (POLICIES / V6).read_text()
    start = text.index("[[rule]]\nname = \"icmpv6\"")
    end = text.index("[[rule]]", start + 1)
    p = tmp_path / "no-icmpv6.toml"
    p.write_text(text[:start] + text[end:])
    for src, dst, t in (("fe80::1", "ff02::1:ff00:10", 135), ("fe80::9", "ff02::2", 133),
                        ("2001:db8:ff::77", "2001:db8:1::10", 136), ("fe80::1", "ff02::1", 134),
                        ("fe80::1", "2001:db8:1::10", 137)):
        code, out, err = run(capsys, "explain", p, "--src", src, "--dst", dst, "--proto", "icmpv6",
                             "--icmp-type", t, "--json")
        assert code == 0, err
        # no rule, and not the default either: the built-in pass
        assert json.loads(out) == {"rule": None, "action": "allow", "verdict": "pass"}
    # an echo request is not ND: default deny
    code, out, _ = run(capsys, "explain", p, "--src", "fe80::1", "--proto", "icmpv6", "--icmp-type", 128, "--json")
    assert json.loads(out) == verdict(None, "deny", "drop")


LAB = "lab.toml"


@pytest.mark.parametrize("fields, expect", [
    (dict(src="10.200.0.2", dst="10.200.0.1", proto="icmp", icmp_type=8), verdict("ping-client", "allow", "pass")),
    (dict(src="10.200.0.11", dst="10.200.0.1", proto="icmp", icmp_type=8), verdict(None, "allow", "pass")),
    (dict(src="10.200.0.2", dst="10.200.0.1", proto="tcp", dport=8080, tcp_flags="syn"), verdict("app-8080", "allow", "pass")),
    (dict(src="10.200.0.20", dst="10.200.0.1", proto="tcp", dport=8080), verdict("app-8080", "allow", "pass")),
    (dict(src="10.200.1.8", dst="10.200.0.1", proto="tcp", dport=8080), verdict(None, "allow", "pass")),
    (dict(src="10.200.0.2", dst="10.200.0.1", proto="tcp", dport=80, tcp_flags="syn"), verdict("http-per-source", "limit", "limit")),
    (dict(src="10.200.0.10", dst="10.200.0.1", proto="tcp", dport=80), verdict("http-per-source", "limit", "limit")),
    (dict(src="10.200.1.77", dst="10.200.0.1", proto="udp", dport=9), verdict("spoofed-udp", "deny", "drop")),
    (dict(src="10.200.1.255", dst="10.200.0.1", proto="udp", sport=53, dport=53), verdict("spoofed-udp", "deny", "drop")),
    (dict(src="10.200.0.2", dst="10.200.0.1", proto="udp", dport=9), verdict(None, "allow", "pass")),
    (dict(src="10.200.0.2", dst="10.200.0.1", proto="tcp", dport=22, tcp_flags="syn"), verdict("no-ssh", "deny", "drop")),
    (dict(src="10.200.1.5", dst="10.200.0.1", proto="tcp", dport=22), verdict("no-ssh", "deny", "drop")),
])
def test_lab_explain(capsys, fields, expect):
    assert explain(capsys, LAB, **fields) == expect
