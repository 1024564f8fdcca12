"""The daemon's sampler (xdpguard/daemon.py: what `watch` and `top` read)
on the real program's srcstat map: per-prefix sums over sources and CPUs,
rates, forgetting idle sources; and its prefix names against ipaddress."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from tests.conftest import require_kernel
from testing.webpolicy import web_policy
from testrun import make_rig
from xdpguard import daemon, pins
from xdpguard.compiler import compile_policy
from xdpguard.packet import build
from xdpguard.policy import load

POLICY = web_policy("sampler", syn_rate="1000/s", prefix4=24)
DST4, DST6 = "192.0.2.1", "2001:db8:ffff::1"


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_ipv4_names_are_ipaddress_names(value, plen):
    raw = value.to_bytes(4, "big") + bytes(12)
    want = str(ipaddress.ip_network((ipaddress.ip_address(value), plen), strict=False))
    assert daemon._src_prefix(4, raw, plen) == want


@pytest.mark.kernel
def test_rates_per_prefix_and_idle_sources_forgotten():
    require_kernel()
    rig = make_rig(compile_policy(load("sampler.toml", text=POLICY)))
    try:
        s = daemon.Sampler(None, pins.Record(mitigation=pins.MitigationInfo(prefix4=24, prefix6=64)),
                           srcstat=rig.maps["srcstat"])
        assert s.sample()[1] == {}                       # the first sample has no rates
        syn4 = lambda src: build(src, DST4, "tcp", dport=80)          # noqa: E731 (SYN by default)
        udp = lambda src, dst=DST4: build(src, dst, "udp", dport=53)  # noqa: E731
        sent = {   # prefix -> (frame, is a SYN)
            "10.1.2.0/24": [(syn4("10.1.2.3"), True)] * 5 + [(udp("10.1.2.4"), False)] * 3,
            "10.1.3.0/24": [(syn4("10.1.3.1"), True)] * 2,
            "2001:db8:1::/64": [(udp("2001:db8:1::7", DST6), False)] * 4,
        }
        for frames in sent.values():
            for f, _syn in frames:
                rig.run(f)
        dt, sources, _dests = s.sample()
        assert set(sources) == set(sent)
        for prefix, frames in sent.items():
            r = sources[prefix]
            assert r["pps"] * dt == pytest.approx(len(frames))
            assert r["bps"] * dt == pytest.approx(sum(len(f) for f, _ in frames))
            assert r["xdp_syn_rate"] * dt == pytest.approx(sum(syn for _, syn in frames))
            assert r["syn_rate"] == r["xdp_syn_rate"]     # no probes here
        # No traffic for an interval: rates of zero, and the map forgets them.
        _dt, sources, _ = s.sample()
        assert set(sources) == set(sent) and all(r["pps"] == 0 for r in sources.values())
        assert s.sample()[1] == {}
    finally:
        rig.close()
