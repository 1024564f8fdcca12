"""Issue 17, "Show and compare": `show`, `apply --diff` and apply's
summary line, `check`'s protect warning, `test --packets` with expect,
`explain` of a limit rule. The running policy is a real apply in a lab
namespace."""
from __future__ import annotations

import json
import subprocess

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


# ---------------------------------------------------------------- show, apply --diff (a lab)

B_POLICY = POLICY.replace('rate = "10/m"', 'rate = "20/m"').replace(
    '[[rule]]\nname = "block"', '[sets]\nbad = ["203.0.113.0/24", "198.51.100.0/24"]\n\n[[rule]]\nname = "block"'
).replace('src = "203.0.113.0/24"', 'src = "@bad"') + '\n[[rule]]\nname = "dns"\nproto = "udp"\ndport = 53\naction = "allow"\n'


@pytest.fixture(scope="module")
def lab():
    from testing.lab import Lab
    with Lab() as lab:
        yield lab


def _xg(lab, *args, code=0):
    cp = lab.xdpguard(*args, check=False)
    assert cp.returncode == code, (cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr
    return cp


@pytest.mark.e2e
def test_show_and_diff(lab):
    from testing.lab import json_docs
    where = ["--iface", lab.server_if, "--netns", lab.server_ns]
    lab.detach(check=False)
    f = lab.dir / "cmp.toml"
    f.write_text(POLICY)
    # Nothing runs: show says so (usage, 2); --diff lists every rule as new and attaches nothing.
    assert "not applied" in _xg(lab, "show", *where, code=2).stderr
    cp = _xg(lab, "apply", f, *where, "--diff")
    assert "every rule of 'cmp' is new" in cp.stdout and "+ rule 'ssh' first" in cp.stdout
    assert "rules +3 -0 ~0" in cp.stdout and "(nothing applied: --diff)" in cp.stdout
    assert not [s for s in lab.status() if s["iface"] == lab.server_if]

    # The first apply's summary, then show prints the file as applied.
    doc = lab.apply(f)
    assert doc["changes"]["summary"].startswith("rules +3 -0 ~0")
    cp = _xg(lab, "show", *where)
    head, text = cp.stdout.split("\n[policy]", 1)
    assert "[policy]" + text == POLICY
    st = [s for s in lab.status() if s["iface"] == lab.server_if][0]
    assert f"# policy 'cmp' sha256 {st['sha256']}" in head and f"# source {f}" in head
    assert "+00:00" in head.splitlines()[3] and head.splitlines()[3].startswith("# applied 20")
    shown = json_docs(_xg(lab, "show", *where, "--json").stdout)[0]["interfaces"]
    assert [(s["iface"], s["text"], s["sha256"]) for s in shown] == [(lab.server_if, POLICY, st["sha256"])]
    # One name for one field across show, apply --diff and status.
    assert shown[0]["applied_at_rfc3339"] == st["applied_at_rfc3339"]

    # Edited in place: --diff compares with what runs (not the file), applies nothing.
    f.write_text(B_POLICY)
    cp = _xg(lab, "apply", f, *where, "--diff")
    want = ["~ rule 'ssh': rate 10/m -> 20/m", "~ rule 'block': src [203.0.113.0/24] -> [@bad]",
            "+ rule 'dns' after 'block': allow proto [udp] dport [53]",
            "~ set 'bad' (added): +2 -0 prefixes"]
    for w in want:
        assert w in cp.stdout.splitlines(), cp.stdout
    diff_json = json_docs(_xg(lab, "apply", f, *where, "--diff", "--json").stdout)[0]
    assert diff_json["applied"] is False and diff_json["running"]["sha256"] == st["sha256"]
    assert diff_json["running"]["applied_at_rfc3339"] == st["applied_at_rfc3339"]
    assert [s["sha256"] for s in lab.status() if s["iface"] == lab.server_if] == [st["sha256"]]
    assert json_docs(_xg(lab, "show", *where, "--json").stdout)[0]["interfaces"][0]["text"] == POLICY
    # An invalid policy: 2, as apply; nothing changed.
    bad = lab.dir / "bad.toml"
    bad.write_text(POLICY.replace('action = "deny"', 'action = "reject"'))
    assert "action 'reject'" in _xg(lab, "apply", bad, *where, "--diff", code=2).stderr

    # The apply itself: the same changes, in its summary line and --json.
    cp = _xg(lab, "apply", f, *where)
    summary = "rules +1 -0 ~2; set 'bad' (added) +2 -0 prefixes"
    assert f"{lab.server_if}: {summary}" in cp.stdout.splitlines()
    assert diff_json["changes"]["summary"] == summary
    again = json_docs(_xg(lab, "apply", f, *where, "--json").stdout)[0]
    assert again["unchanged"] is True and again["changes"]["summary"] == "no changes"


@pytest.mark.e2e
def test_show_each_interface(lab):
    """Two interfaces under xdpguard and no --iface: show prints each."""
    from testing.lab import json_docs
    dummy = f"xgs{lab.tag}"
    f = lab.dir / "one.toml"
    f.write_text(POLICY)
    g = lab.dir / "two.toml"
    g.write_text(B_POLICY)
    # A second veth pair, both ends in the server's namespace (no dummy
    # driver everywhere); deleting one end deletes both.
    subprocess.run(["ip", "-n", lab.server_ns, "link", "add", dummy, "type", "veth", "peer", "name", f"{dummy}p"],
                   check=True)
    try:
        subprocess.run(["ip", "-n", lab.server_ns, "link", "set", dummy, "up"], check=True)
        lab.apply(f)
        _xg(lab, "apply", g, "--iface", dummy, "--netns", lab.server_ns, "--mode", "generic")
        cp = _xg(lab, "show", "--netns", lab.server_ns)
        blocks = cp.stdout.split("\n\n# xdpguard: ")
        assert len(blocks) == 2
        assert sorted(b.split(" (network namespace")[0].split()[-1] for b in blocks) == sorted([lab.server_if, dummy])
        assert POLICY in cp.stdout and B_POLICY in cp.stdout
        doc = json_docs(_xg(lab, "show", "-n", lab.server_ns, "-j").stdout)[0]
        assert {s["iface"]: s["text"] for s in doc["interfaces"]} == {lab.server_if: POLICY, dummy: B_POLICY}
    finally:
        lab.xdpguard("detach", "--iface", dummy, "--netns", lab.server_ns, check=False)
        subprocess.run(["ip", "-n", lab.server_ns, "link", "del", dummy], check=False)


@pytest.mark.e2e
def test_running_copy_missing(lab):
    """Applied without a kept copy (an xdpguard before the copies): show and
    --diff say so (1); apply goes on, without a summary."""
    import shutil

    from testing.lab import json_docs
    from xdpguard import history
    where = ["--iface", lab.server_if, "--netns", lab.server_ns]
    f = lab.dir / "copy.toml"
    f.write_text(POLICY)
    lab.apply(f)
    shutil.rmtree(history.history_dir(lab.server_ns, lab.server_if))
    assert "no copy of policy 'cmp'" in _xg(lab, "show", *where, code=1).stderr
    f.write_text(B_POLICY)
    err = _xg(lab, "apply", f, *where, "--diff", code=1).stderr
    assert "cannot compare with the running policy" in err and "no copy of policy 'cmp'" in err
    doc = json_docs(_xg(lab, "apply", f, *where, "--json").stdout)[0]
    assert doc["changes"] is None and doc["unchanged"] is False
    # That apply kept its copy: show works again.
    assert json_docs(_xg(lab, "show", *where, "--json").stdout)[0]["interfaces"][0]["text"] == B_POLICY
