"""Issue 17, "Show and compare": `show`, `apply --diff` and apply's
summary line, `check`'s protect warning, `test --packets` with expect,
`explain` of a limit rule. The running policy is a real apply in a lab
namespace."""
from __future__ import annotations

import json

import pytest

from test_policy_errors import run, write

POLICY = """\
[policy]
name = "cmp"
default = "deny"

[[rule]]
name = "ssh"
proto = "tcp"
dport = 22
action = "limit"
rate = "10/m"
burst = 5

[[rule]]
name = "web"
proto = "tcp"
dport = [80, 443]
action = "limit"
rate = "100Mbit/s"
per = "rule"

[[rule]]
name = "block"
src = "203.0.113.0/24"
action = "deny"
"""


# ---------------------------------------------------------------- explain

def test_explain_limit_shows_rate_and_burst(capsys, tmp_path):
    p = write(tmp_path, POLICY)
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.9", "--dport", 22)
    assert code == 0, err
    assert "rule 'ssh' (rule 1): limit 10/m burst 5 packets per source" in out
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.9", "--dport", 443, "--json")
    d = json.loads(out)
    assert d["rule"] == "web" and d["limit"]["rate"] == "100Mbit/s" and d["limit"]["per"] == "rule"
    assert d["limit"]["burst"] == 12_500_000 and d["limit"]["unit"] == "bytes"
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.9", "--dport", 443)
    assert "limit 100Mbit/s burst 12500000 bytes" in out
    # Not a limit rule: no limit key, and the default is named "default".
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.9", "--dport", 25, "--json")
    assert json.loads(out) == {"rule": "default", "action": "deny", "verdict": "drop"}
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.9", "--dport", 25)
    assert "rule 'default'" in out


# ---------------------------------------------------------------- test --packets, expect

@pytest.mark.kernel
def test_packets_echo_and_expect(capsys, tmp_path):
    p = write(tmp_path, POLICY)
    lines = [{"src": "192.0.2.9", "dport": 22, "expect": "limit"},
             {"src": "192.0.2.9", "dport": 25, "expect": {"verdict": "drop", "rule": "default"}},
             {"src": "203.0.113.5", "dport": 25, "expect": {"rule": "block"}},
             {"src": "192.0.2.9", "dport": 80, "count": 3}]
    pk = write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n", "packets.jsonl")
    code, out, err = run(capsys, "test", p, "--packets", pk, "--json")
    assert code == 0, err
    got = [json.loads(ln) for ln in out.splitlines()]
    assert [g["packet"] for g in got] == lines
    assert [g.get("ok") for g in got] == [True, True, True, None]
    assert got[1]["rule"] == "default"
    # Human lines repeat the packet too, and the default is "default", not "-".
    code, out, err = run(capsys, "test", p, "--packets", pk)
    assert code == 0, err
    for want, line in zip(lines, out.splitlines()):
        assert json.dumps(want) in line
    assert ": default: deny -> drop" in out.splitlines()[1]

    # One mismatch (verdict) and one (rule): exit 1, both marked, the rest run.
    bad = [{"src": "192.0.2.9", "dport": 25, "expect": "pass"},
           {"src": "192.0.2.9", "dport": 22, "expect": {"rule": "web"}},
           {"src": "203.0.113.5", "dport": 25, "expect": "drop"}]
    pk.write_text("\n".join(json.dumps(x) for x in bad) + "\n")
    code, out, err = run(capsys, "test", p, "--packets", pk)
    assert code == 1
    out_lines = out.splitlines()
    assert "MISMATCH: expected verdict pass (got drop)" in out_lines[0]
    assert "MISMATCH: expected rule web (got ssh)" in out_lines[1]
    assert out_lines[2].endswith("ok")
    assert "2 of 3 packets" in err
    code, out, err = run(capsys, "test", p, "--packets", pk, "--json")
    assert code == 1 and [json.loads(ln)["ok"] for ln in out.splitlines()] == [False, False, True]


@pytest.mark.parametrize("expect, needle", [
    ("accept", "expect verdict \"accept\" is not valid"),
    ({"rule": "sssh"}, "expect rule \"sssh\" is not a rule of the policy"),
    ({"verdict": "drop", "why": "x"}, "is not valid"),
    (3, "is not valid"),
])
def test_packets_bad_expect_is_usage_error(capsys, tmp_path, expect, needle):
    p = write(tmp_path, POLICY)
    pk = write(tmp_path, json.dumps({"src": "192.0.2.9", "expect": expect}) + "\n", "packets.jsonl")
    code, out, err = run(capsys, "test", p, "--packets", pk)
    assert code == 2 and out == ""
    assert f"{pk}:1: " in err and needle in err and "Traceback" not in err


# ---------------------------------------------------------------- check: protect

PROTECT = ('[policy]\ndefault = "allow"\nprotect = ["192.0.2.10:22", "198.51.100.7"]\n'
           '[[rule]]\nname = "nossh"\nproto = "tcp"\ndport = 22\naction = "deny"\n'
           '[[rule]]\nname = "noicmp"\nproto = "icmp"\naction = "deny"\n')


def test_check_warns_of_dropped_protect(capsys, tmp_path):
    from xdpguard import safety
    from xdpguard.compiler import compile_policy
    from xdpguard.policy import load
    p = write(tmp_path, PROTECT)
    code, out, err = run(capsys, "check", p, "--json")
    assert code == 0, err
    warnings = [w for w in json.loads(out)["warnings"] if "protect" in w]
    # apply's guard, the same function, finds the same (each once).
    policy = load(p)
    problems = safety.lockouts(policy, compile_policy(policy), None, protect_only=True).problems
    assert len(problems) == len(set(problems)) >= 2
    assert warnings == [f"{policy.source}: [policy] protect: {x} (apply refuses it without --force)"
                        for x in problems]
    assert any("'nossh'" in w and "192.0.2.10/32" in w for w in warnings)
    assert any("'noicmp'" in w and "198.51.100.7/32" in w for w in warnings)
    code, out, err = run(capsys, "check", p)
    assert code == 0 and out.count("warning:") == len(warnings)
    # Protected endpoints the rules let through: no warning.
    ok = write(tmp_path, PROTECT.replace("dport = 22", "dport = 23").replace('"icmp"', '"udp"'), "ok.toml")
    code, out, err = run(capsys, "check", ok, "--json")
    assert code == 0 and not [w for w in json.loads(out)["warnings"] if "protect" in w]
