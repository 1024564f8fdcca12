"""xdpguard.rtnl (the lockout guard's addresses and gateways) against
pyroute2 and against what was configured, in a namespace of the test's
own; and setns through libc (xdpguard.netns)."""
from __future__ import annotations

import os

import pytest

from testing.lab import VethPair
from xdpguard import bans, netns as xns, rtnl

pytestmark = pytest.mark.kernel


@pytest.fixture
def routed_ns():
    """A fresh namespace: a veth pair inside it, end a with addresses of
    both families, default routes in the main table and in table 100
    (policy routing), and a route that is not a default."""
    with VethPair("xgrt", split=False) as v:
        v.ip(v.name,
             f"addr add 10.99.0.2/24 dev {v.a}",
             f"addr add 10.99.0.3/24 dev {v.a}",
             f"addr add fd00:99::2/64 dev {v.a} nodad",
             f"route add default via 10.99.0.1 dev {v.a}",
             f"route add default via fd00:99::1 dev {v.a}",
             f"route add default via 10.99.0.254 dev {v.a} table 100",
             f"route add 192.0.2.0/24 via 10.99.0.9 dev {v.a}")
        yield v.name


def _pyroute2_view(name: str) -> tuple[set, set]:
    from pyroute2 import IPRoute
    with IPRoute(netns=name) as ipr:
        addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}
        gws = {r.get_attr("RTA_GATEWAY") for f in (2, 10) for r in ipr.get_default_routes(family=f)}
    return addrs, {g for g in gws if g}


def test_addresses_and_gateways_match_pyroute2(routed_ns):
    with xns.in_netns(routed_ns):
        addrs, gws = set(rtnl.addresses()), set(rtnl.default_gateways())
    assert {"10.99.0.2", "10.99.0.3", "fd00:99::2"} <= addrs
    assert gws == {"10.99.0.1", "fd00:99::1", "10.99.0.254"}   # table 100's too; not 192.0.2.0/24's
    assert (addrs, gws) == _pyroute2_view(routed_ns)


def test_own_addresses_name_their_reason(routed_ns):
    got = dict(bans.own_addresses(routed_ns))
    assert got["10.99.0.2"] == "an address of this host"
    assert got["fd00:99::1"] == "a default gateway of this host"


def test_in_netns_moves_the_thread_and_comes_back(routed_ns):
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with xns.in_netns(routed_ns):
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(f"/run/netns/{routed_ns}").st_ino
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_setns_refuses_a_file_that_is_no_namespace(tmp_path):
    f = tmp_path / "plain"
    f.write_text("")
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(xns.NetnsError, match="cannot enter network namespace"):
            xns._setns(fd, "'plain'")
    finally:
        os.close(fd)
