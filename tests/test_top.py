"""`top` on an interval in which a source sent nothing (issue 20, point 6).

test_mitigation.py::test_top_shows_the_flooder failed on the Debian 6.1
guest with IndexError at its own `view["top_pps"][0]`: `top` itself
answered, with every source list empty. Nothing in `top` indexes a list
it did not build (the per-CPU sums are slices, the probe counts a fixed
struct); an empty list is what a source without packets in `top`'s one
interval gives. That interval begins only after `top` has compiled and
attached the probe set (about a second here, a minute or more in an
emulated guest), and the test's flood lasted 6 s. Here that condition on
purpose: the sampler and the view with a source seen only before the
interval (by XDP and by the probes), then the real command after a flood
that has ended, and during one that lasts until `top` is done.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from testing.lab import EXTRA4, SERVER4, Lab
from testing.webpolicy import web_policy
from testrun import make_rig
from xdpguard import daemon, pins
from xdpguard.cli_mitigation import _print_top, _top_view
from xdpguard.compiler import compile_policy
from xdpguard.packet import build
from xdpguard.policy import load
from xdpguard.probes.collector import ProbeSet

POLICY = web_policy("top", syn_rate="100k/s")
FLOODER = EXTRA4[0]
RECORD = pins.Record(netns="host", iface="eth1", mitigation=pins.MitigationInfo(True, 32, 64))


class _Probes:
    """The probe set's side: the flooder's SYNs (and the RSTs it answered
    with) counted before the interval, none during it, one destination."""

    def __init__(self):
        counts = dict.fromkeys(("syns", "handshakes", "synack_retrans", "resets", "rst_sent", "rst_recv"), 0)
        self.snap = {"sources": {f"{FLOODER}/32": dict(counts, syns=300, rst_recv=300)},
                     "dests": {f"{SERVER4}:80": dict(counts, syns=300)}}

    def snapshot(self):
        return json.loads(json.dumps(self.snap))

    rates = staticmethod(ProbeSet.rates)

    def clear_idle(self, snap):
        return 0


def _stats(packets):
    return {"rules": [{"rule": "web", "action": "allow", "packets": packets, "dropped_packets": 0}]}


@pytest.mark.kernel
def test_a_source_idle_in_the_interval_is_in_no_list():
    from tests.conftest import require_kernel
    require_kernel()
    rig = make_rig(compile_policy(load("top.toml", text=POLICY)))
    try:
        s = daemon.Sampler(None, RECORD, probes=_Probes(), srcstat=rig.maps["srcstat"])
        for _ in range(300):        # the flood, over before the first sample
            rig.run(build(FLOODER, SERVER4, "tcp", dport=80))
        assert s.sample()[1] == {}
        dt, sources, dests = s.sample()
        # Seen (by XDP and the probes), but without a packet in the interval.
        assert sources[f"{FLOODER}/32"]["pps"] == 0 and sources[f"{FLOODER}/32"]["syn_rate"] == 0
        view = _top_view(RECORD, sources, dests, {SERVER4}, _stats(300), _stats(300), 1.0, [])
    finally:
        rig.close()
    assert view["top_pps"] == view["top_syn_rate"] == view["top_conn_rate"] == []
    assert view["top_dests"] == [{"dest": f"{SERVER4}:80", "syn_rate": 0.0, "conn_rate": 0.0,
                                  "synack_retrans": 0.0, "resets": 0.0}]
    assert view["rules"] == [{"rule": "web", "action": "allow", "pps": 0.0, "drop_pps": 0.0}]
    json.dumps(view)
    _print_top(view)


def test_empty_view_prints():
    view = _top_view(RECORD, {}, {}, set(), _stats(0), _stats(0), 1.0, [])
    assert view["top_pps"] == [] and view["bans_active"] == 0
    _print_top(view)


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def lab():
    from tests.conftest import require_kernel, require_tool
    require_kernel()
    require_tool("hping3")
    with Lab() as lab:
        lab.apply(lab.write_policy("top", POLICY))
        yield lab


def _top(lab) -> dict:
    cp = lab.xdpguard("top", "--iface", lab.server_if, "--netns", lab.server_ns, "--once", "--json",
                      "--interval", "1")
    assert "Traceback" not in cp.stderr
    return json.loads(cp.stdout)


def _hping(count: int, pps: int) -> list[str]:
    return ["hping3", "-q", "-S", "-p", "80", "-a", FLOODER, "-i", f"u{1_000_000 // pps}", "-c", str(count),
            SERVER4]


@pytest.mark.e2e
def test_top_after_a_flood_ended(lab):
    """The 6.1 guest's condition: the flood is over when `top` samples.
    `top` answers, and the flooder is in none of its lists (the lab's own
    IPv6 neighbour discovery from fe80::/64 may be)."""
    lab.run("client", ["timeout", "20", *_hping(200, 1000)], check=True, timeout=30)
    view = _top(lab)
    seen = {e["source"].split("/")[0] for e in view["top_pps"] + view["top_syn_rate"]}
    assert FLOODER not in seen


@pytest.mark.e2e
def test_top_names_a_flood_that_outlasts_it(lab):
    """A flood that goes on until `top` is done (bounded: 500/s for at most
    60 s, stopped as soon as `top` returns) leads its lists, however long
    `top` takes to start."""
    flood = lab.popen("client", ["timeout", "65", *_hping(30_000, 500)], what="hping3",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        view = _top(lab)
    finally:
        lab.stop(flood)
    assert view["top_pps"], f"no source in top's interval: {view}"
    assert view["top_pps"][0]["source"] == f"{FLOODER}/32", view["top_pps"]
    assert 300 <= view["top_pps"][0]["syn_rate"] <= 700, view["top_pps"][0]
    assert view["top_syn_rate"][0]["source"] == f"{FLOODER}/32"
