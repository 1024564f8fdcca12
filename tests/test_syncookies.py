"""SYN cookies at XDP (bpf/syncookie.h, xdpguard/syncookies.py).

* BPF_PROG_TEST_RUN (loader.TestRig): a SYN comes back as a well-formed
  cookie SYN-ACK (parsed with scapy), the ACK carrying that cookie passes
  and a forged one is dropped, IPv4 and IPv6; frames the XDP path does not
  take pass to the stack; a limit before the cookie still limits.
* A lab (testing/lab.py): nginx in the server namespace, curl through the
  cookie path, forged ACKs and spoofed SYNs from hping3, the nftables table
  and sysctls in the server namespace only, restored on detach.

Skipped where the kernel refuses the helpers (Linux < 6.0).
"""
from __future__ import annotations

import ctypes
import json

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from conftest import require_kernel
from testrun import make_rig
from xdpguard import bpfsys
from xdpguard.compiler import compile_policy
from xdpguard.layout import C
from xdpguard.policy import load

from xdpguard.bpfsys import XDP_DROP, XDP_PASS, XDP_TX
CMAC, SMAC = "02:00:00:00:00:01", "02:00:00:00:00:02"

POLICY = """
[[rule]]
name = "web"
proto = "tcp"
dport = [80, 443]
action = "allow"
syncookies = true

[[rule]]
name = "limited"
proto = "tcp"
dport = 8080
action = "limit"
rate = "1/s"
burst = 1
per = "rule"
syncookies = true

[[rule]]
name = "ssh"
proto = "tcp"
dport = 22
action = "allow"
"""

SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (12345, 0)), ("NOP", None), ("WScale", 9)]


def need_helpers():
    require_kernel()
    from xdpguard import syncookies
    why = syncookies.unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def rig():
    need_helpers()
    r = make_rig(compile_policy(load("cookies.toml", text=POLICY)))
    yield r
    r.close()


def syn(src="192.0.2.1", dst="198.51.100.1", dport=80, opts=SYN_OPTS, seq=1000, flags="S"):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return Ether(src=CMAC, dst=SMAC) / ip / TCP(sport=40000, dport=dport, flags=flags, seq=seq, options=opts)


def run(rig, frame):
    """(retval, slot, output frame) of one test run."""
    res = rig.run(bytes(frame))
    _, _, out = bpfsys.prog_test_run(rig.fn.fd, bytes(frame))
    return res.retval, res.slot, Ether(out)


def checksums_ok(pkt) -> bool:
    again = pkt.copy()
    if IP in again:
        del again[IP].chksum
    del again[TCP].chksum
    again = Ether(bytes(again))
    return (IP not in pkt or again[IP].chksum == pkt[IP].chksum) and again[TCP].chksum == pkt[TCP].chksum


def the_ack(synack, seq=1001, tsval=12346):
    ip = synack[IPv6] if IPv6 in synack else synack[IP]
    back = (IPv6 if IPv6 in synack else IP)(src=ip.dst, dst=ip.src)
    ts = dict(synack[TCP].options).get("Timestamp")
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (tsval, ts[0]))] if ts else []
    return Ether(src=CMAC, dst=SMAC) / back / TCP(sport=synack[TCP].dport, dport=synack[TCP].sport, flags="A",
                                                  seq=seq, ack=synack[TCP].seq + 1, options=opts)


