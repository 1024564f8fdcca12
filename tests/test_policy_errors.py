"""Bad policies: exit status 2 and ONE line on stderr that names the file,
the rule (name and position) and the field. Never a traceback.
Also the JSON shapes of `check --json` and `explain --json`."""
from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdpguard import cli
from xdpguard.policy import _MITIGATION_KEYS, _POLICY_KEYS, _RULE_KEYS, PolicyError, load

GOOD_RULE = '[[rule]]\nname = "first"\nproto = "tcp"\ndport = 443\naction = "allow"\n'


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, text, name="policy.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def check_error(capsys, path, *needles):
    """check fails with exit 2 and one error line containing every needle."""
    code, out, err = run(capsys, "check", path)
    assert code == 2, (out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ")
    assert str(path) in line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def bad_rule(tmp_path, body, name="web"):
    """A policy whose SECOND rule is `body` (so the position is rule 2)."""
    return write(tmp_path, GOOD_RULE + f'[[rule]]\nname = "{name}"\n' + body)


RULE2 = "rule 'web' (rule 2)"


# ---------------------------------------------------------------- rule fields

@pytest.mark.parametrize("body, needles", [
    # unknown key with a suggestion
    ('proto = "tcp"\ndports = [80, 443]\naction = "allow"\n', ["unknown key 'dports'", "did you mean 'dport'"]),
    ('proto = "tcp"\ndport = 80\naction = "allow"\nratee = "1/s"\n', ["unknown key 'ratee'", "did you mean 'rate'"]),
    ('sources = ["10.0.0.0/8"]\naction = "deny"\n', ["unknown key 'sources'"]),
    # bad CIDR
    ('src = ["10.0.0.0/33"]\naction = "deny"\n', ["src", "10.0.0.0/33", "0..32"]),
    ('src = ["10.0.0.256"]\naction = "deny"\n', ["src", "10.0.0.256", "not an address"]),
    ('dst = ["2001:db8::/129"]\naction = "deny"\n', ["dst", "0..128"]),
    ('src = ["2001:db8:::1"]\naction = "deny"\n', ["src", "2001:db8:::1"]),
    ('src = ["10.0.0.0/8x"]\naction = "deny"\n', ["src", "10.0.0.0/8x"]),
    ('src = 10\naction = "deny"\n', ["src", "10"]),
    # ports
    ('proto = "tcp"\ndport = 65536\naction = "deny"\n', ["dport", "65536", "0-65535"]),
    ('proto = "udp"\nsport = -1\naction = "deny"\n', ["sport", "-1"]),
    ('proto = "tcp"\ndport = "1000-70000"\naction = "deny"\n', ["dport", "70000"]),
    ('proto = "tcp"\ndport = ["8100-8000"]\naction = "deny"\n', ["dport", "'8100-8000'", "reversed"]),
    ('proto = "tcp"\ndport = "http"\naction = "deny"\n', ["dport", "'http'"]),
    ('proto = "tcp"\ndport = []\naction = "deny"\n', ["dport", "empty"]),
    ('proto = "tcp"\ndport = true\naction = "deny"\n', ["dport", "True"]),
    # ports without tcp/udp
    ('dport = 80\naction = "deny"\n', ["dport", "tcp", "udp"]),
    ('proto = "any"\nsport = 53\naction = "deny"\n', ["sport", "tcp", "udp"]),
    ('proto = ["tcp", "icmp"]\ndport = 80\naction = "deny"\n', ["dport", "tcp", "udp"]),
    ('proto = "icmp"\ndport = 80\naction = "deny"\n', ["dport"]),
    # proto
    ('proto = "sctp"\naction = "deny"\n', ["proto", "'sctp'"]),
    ('proto = []\naction = "deny"\n', ["proto", "empty"]),
    # tcp_flags
    ('tcp_flags = "syn"\naction = "deny"\n', ["tcp_flags", "tcp"]),
    ('proto = "udp"\ntcp_flags = "syn"\naction = "deny"\n', ["tcp_flags", "tcp"]),
    ('proto = ["tcp", "udp"]\ntcp_flags = "syn"\naction = "deny"\n', ["tcp_flags", "tcp"]),
    ('proto = "tcp"\ntcp_flags = "fin"\naction = "deny"\n', ["tcp_flags", "'fin'"]),
    # action and limits
    ('proto = "tcp"\naction = "drop"\n', ["action", "'drop'"]),
    ('proto = "tcp"\n', ["action", "None"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\n', ["rate", "limit"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "fast"\n', ["rate", "'fast'"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "200"\n', ["rate", "'200'"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = 200\n', ["rate", "200"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "0/s"\n', ["rate", "above zero"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "10Tbit/s"\n', ["rate", "'10Tbit/s'"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "0.00001/s"\n', ["rate", "too small"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nburst = 1099511627776\n', ["burst", "too large"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nburst = 0\n', ["burst", "0"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nper = "host"\n', ["per", "'host'"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nprefix4 = 33\n', ["prefix4", "33"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nprefix6 = -1\n', ["prefix6", "-1"]),
    ('proto = "tcp"\ndport = 80\naction = "deny"\nrate = "1/s"\n', ["rate", "limit"]),
    ('proto = "tcp"\ndport = 80\naction = "allow"\nburst = 5\n', ["burst", "limit"]),
    ('proto = "tcp"\naction = "allow"\nlog = "yes"\n', ["log"]),
    # new-source admission and rate_total (per-source limits only)
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nnew_sources = "2Mbit/s"\n', ["new_sources", "2k/s"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nnew_sources = "0/s"\n', ["new_sources", "above zero"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nnew_sources_burst = 5\n', ["new_sources_burst", "needs new_sources"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nnew_sources = "1/s"\nnew_sources_burst = 0\n', ["new_sources_burst", "0"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nper = "rule"\nnew_sources = "1/s"\n', ["new_sources", "per = \"source\""]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nper = "rule"\nrate_total = "1/s"\n', ["rate_total", "per = \"source\""]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nrate_total = "1Mbit/s"\n', ["rate_total", "2k/s"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1Mbit/s"\nrate_total = "1k/s"\n', ["rate_total", "byte rate"]),
    ('proto = "tcp"\ndport = 80\naction = "limit"\nrate = "1/s"\nburst_total = 5\n', ["burst_total", "needs rate_total"]),
    ('proto = "tcp"\ndport = 80\naction = "deny"\nnew_sources = "1/s"\n', ["new_sources", "limit"]),
    # syncookies: a TCP rule with dport that passes packets
    ('proto = "tcp"\ndport = 80\naction = "allow"\nsyncookies = "yes"\n', ["syncookies", "'yes'"]),
    ('proto = "udp"\ndport = 80\naction = "allow"\nsyncookies = true\n', ["syncookies", "proto = \"tcp\""]),
    ('proto = "tcp"\naction = "allow"\nsyncookies = true\n', ["syncookies", "dport"]),
    ('proto = "tcp"\ndport = 80\naction = "deny"\nsyncookies = true\n', ["syncookies", "\"allow\" or \"limit\""]),
    # unknown set
    ('src = ["@office"]\naction = "allow"\n', ["src", "'@office'"]),
    ('dst = "@nowhere"\naction = "allow"\n', ["dst", "'@nowhere'"]),
])
def test_bad_rule_field(capsys, tmp_path, body, needles):
    check_error(capsys, bad_rule(tmp_path, body), RULE2, *needles)


def test_unknown_key_suggests(capsys, tmp_path):
    line = check_error(capsys, bad_rule(tmp_path, 'proto = "tcp"\ndports = 22\naction = "deny"\n'), RULE2)
    assert line.endswith("unknown key 'dports'; did you mean 'dport'?")


def test_unknown_set_lists_known_sets(capsys, tmp_path):
    p = write(tmp_path, '[sets]\noffice = ["192.0.2.0/24"]\n' + GOOD_RULE
              + '[[rule]]\nname = "web"\nsrc = ["@ofice"]\naction = "allow"\n')
    check_error(capsys, p, RULE2, "src", "'@ofice'", "@office")


def test_rule_without_name(capsys, tmp_path):
    p = write(tmp_path, GOOD_RULE + '[[rule]]\nproto = "tcp"\naction = "deny"\n')
    check_error(capsys, p, "rule 2", "name")


@pytest.mark.parametrize("name", ["has space", "x" * 65, "default", ""])
def test_bad_rule_name(capsys, tmp_path, name):
    p = write(tmp_path, GOOD_RULE + f'[[rule]]\nname = "{name}"\naction = "deny"\n')
    check_error(capsys, p, "rule 2", "name")


@pytest.mark.parametrize("name, needles", [
    ('"' + "x" * 70 + '"', ["name 'xxxxxxxx", "...", "is 70 characters long (at most 64)"]),
    ('"ssh\\u0007bell"', ["name 'ssh\\x07bell'", "control character U+0007"]),
    ('"two\\nlines"', ["name 'two\\nlines'", "control character U+000A"]),
    ('"has space"', ["name 'has space'", "contains ' '"]),
    ('""', ["name is empty"]),
    ("42", ["name 42 is not valid", "string"]),
])
def test_rule_name_message_is_about_the_name(capsys, tmp_path, name, needles):
    p = write(tmp_path, GOOD_RULE + f'[[rule]]\nname = {name}\naction = "deny"\n')
    line = check_error(capsys, p, "rule 2", *needles)
    assert "required" not in line


@pytest.mark.parametrize("name, needles", [
    ('"' + "p" * 65 + '"', ["[policy]", "is 65 characters long"]),
    ('"pol\\u001bicy"', ["[policy]", "control character U+001B"]),
])
def test_policy_name_message_is_about_the_name(capsys, tmp_path, name, needles):
    check_error(capsys, write(tmp_path, f"[policy]\nname = {name}\n" + GOOD_RULE), *needles)


def test_duplicate_rule_names(capsys, tmp_path):
    p = write(tmp_path, GOOD_RULE + '[[rule]]\nname = "web"\naction = "deny"\n'
              + '[[rule]]\nname = "web"\naction = "allow"\n')
    check_error(capsys, p, "rule 'web' (rule 3)", "name 'web'", "rule 2")


# ---------------------------------------------------------------- [fleet] and [crowdsec]

@pytest.mark.parametrize("extra, needles", [
    ('[fleet]\nredis = "redis://127.0.0.1/0"\n', ["[fleet]", "key_file is required"]),
    ('[fleet]\nredis = "http://127.0.0.1/0"\nkey_file = "k"\n', ["[fleet]", "redis", "redis://HOST or rediss://HOST"]),
    ('[fleet]\nredis = "redis://:hunter2@127.0.0.1/0"\nkey_file = "k"\n', ["password_file"]),
    ('[fleet]\nredis = "redis://127.0.0.1/x"\nkey_file = "k"\n', ["database 'x'"]),
    ('[fleet]\nredis = "redis://127.0.0.1/0"\nkey_file = "short"\n', ["key_file 'short'", "at least 16"]),
    ('[fleet]\nredis = "redis://127.0.0.1/0"\nkey_file = "missing"\n', ["key_file 'missing'", "cannot be read"]),
    ('[fleet]\nredis = "redis://127.0.0.1/0"\nkey_file = "k"\nmin_prefix4 = 33\n', ["min_prefix4 33", "0..32"]),
    ('[fleet]\nredis = "redis://127.0.0.1/0"\nkey_file = "k"\npublish = "yes"\n', ["publish 'yes'", "true or false"]),
    ('[fleet]\nredis = "redis://127.0.0.1/0"\nkey_file = "k"\nhost = "a b"\n', ["host 'a b'"]),
    ('[fleet]\nredis = "redis://127.0.0.1/0"\nkey_file = "k"\nhosts = "a"\n', ["unknown key 'hosts'", "'host'"]),
    ('[crowdsec]\nkey_file = "k"\n', ["[crowdsec]", "lapi is required"]),
    ('[crowdsec]\nlapi = "tcp://x"\nkey_file = "k"\n', ["lapi", "http://HOST or https://HOST"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\n', ["key_file is required", "cscli bouncers add"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\ninterval = "50ms"\n', ["interval '50ms'", "100ms..1h"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\nscopes = ["ip", "as"]\n', ["scopes", "ip", "range"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\npush = true\n',
     ["push = true needs machine_id", "cscli machines add"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\npush = true\nmachine_id = "m"\n',
     ["push = true needs password_file"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\npush = "yes"\n', ["push 'yes'", "true or false"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\npush = true\nmachine_id = "a b"\n'
     'password_file = "k"\n', ["machine_id 'a b'", "cscli machines add"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\npush = true\nmachine_id = "m"\n'
     'password_file = "nope"\n', ["password_file 'nope'", "cannot be read"]),
    ('[crowdsec]\nlapi = "http://127.0.0.1:8080"\nkey_file = "k"\nmachine = "m"\n', ["unknown key 'machine'"]),
])
def test_bad_fleet_and_crowdsec_tables(capsys, tmp_path, extra, needles):
    (tmp_path / "k").write_bytes(b"0123456789abcdef0123456789abcdef\n")
    (tmp_path / "short").write_text("tooshort\n")
    check_error(capsys, write(tmp_path, GOOD_RULE + extra), *needles)


# ---------------------------------------------------------------- host bits: a warning, not an error

def test_host_bits_normalised_with_warning(capsys, tmp_path):
    p = bad_rule(tmp_path, 'src = ["10.1.2.3/8", "2001:db8::1/32"]\naction = "deny"\n')
    code, out, err = run(capsys, "check", p)
    assert code == 0, err
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2
    assert str(p) in warnings[0] and RULE2 in warnings[0]
    assert "src '10.1.2.3/8' has host bits set; using 10.0.0.0/8" in warnings[0]
    assert "using 2001:db8::/32" in warnings[1]
    rules = load(p).rules
    assert [str(x) for x in rules[1].src] == ["10.0.0.0/8", "2001:db8::/32"]
    code, out, _ = run(capsys, "check", p, "--json")
    assert len(json.loads(out)["warnings"]) == 2
    # and the normalised prefix is what matches
    code, out, _ = run(capsys, "explain", p, "--src", "10.200.0.1", "--proto", "udp", "--json")
    assert json.loads(out)["rule"] == "web"


# ---------------------------------------------------------------- sets

def test_missing_set_file(capsys, tmp_path):
    p = write(tmp_path, '[sets]\nbl = { file = "lists/nope.netset" }\n' + GOOD_RULE)
    check_error(capsys, p, "set 'bl'", "lists/nope.netset", "No such file")


def test_unreadable_set_file_directory(capsys, tmp_path):
    (tmp_path / "lists").mkdir()
    p = write(tmp_path, '[sets]\nbl = { file = "lists" }\n' + GOOD_RULE)
    check_error(capsys, p, "set 'bl'", "'lists'", "cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_set_file_permissions(capsys, tmp_path):
    f = tmp_path / "bl.netset"
    f.write_text("10.0.0.0/8\n")
    f.chmod(0)
    p = write(tmp_path, '[sets]\nbl = { file = "bl.netset" }\n' + GOOD_RULE)
    check_error(capsys, p, "set 'bl'", "bl.netset", "Permission denied")


def test_set_file_not_text(capsys, tmp_path):
    (tmp_path / "bl.netset").write_bytes(b"10.0.0.0/8\n\x1f\x8b\x08\xff\xfe\n")
    p = write(tmp_path, '[sets]\nbl = { file = "bl.netset" }\n' + GOOD_RULE)
    check_error(capsys, p, "set 'bl'", "bl.netset", "not UTF-8", "line 2")


def test_set_file_garbage_lines_warn_with_file_and_line(capsys, tmp_path):
    f = tmp_path / "bl.netset"
    f.write_text("# comment\n10.0.0.0/8\nnot-an-address\n\n192.0.2.7 # inline comment\n"
                 "300.1.1.1\n198.51.100.9/24\n")
    p = write(tmp_path, '[sets]\nbl = { file = "bl.netset" }\n' + GOOD_RULE
              + '[[rule]]\nname = "bl"\nsrc = "@bl"\naction = "deny"\n')
    code, out, err = run(capsys, "check", p)
    assert code == 0, err
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 3, out
    assert f"{f}:3: 'not-an-address' is not an address or CIDR; line skipped" in warnings[0]
    assert f"{f}:6: '300.1.1.1'" in warnings[1]
    assert f"{f}:7: '198.51.100.9/24' has host bits set; using 198.51.100.0/24" in warnings[2]
    assert {str(x) for x in load(p).sets["bl"]} == {"10.0.0.0/8", "192.0.2.7/32", "198.51.100.0/24"}


def test_set_file_many_garbage_lines_are_summarised(tmp_path):
    (tmp_path / "bl.netset").write_text("10.0.0.0/8\n" + "junk\n" * 50)
    p = write(tmp_path, '[sets]\nbl = { file = "bl.netset" }\n' + GOOD_RULE)
    w = load(p).warnings
    assert len(w) == 21
    assert "30 more lines" in w[-1]


@pytest.mark.parametrize("sets, needles", [
    ('office = ["192.0.2.0/24", "nope"]\n', ["set 'office'", "'nope'"]),
    ('office = "192.0.2.0/24"\n', ["set 'office'", "expected a list"]),
    ('office = { path = "x" }\n', ["set 'office'", "unknown key 'path'"]),
    ('office = { file = 5 }\n', ["set 'office'"]),
])
def test_bad_inline_sets(capsys, tmp_path, sets, needles):
    check_error(capsys, write(tmp_path, "[sets]\n" + sets + GOOD_RULE), *needles)


def test_empty_set_warns(capsys, tmp_path):
    (tmp_path / "empty.netset").write_text("# nothing yet\n")
    p = write(tmp_path, '[sets]\nbl = { file = "empty.netset" }\n' + GOOD_RULE)
    code, out, _ = run(capsys, "check", p)
    assert code == 0
    assert "set 'bl': set is empty" in out


# ---------------------------------------------------------------- the file and [policy]

def test_empty_policy(capsys, tmp_path):
    check_error(capsys, write(tmp_path, '[policy]\nname = "nothing"\ndefault = "deny"\n'), "empty policy")


def test_empty_file(capsys, tmp_path):
    check_error(capsys, write(tmp_path, ""), "empty policy")


def test_no_rules_needs_a_default_and_mitigation(capsys, tmp_path):
    mitigation = '[mitigation]\nenabled = true\nsyn_rate = "200/s"\n'
    check_error(capsys, write(tmp_path, mitigation), "empty policy")                 # no [policy]
    check_error(capsys, write(tmp_path, '[policy]\nname = "x"\n' + mitigation), "empty policy")
    p = write(tmp_path, '[policy]\nname = "allow-and-ban"\ndefault = "allow"\n' + mitigation)
    code, out, _ = run(capsys, "check", p)
    assert code == 0 and "valid policy 'allow-and-ban' (default allow)" in out and "rules 0" in out


def test_toml_syntax_error_has_line(capsys, tmp_path):
    p = write(tmp_path, '[policy]\nname = "x"\n\n[[rule]]\nname = "a\naction = "deny"\n')
    line = check_error(capsys, p, "TOML syntax error")
    assert "line 5" in line


def test_toml_duplicate_key(capsys, tmp_path):
    p = write(tmp_path, GOOD_RULE + 'action = "deny"\n')
    check_error(capsys, p, "TOML syntax error", "line 6")


def test_policy_not_utf8(capsys, tmp_path):
    p = tmp_path / "policy.toml"
    p.write_bytes(b"[policy]\nname = \"\xff\"\n")
    check_error(capsys, p, "not UTF-8")


def test_policy_missing(capsys, tmp_path):
    check_error(capsys, tmp_path / "nope.toml", "cannot read policy")


@pytest.mark.parametrize("head, needles", [
    ('default = "drop"\n', ["[policy]", "default 'drop'", "allow", "deny"]),
    ('default = true\n', ["[policy]", "default True"]),
    ('name = "has space"\n', ["[policy]", "name"]),
    ('defualt = "deny"\n', ["[policy]", "unknown key 'defualt'", "did you mean 'default'"]),
    ('log_rate = -1\n', ["[policy]", "log_rate"]),
    ('protect = "192.0.2.1"\n', ["[policy] protect"]),
    ('protect = ["192.0.2.1:99999"]\n', ["[policy] protect", "99999"]),
    ('protect = ["[2001:db8::1]:99999"]\n', ["[policy] protect", "99999"]),
    ('protect = ["2001:db8::1:22"]\n', ["[policy] protect", "'2001:db8::1:22' is ambiguous",
                                        '"[2001:db8::1]:22"', '"[2001:db8::1:22]"']),
    ('protect = ["::1:8080"]\n', ["[policy] protect", "ambiguous", '"[::1]:8080"']),
    ('protect = ["[2001:db8::1:22"]\n', ["[policy] protect", "not an address"]),
])
def test_bad_policy_table(capsys, tmp_path, head, needles):
    check_error(capsys, write(tmp_path, "[policy]\n" + head + GOOD_RULE), *needles)


def test_unknown_top_level_table(capsys, tmp_path):
    check_error(capsys, write(tmp_path, GOOD_RULE + "[mitgation]\nenabled = true\n"),
                "unknown key 'mitgation'", "did you mean 'mitigation'")


def test_rule_table_not_array(capsys, tmp_path):
    check_error(capsys, write(tmp_path, '[rule]\nname = "a"\naction = "deny"\n'), "[[rule]]",
                "line 1: [rule] declares one table")


def test_two_single_rule_tables_say_double_brackets(capsys, tmp_path):
    # TOML itself refuses a second [rule]; the message says what was meant.
    p = write(tmp_path, '[policy]\ndefault = "deny"\n\n[rule]\nname = "a"\naction = "allow"\n'
              '[rule]\nname = "b"\naction = "deny"\n')
    check_error(capsys, p, "TOML syntax error", "line 4: [rule] declares one table", "write [[rule]]")


def test_byte_order_mark_is_accepted(capsys, tmp_path):
    (tmp_path / "set.txt").write_bytes("\ufeff192.0.2.0/24\n198.51.100.7\n".encode())
    p = tmp_path / "policy.toml"
    p.write_bytes(("\ufeff[policy]\nname = \"bom\"\n[sets]\ns = { file = \"set.txt\" }\n" + GOOD_RULE
                   + '[[rule]]\nname = "s"\nsrc = "@s"\naction = "deny"\n').encode())
    code, out, err = run(capsys, "check", p, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["policy"] == "bom" and s["prefixes_v4"] == 2 and s["warnings"] == []


def test_too_many_rules(capsys, tmp_path):
    from xdpguard.layout import C
    n = C.XG_MAX_RULES_LIMIT + 1
    text = "".join(f'[[rule]]\nname = "r{i}"\nsrc = "10.0.{i // 256 % 256}.{i % 256}"\naction = "deny"\n'
                   for i in range(n))
    check_error(capsys, write(tmp_path, text), f"{n} rules", str(C.XG_MAX_RULES_LIMIT))


# ---------------------------------------------------------------- [mitigation]

@pytest.mark.parametrize("body, needles", [
    ('enabled = "yes"\n', ["enabled 'yes'", "true or false"]),
    ('dry_run = 1\n', ["dry_run 1"]),
    ('syn_rate = "lots"\n', ["syn_rate", "'lots'"]),
    ('syn_rate = "10Mbit/s"\n', ["syn_rate", "packet"]),
    ('conn_rate = "0/s"\n', ["conn_rate", "above zero"]),
    ('pps = "1MB/s"\n', ["pps", "packet"]),
    ('bps = "100/s"\n', ["bps", "byte rate"]),
    ('window = "soon"\n', ["window", "'soon'"]),
    ('window = 0\n', ["window"]),
    ('ban = "-5m"\n', ["ban", "'-5m'"]),
    ('ban_max = inf\n', ["ban_max"]),
    ('ban = "2h"\nban_max = "1h"\n', ["ban_max", "shorter than ban"]),
    ('allow = ["@admins"]\n', ["allow", "'@admins'"]),
    ('allow = ["10.0.0.0/40"]\n', ["allow", "10.0.0.0/40"]),
    ('max_bans = 0\n', ["max_bans 0"]),
    ('max_bans = 2000000\n', ["max_bans"]),
    ('prefix4 = 4\n', ["prefix4 4", "8..32"]),
    ('prefix6 = 129\n', ["prefix6 129", "16..128"]),
    ('ban_time = "1h"\n', ["unknown key 'ban_time'"]),
])
def test_bad_mitigation(capsys, tmp_path, body, needles):
    # an otherwise valid, enabled section; the case's own keys replace the base ones
    base = {"enabled": "enabled = true\n", "pps": 'pps = "1k/s"\n'}
    given_keys = {ln.split("=")[0].strip() for ln in body.splitlines()}
    text = GOOD_RULE + "[mitigation]\n" + "".join(v for k, v in base.items() if k not in given_keys) + body
    check_error(capsys, write(tmp_path, text), "[mitigation]", *needles)


def test_mitigation_without_thresholds_warns(capsys, tmp_path):
    code, out, _ = run(capsys, "check", write(tmp_path, GOOD_RULE + "[mitigation]\nenabled = true\n"))
    assert code == 0
    assert "[mitigation]: enabled, but no threshold" in out


# ---------------------------------------------------------------- unreachable rules

def test_unreachable_rule_warnings(capsys, tmp_path):
    p = write(tmp_path, GOOD_RULE
              + '[[rule]]\nname = "https-again"\nsrc = ["10.0.0.0/8"]\nproto = "tcp"\ndport = 443\naction = "deny"\n'
              + '[[rule]]\nname = "mixed"\nsrc = ["10.0.0.0/8"]\ndst = ["2001:db8::1"]\naction = "deny"\n'
              + '[[rule]]\nname = "fine"\nproto = "tcp"\naction = "deny"\n')
    code, out, _ = run(capsys, "check", p, "--json")
    assert code == 0
    w = json.loads(out)["warnings"]
    assert len(w) == 2
    assert "rule 'https-again' (rule 2): can never match: shadowed by rule 'first' (rule 1)" in w[0]
    assert "rule 'mixed' (rule 3): can never match: src and dst of different address families" in w[1]


# ---------------------------------------------------------------- JSON shapes

def test_check_json_shape(capsys, tmp_path):
    p = write(tmp_path, '[policy]\nname = "shape"\ndefault = "deny"\n[sets]\nadm = ["192.0.2.0/24", "2001:db8::/32"]\n'
              + GOOD_RULE + '[[rule]]\nname = "adm"\nsrc = "@adm"\naction = "allow"\n')
    code, out, err = run(capsys, "check", p, "--json")
    assert code == 0 and err == ""
    assert out.count("\n") == 1
    s = json.loads(out)
    assert set(s) == {"policy", "default", "rules", "sets", "prefixes_v4", "prefixes_v6", "maps",
                      "vector_words", "map_memory_bytes", "map_memory", "mitigation", "valid", "warnings"}
    assert set(s["map_memory"]) == {"lpm4", "lpm6", "srctab", "vecs", "rules", "ports"}
    assert s["map_memory_bytes"] == sum(s["map_memory"].values()) > 0
    assert set(s["maps"]) == {"lpm4", "lpm6", "vecs", "rules", "port_classes"}
    assert s["policy"] == "shape" and s["default"] == "deny"
    assert s["rules"] == 2 and s["sets"] == 1
    assert s["prefixes_v4"] == 1 and s["prefixes_v6"] == 1
    assert s["maps"]["rules"] == 2 and s["maps"]["lpm4"] == 2 and s["maps"]["lpm6"] == 2
    assert s["vector_words"] == 1
    assert s["mitigation"] is False and s["valid"] is True and s["warnings"] == []


@pytest.mark.parametrize("text, rule, field", [
    (GOOD_RULE.replace("443", "99999"), "rule 'first' (rule 1)", "dport"),
    ('[policy]\nname = "x"\nbogus = 1\n' + GOOD_RULE, None, None),
    ("[[rule]\n", None, None),
])
def test_check_json_invalid(capsys, tmp_path, text, rule, field):
    """An invalid policy under --json: one JSON document on stdout, exit 2."""
    p = write(tmp_path, text)
    code, out, err = run(capsys, "check", p, "-j")
    assert code == 2 and err == ""
    s = json.loads(out)
    assert s["valid"] is False and len(s["errors"]) == 1
    e = s["errors"][0]
    assert set(e) == {"file", "rule", "field", "message", "where"}
    assert e["file"] == str(p) and e["rule"] == rule and e["field"] == field and e["message"]
    # the same words as the one line without --json
    code, out, err = run(capsys, "check", p)
    assert code == 2 and e["message"] in err


def test_explain_json_shape(capsys, tmp_path):
    p = write(tmp_path, '[policy]\ndefault = "deny"\n' + GOOD_RULE)
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.1", "--proto", "tcp", "--dport", 443, "--json")
    assert code == 0 and err == ""
    assert json.loads(out) == {"rule": "first", "action": "allow", "verdict": "pass"}
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.1", "--proto", "tcp", "--dport", 80, "--json")
    d = json.loads(out)
    assert list(d) == ["rule", "action", "verdict"]
    assert d == {"rule": "default", "action": "deny", "verdict": "drop"}


def test_explain_bad_policy_is_exit_2(capsys, tmp_path):
    p = bad_rule(tmp_path, 'proto = "tcp"\ndports = 22\naction = "deny"\n')
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.1", "--json")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "did you mean 'dport'" in err


def test_explain_bad_packet_is_exit_2(capsys, tmp_path):
    p = write(tmp_path, GOOD_RULE)
    code, out, err = run(capsys, "explain", p, "--src", "192.0.2.300", "--json")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "src" in err and "Traceback" not in err


# ---------------------------------------------------------------- anything goes in, only PolicyError comes out

def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


_VOCAB = ["tcp", "udp", "icmp", "icmpv6", "any", "syn", "allow", "deny", "limit", "source", "rule",
          "200/s", "10Mbit/s", "0/s", "0.0001/s", "1e3/s", "10.0.0.0/8", "::/0", "2001:db8::/129",
          "1.2.3.4", "@s", "@t", "80-90", "90-80", "0-65536", "3s", "0s", "-1s", "", "set.txt",
          "/", "..", "x" * 70, "1.5MB/s", "99999999999999G/s"]
_scalar = st.one_of(st.integers(-2**63, 2**63 - 1),
                    st.sampled_from([0, 1, -1, 22, 65535, 65536, 2**40, 2**40 + 1, 8, 32, 128, 129]),
                    st.floats(), st.booleans(), st.text(max_size=8), st.sampled_from(_VOCAB))
_value = st.recursive(_scalar, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.sampled_from(["file", "a"]), c, max_size=2)), max_leaves=6)


def _table(keys):
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text("abcdefgh_", min_size=1, max_size=5)),
                           _value, max_size=8)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "set.txt").write_text("10.0.0.0/8\n2001:db8::/32\n")
    return d


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(head=_table(_POLICY_KEYS),
       sets=st.dictionaries(st.sampled_from(["s", "t", "u"]), _value, max_size=3),
       rules=st.lists(_table(_RULE_KEYS), max_size=3),
       mitigation=st.one_of(st.none(), _table(_MITIGATION_KEYS)))
def test_random_values_raise_only_policy_error(fuzz_dir, head, sets, rules, mitigation):
    lines = ["[policy]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in head.items()]
    lines += ["[sets]"] + [f"{k} = {_toml(v)}" for k, v in sets.items()]
    for i, r in enumerate(rules):
        r.setdefault("name", f"r{i}")
        r.setdefault("action", ("allow", "deny", "limit")[i % 3])
        lines += ["[[rule]]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in r.items()]
    if mitigation is not None:
        lines += ["[mitigation]"] + [f"{json.dumps(k)} = {_toml(v)}" for k, v in mitigation.items()]
    try:
        policy = load(fuzz_dir / "fuzz.toml", text="\n".join(lines) + "\n")
    except PolicyError as e:
        assert "\n" not in str(e)
        assert str(fuzz_dir / "fuzz.toml") in str(e)
        return
    from xdpguard.compiler import compile_policy, find_unreachable
    compile_policy(policy)
    find_unreachable(policy)



def test_most_rules_fit_the_widest_vector_that_verifies():
    """A policy at the rule limit compiles to 64-word vectors, the width
    test_dataplane.test_program_verifies_at_the_rule_limit loads."""
    from xdpguard import compiler, loader
    from xdpguard.layout import C
    text = "".join(f'[[rule]]\nname = "r{i}"\nsrc = "10.{i // 256}.{i % 256}.0/24"\naction = "deny"\n'
                   for i in range(C.XG_MAX_RULES_LIMIT))
    t = compiler.compile_policy(load("max.toml", text=text))
    assert loader.Shape.for_tables(t).nwords == 64
