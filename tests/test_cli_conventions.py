"""Conventions operators bring from nft/iptables (issue 17): --version / -V,
and -j / -n / -i wherever --json / --netns / --iface exist."""
from __future__ import annotations

import os
import subprocess

import pytest

from testing.lab import REPO, xdpguard_cmd
from xdpguard import cli
from xdpguard.layout import C


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    r = subprocess.run([*xdpguard_cmd(), flag], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert [ln.split(" ")[0] for ln in lines] == ["xdpguard", "pin", "bcc", "kernel"]
    assert f"pin layout {C.XG_LAYOUT_VERSION}" in lines
    assert lines[3] == f"kernel {os.uname().release}"


def _subparsers():
    ap = cli.build_parser()
    action = next(a for a in ap._actions if a.dest == "command")
    return action.choices


def test_short_flags_wherever_the_long_one_exists():
    """Iterates over COMMANDS: each long flag of SHORT has its short form and
    both set the same destination."""
    parsers = _subparsers()
    assert set(parsers) == {c.name for c in cli.COMMANDS}
    seen = 0
    for c in cli.COMMANDS:
        opts = parsers[c.name]._option_string_actions
        for long, short in cli.SHORT.items():
            if long not in opts:
                assert short not in opts, (c.name, short)
                continue
            assert opts[short] is opts[long], (c.name, short)
            seen += 1
    assert seen >= len(cli.COMMANDS)       # --json at least, everywhere


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_short_flags_parse(name):
    """The short forms give the same namespace as the long ones."""
    cmd = next(c for c in cli.COMMANDS if c.name == name)
    flags = {f for fl, _ in cmd.args for f in fl} | {"--json"}
    positional = [kw["choices"][0] if "choices" in kw else f"x{i}"
                  for i, (fl, kw) in enumerate(cmd.args) if not fl[0].startswith("-")]
    required = [f for fl, kw in cmd.args for f in fl[:1] if kw.get("required") and f not in cli.SHORT]
    base = [name, *positional, *[x for f in required for x in (f, "203.0.113.1")]]
    long_argv, short_argv = list(base), list(base)
    for long, short in cli.SHORT.items():
        if long in flags:
            value = [] if long == "--json" else ["v0"]
            long_argv += [long, *value]
            short_argv += [short, *value]
    ap = cli.build_parser()
    assert vars(ap.parse_args(short_argv)) == vars(ap.parse_args(long_argv))
    assert ap.parse_args(short_argv).json is True
