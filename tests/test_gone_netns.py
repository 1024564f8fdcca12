"""Pins whose network namespace was deleted (a container gone): `status`
says so and `detach` removes the pins and the interface's state
(issue 16, item 14). The real CLI on a veth pair in a namespace of the
test's own, which the test deletes."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from testing.lab import PIN_ROOT, REPO, VethPair, xdpguard_cmd
from testing.timing import scaled
from xdpguard import bans

pytestmark = pytest.mark.kernel

POLICY = '[policy]\nname = "gone"\n[[rule]]\nname = "ping"\nproto = "icmp"\naction = "allow"\n'


def _xg(*argv, check=True):
    cp = subprocess.run([*xdpguard_cmd(), *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                        timeout=scaled(180, cap=900))
    assert not check or cp.returncode == 0, cp.stdout + cp.stderr
    return cp


def test_detach_and_status_when_the_namespace_is_gone(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    v = VethPair("xggn", split=False)
    with v:
        where = ["--iface", v.a, "--netns", v.ns_a]
        try:
            _xg("apply", pol, *where)
            _xg("ban", "192.0.2.7", "--ttl", "1h", *where)
            state = bans.state_dir(v.ns_a, v.a)
            assert (state / "bans.json").exists()
            subprocess.run(["ip", "netns", "del", v.ns_a], check=True, timeout=30)

            st = json.loads(_xg("status", "--netns", v.ns_a, "--json").stdout)["interfaces"]
            assert [(s["iface"], s["netns_gone"], s["attached"]) for s in st] == [(v.a, True, False)]
            text = _xg("status", "--netns", v.ns_a).stdout
            assert "NETWORK NAMESPACE GONE" in text and f"xdpguard detach --iface {v.a} --netns {v.ns_a}" in text

            cp = _xg("detach", *where)
            assert f"network namespace '{v.ns_a}' is gone; pins and state" in cp.stdout, cp.stdout
            assert not (PIN_ROOT / v.ns_a).exists()
            assert not state.exists() and not state.parent.exists()
            assert json.loads(_xg("status", "--netns", v.ns_a, "--json").stdout)["interfaces"] == []
        finally:
            shutil.rmtree(PIN_ROOT / v.ns_a, ignore_errors=True)
