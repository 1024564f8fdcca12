"""xdpguard.rtnl (the lockout guard's addresses and gateways) against
pyroute2 and against what was configured, in a namespace of the test's
own; and setns through libc (xdpguard.netns)."""
from __future__ import annotations

import os
import secrets

import pytest

from xdpguard import bans, netns as xns, rtnl

pytestmark = pytest.mark.kernel


@pytest.fixture
def routed_ns():
    """A fresh namespace: a veth pair inside it, r0 with addresses of both
    families, default routes in the main table and in table 100 (policy
    routing), and a route that is not a default."""
    from pyroute2 import IPRoute, netns

    name = "xgrt" + secrets.token_hex(4)
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="r0", kind="veth", peer="r1")
            idx = ipr.link_lookup(ifname="r0")[0]
            for i in (idx, ipr.link_lookup(ifname="r1")[0]):
                ipr.link("set", index=i, state="up")
            ipr.addr("add", index=idx, address="10.99.0.2", prefixlen=24)
            ipr.addr("add", index=idx, address="10.99.0.3", prefixlen=24)
            ipr.addr("add", index=idx, address="fd00:99::2", prefixlen=64, flags=0x80)  # nodad
            ipr.route("add", dst="0.0.0.0/0", gateway="10.99.0.1", oif=idx)
            ipr.route("add", dst="::/0", gateway="fd00:99::1", oif=idx)
            ipr.route("add", dst="0.0.0.0/0", gateway="10.99.0.254", oif=idx, table=100)
            ipr.route("add", dst="192.0.2.0/24", gateway="10.99.0.9", oif=idx)
        yield name
    finally:
        netns.remove(name)


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