@pytest.mark.kernel
@pytest.mark.parametrize("src,dst", [("192.0.2.1", "198.51.100.1"), ("2001:db8::1", "2001:db8::2")])
def test_synack_is_well_formed_and_its_cookie_validates(rig, src, dst):
    before = rig.counter(C.XG_SLOT_COOKIE)["packets"]
    rv, slot, sa = run(rig, syn(src, dst))
    assert (rv, slot) == (XDP_TX, C.XG_SLOT_COOKIE)
    assert rig.counter(C.XG_SLOT_COOKIE)["packets"] == before + 2     # rig.run and run's own
    assert (sa[Ether].src, sa[Ether].dst) == (SMAC, CMAC)
    ip = sa[IPv6] if ":" in src else sa[IP]
    assert (ip.src, ip.dst) == (dst, src)
    assert (ip.hlim if ":" in src else ip.ttl) == C.XG_COOKIE_TTL
    if ":" not in src:
        assert ip.len == len(sa) - 14 and ip.flags == "DF" and ip.ihl == 5
    else:
        assert ip.plen == len(sa) - 54 and ip.nh == 6
    t = sa[TCP]
    assert (t.sport, t.dport, t.flags, t.ack, t.window) == (80, 40000, "SA", 1001, 0)
    assert checksums_ok(sa)
    mss = C.XG_COOKIE_MSS6 if ":" in src else C.XG_COOKIE_MSS4
    assert [o[0] for o in t.options] == ["MSS", "SAckOK", "Timestamp", "NOP", "WScale"]
    opts = dict(t.options)
    assert opts["MSS"] == mss and opts["WScale"] == C.XG_COOKIE_WSCALE
    tsval, tsecr = opts["Timestamp"]
    assert tsecr == 12345
    # The kernel's timestamp cookie: the client's window scale, SACK.
    assert tsval & 0xf == 9 and tsval & 0x10 and not tsval & 0x20
    # The cookie validates: the ACK that echoes it passes (SYNPROXY then
    # opens the connection), one with another acknowledgment is dropped.
    ack = the_ack(sa)
    assert rig.run(bytes(ack)).retval == XDP_PASS
    forged = ack.copy()
    forged[TCP].ack = (forged[TCP].ack + 12345) & 0xffffffff
    res = rig.run(bytes(forged))
    assert (res.retval, res.slot) == (XDP_DROP, C.XG_SLOT_BADCOOKIE)


@pytest.mark.kernel
def test_synack_without_options(rig):
    rv, _, sa = run(rig, syn(opts=[]))
    assert rv == XDP_TX and sa[TCP].options == [("MSS", C.XG_COOKIE_MSS4)] and checksums_ok(sa)
    assert rig.run(bytes(the_ack(sa))).retval == XDP_PASS
    # Timestamps without window scale or SACK: NOP NOP, no window scale.
    rv, _, sa = run(rig, syn(opts=[("Timestamp", (7, 0))]))
    assert [o[0] for o in sa[TCP].options] == ["MSS", "NOP", "NOP", "Timestamp"]
    assert dict(sa[TCP].options)["Timestamp"][0] & 0x3f == 0xf


@pytest.mark.kernel
def test_what_the_cookie_path_leaves_alone(rig):
    web = rig.slots["web"]
    # VLAN-tagged: the normal path (nftables' SYNPROXY answers it).
    tagged = Ether(src=CMAC, dst=SMAC) / Dot1Q(vlan=5) / IP(src="192.0.2.1", dst="198.51.100.1") / TCP(
        dport=80, flags="S")
    assert (rig.run(bytes(tagged)).retval, rig.run(bytes(tagged)).slot) == (XDP_PASS, web)
    # A rule without syncookies.
    assert rig.run(bytes(syn(dport=22))).retval == XDP_PASS
    # RST, and SYN-ACK: not checked; SYN with FIN: dropped.
    for flags, want in (("R", XDP_PASS), ("RA", XDP_PASS), ("SA", XDP_PASS), ("SF", XDP_DROP)):
        assert rig.run(bytes(syn(flags=flags))).retval == want, flags


@pytest.mark.kernel
def test_limit_comes_before_the_cookie(rig):
    zero = bytes(ctypes.sizeof(rig.maps["rbuckets"].Leaf))
    bpfsys.map_update(rig.maps["rbuckets"].fd, bytes(ctypes.c_uint32(rig.slots["limited"])), zero)
    first = rig.run(bytes(syn(dport=8080)))
    second = rig.run(bytes(syn(dport=8080)))
    assert (first.retval, first.slot) == (XDP_TX, C.XG_SLOT_COOKIE)
    assert (second.retval, second.slot) == (XDP_DROP, rig.slots["limited"])


# ---------------------------------------------------------------- a real client, in a lab

E2E_POLICY = """
[policy]
name = "cookies"

[[rule]]
name = "web"
proto = "tcp"
dport = 80
action = "allow"
syncookies = true
"""


@pytest.fixture(scope="module")
def lab():
    need_helpers()
    from testing.lab import Lab
    with Lab() as lab:
        yield lab


def sysctls(lab, ns=None) -> dict[str, str]:
    from xdpguard.syncookies import SYSCTLS
    cmd = ["sysctl", "-n", *SYSCTLS]
    if ns is None:       # the machine's own namespace: read, never written
        import subprocess
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    else:
        out = lab.run(ns, cmd, check=True).stdout
    return dict(zip(SYSCTLS, out.split()))


def syns_to_stack(lab, table) -> int:
    """SYNs to the cookie ports that the XDP path left to the stack (the
    counter on the notrack rule of xdpguard's table)."""
    doc = json.loads(lab.run("server", ["nft", "-j", "list", "table", "inet", table], check=True).stdout)
    for item in doc["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == "pre":
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError("no SYN rule in the table")


@pytest.mark.e2e
def test_real_client_connects_through_the_cookie_path(lab):
    from testing.lab import SERVER4, SERVER6
    from xdpguard.syncookies import SYSCTLS
    host_before = sysctls(lab)
    srv_before = sysctls(lab, "server")
    # On a veth, frames sent with XDP_TX reach the peer's stack only when
    # the peer has an XDP program of its own (the kernel flushes its ring
    # for no other reason): one that allows everything.
    lab.apply(lab.write_policy("all", '[[rule]]\nname = "all"\naction = "allow"\n'), side="client")
    lab.start_nginx()
    lab.apply(lab.write_policy("cookies", E2E_POLICY))
    st = lab.status()[0]["syncookies"]
    assert st["table_present"] and st["ports"] == [[80, 80]]
    assert st["sysctls"] == SYSCTLS and st["sysctls_before"] == srv_before
    assert sysctls(lab, "server") == SYSCTLS

    for url in (f"http://{SERVER4}/", f"http://[{SERVER6}]/"):
        cp = lab.run("client", ["curl", "-sS", "--max-time", "10", url], timeout=30)
        assert cp.returncode == 0 and cp.stdout == "vhost a.lab\n", cp.stderr
    stats = lab.stats()
    assert stats["syncookie_synacks"]["packets"] >= 2
    assert syns_to_stack(lab, st["table"]) == 0

    # Forged ACKs (no cookie) are dropped at XDP; spoofed SYNs are answered
    # there and never reach the listener.
    lab.run("client", ["hping3", "-q", "-A", "-p", "80", "-c", "10", "-i", "u10000", SERVER4], timeout=30)
    lab.run("client", ["hping3", "-q", "-S", "-p", "80", "-c", "20", "-i", "u5000", "-a", "10.200.1.7",
                       SERVER4], timeout=30)
    after = lab.stats()
    assert after["syncookie_bad_acks"]["packets"] >= 10
    assert after["syncookie_synacks"]["packets"] >= stats["syncookie_synacks"]["packets"] + 20
    assert syns_to_stack(lab, st["table"]) == 0
    assert lab.run("server", ["ss", "-Htn", "state", "syn-recv"], check=True).stdout.strip() == ""
    cp = lab.run("client", ["curl", "-sS", "--max-time", "10", f"http://{SERVER4}/"], timeout=30)
    assert cp.stdout == "vhost a.lab\n", cp.stderr

    # A policy without syncookies takes the table and the sysctls away.
    lab.apply(lab.write_policy("plain", E2E_POLICY.replace("syncookies = true", "")))
    assert "syncookies" not in lab.status()[0] or not lab.status()[0]["syncookies"]
    assert sysctls(lab, "server") == srv_before
    assert lab.run("server", ["nft", "list", "table", "inet", st["table"]]).returncode != 0
    # On again, then detach: the same.
    lab.apply(lab.write_policy("cookies", E2E_POLICY))
    assert sysctls(lab, "server") == SYSCTLS
    lab.detach()
    assert sysctls(lab, "server") == srv_before
    assert lab.run("server", ["nft", "list", "table", "inet", st["table"]]).returncode != 0
    assert sysctls(lab) == host_before
