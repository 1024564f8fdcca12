"""[mitigation] syncookies = "auto" (xdpguard/cookieswitch.py).

* The policy: syn_rate_total required, which rules take "auto" cookies.
* BPF_PROG_TEST_RUN (loader.TestRig): an "auto" port's SYNs are counted
  per port and pass while its switch is off; a map write turns the cookie
  path on for that port only, and off again.
* The decisions (AutoCookies) on a switch of real maps: on at once over
  the threshold, off only after the hold time under it.
* A lab: a real SYN flood from a namespace turns cookies on for its port
  under `watch`, a real client still connects, cookies go off after it.
"""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from conftest import require_kernel
from testrun import make_rig
from xdpguard.compiler import compile_policy
from xdpguard.layout import C
from xdpguard.policy import PolicyError, load

from xdpguard.bpfsys import XDP_DROP, XDP_PASS, XDP_TX
CMAC, SMAC = "02:00:00:00:00:01", "02:00:00:00:00:02"

POLICY = """
[[rule]]
name = "web"
proto = "tcp"
dport = [80, 443]
action = "allow"

[[rule]]
name = "always"
proto = "tcp"
dport = 8443
action = "allow"
syncookies = true

[[rule]]
name = "never"
proto = "tcp"
dport = 22
action = "allow"
syncookies = false

[mitigation]
syncookies = "auto"
syn_rate_total = "1k/s"
syncookies_hold = "3s"
"""


def test_policy_auto_rules_and_errors():
    p = load("auto.toml", text=POLICY)
    assert p.mitigation.syncookies == "auto" and p.mitigation.syn_rate_total.per_second == 1000
    assert p.mitigation.syncookies_hold == 3.0
    assert [p.cookies(r) for r in p.rules] == ["auto", "on", None]
    t = compile_policy(p)
    assert [r.syncookies for r in t.rules] == [C.XG_COOKIES_AUTO, C.XG_COOKIES_ON, C.XG_COOKIES_OFF]
    assert t.syncookies
    from xdpguard import syncookies
    assert syncookies.port_ranges(p, "auto") == [[80, 80], [443, 443]]
    assert syncookies.port_ranges(p) == [[8443, 8443]]
    # Without "auto" a rule not saying syncookies has none.
    plain = load("plain.toml", text=POLICY.split("[mitigation]")[0])
    assert [plain.cookies(r) for r in plain.rules] == [None, "on", None]
    for tail, words in (('syncookies = "auto"\n', ["syn_rate_total"]),
                        ('syncookies = "yes"\nsyn_rate_total = "1k/s"\n', ["syncookies", "'yes'"]),
                        ('syncookies = "auto"\nsyn_rate_total = "10Mbit/s"\n', ["syn_rate_total", "SYN rate"]),
                        ('syn_rate_total = "1k/s"\n', ["syn_rate_total", "only for"]),
                        ('syncookies = "auto"\nsyn_rate_total = "1k/s"\nsyncookies_hold = "soon"\n',
                         ["syncookies_hold"])):
        with pytest.raises(PolicyError) as e:
            load("bad.toml", text='[[rule]]\nname = "w"\nproto = "tcp"\ndport = 80\naction = "allow"\n[mitigation]\n' + tail)
        assert all(w in str(e.value) for w in words), (tail, str(e.value))
    with pytest.raises(PolicyError, match="no rule can take SYN cookies"):
        load("none.toml", text='[[rule]]\nname = "d"\nproto = "udp"\ndport = 53\naction = "allow"\n'
                               '[mitigation]\nsyncookies = "auto"\nsyn_rate_total = "1k/s"\n')


def test_nft_ruleset_tracks_auto_ports_syns():
    from xdpguard.syncookies import ruleset
    text = ruleset("xdpguard_7", "veth0", [[8443, 8443]], [[80, 80], [443, 443]])
    notrack = [ln for ln in text.splitlines() if "notrack" in ln]
    # Only the always-on port's SYNs are untracked: an auto port with its
    # cookies off is the stack's (and conntrack's) as without xdpguard.
    assert len(notrack) == 1 and "{ 8443 }" in notrack[0]
    assert sum("synproxy" in ln and "{ 80, 443, 8443 }" in ln for ln in text.splitlines()) == 2
    assert "notrack" not in ruleset("xdpguard_7", "veth0", [], [[80, 80]])


@pytest.fixture(scope="module")
def rig():
    require_kernel()
    from xdpguard import syncookies
    why = syncookies.unavailable()
    if why:
        pytest.skip(why)
    r = make_rig(compile_policy(load("auto.toml", text=POLICY)))
    yield r
    r.close()


def syn(dport=80, flags="S", src="192.0.2.1"):
    return bytes(Ether(src=CMAC, dst=SMAC) / IP(src=src, dst="198.51.100.1")
                 / TCP(sport=40000, dport=dport, flags=flags, seq=1000,
                       options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0))]))


@pytest.mark.kernel
def test_switch_is_a_map_write_per_port(rig):
    from xdpguard.cookieswitch import PortSwitch
    sw = PortSwitch(rig.maps)
    sw.clear()
    before = sw.syn_counts()
    # Off: the auto rule passes SYNs to the stack, counted per port.
    res = rig.run(syn(80))
    assert (res.retval, res.slot) == (XDP_PASS, rig.slots["web"])
    rig.run(syn(443), repeat=5)
    rig.run(syn(80, flags="A"))                        # not a SYN: not counted
    counts = sw.syn_counts()
    assert counts[80] - before.get(80, 0) == 1 and counts[443] - before.get(443, 0) == 5
    # The always-on rule answers whatever the switches; "never" never.
    assert rig.run(syn(8443)).retval == XDP_TX
    assert rig.run(syn(22)).retval == XDP_PASS
    assert 8443 not in counts and 22 not in counts
    # On for 80: the cookie path, for 80 only; still counted.
    sw.turn_on(80, 5000.0, 1000.0, since=1234)
    res = rig.run(syn(80))
    assert (res.retval, res.slot) == (XDP_TX, C.XG_SLOT_COOKIE)
    forged = bytes(Ether(src=CMAC, dst=SMAC) / IP(src="192.0.2.1", dst="198.51.100.1")
                   / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=777))
    res = rig.run(forged)
    assert (res.retval, res.slot) == (XDP_DROP, C.XG_SLOT_BADCOOKIE)
    assert rig.run(syn(443)).retval == XDP_PASS
    assert sw.syn_counts()[80] == counts[80] + 1
    assert sw.on_ports() == {80: {"since": 1234, "syn_rate": 5000, "threshold": 1000}}
    # Off again.
    sw.turn_off(80)
    assert rig.run(syn(80)).retval == XDP_PASS and sw.on_ports() == {}


@pytest.mark.kernel
def test_decisions_on_at_once_off_after_hold(rig):
    from xdpguard.cookieswitch import AutoCookies, PortSwitch
    sw = PortSwitch(rig.maps)
    sw.clear()
    pol = load("auto.toml", text=POLICY)
    auto = AutoCookies(pol.mitigation, [[80, 80], [443, 443]], sw)
    assert auto.tick(0.0) == []                         # the first sample
    rig.run(syn(80), repeat=3000)                       # 3000 SYNs in a 1 s tick: over 1k/s
    rig.run(syn(443), repeat=500)                       # under
    ch = auto.tick(1.0)
    assert [(c.port, c.on) for c in ch] == [(80, True)]
    assert "syncookies on for tcp port 80" in ch[0].human() and ch[0].as_json()["action"] == "syncookies_on"
    assert rig.run(syn(80)).retval == XDP_TX and rig.run(syn(443)).retval == XDP_PASS
    # Under the threshold: on for the hold time (3 s), through a burst.
    assert auto.tick(2.0) == [] and auto.tick(3.0) == []
    for _ in range(1200):                               # answered: a repeat would run on the SYN-ACK
        rig.run(syn(80))
    assert auto.tick(4.0) == []                         # over again: the hold starts over
    assert auto.tick(5.0) == [] and auto.tick(6.0) == []
    ch = auto.tick(7.0)
    assert [(c.port, c.on) for c in ch] == [(80, False)] and "for 3s" in ch[0].human()
    assert rig.run(syn(80)).retval == XDP_PASS and sw.on_ports() == {}
    # A watch started while a port is on (the last one killed) keeps it
    # on and switches it off by the same rule.
    sw.turn_on(443, 1, 1)
    again = AutoCookies(pol.mitigation, [[80, 80], [443, 443]], sw)
    assert again.on == {443}
    again.tick(10.0)
    assert again.tick(12.0) == [] and [c.port for c in again.tick(13.5)] == [443]


@pytest.mark.kernel
def test_cannot_happen_slots_named_and_counted_apart(rig):
    from xdpguard import layout
    names = [layout.SLOT_REASONS[s] for s in layout.COOKIE_BUG_SLOTS]
    assert len(set(layout.COOKIE_BUG_SLOTS)) == 4 and len(set(names)) == 4
    assert all(C.XG_SLOT_END_RULES <= s < C.XG_MAX_SLOTS for s in layout.COOKIE_BUG_SLOTS)
    # None of them moves for the frames the cookie path takes.
    for s in layout.COOKIE_BUG_SLOTS:
        assert rig.counter(s)["packets"] == 0


# ---------------------------------------------------------------- watch, a real flood, a real client

E2E_POLICY = """
[policy]
name = "auto"

[[rule]]
name = "web"
proto = "tcp"
dport = 80
action = "allow"

[mitigation]
syncookies = "auto"
syn_rate_total = "200/s"
syncookies_hold = "2s"
"""


@pytest.mark.e2e
def test_watch_switches_cookies_for_a_flooded_port(tmp_path):
    require_kernel()
    from xdpguard import syncookies
    why = syncookies.unavailable()
    if why:
        pytest.skip(why)
    from conftest import require_tool
    from testing.lab import SERVER4, Lab
    from testing.timing import scaled, wait_until
    from testing.watcher import Watcher
    for tool in ("nginx", "curl", "hping3"):
        require_tool(tool)

    def curl():
        cp = lab.run("client", ["curl", "-sS", "--max-time", "10", f"http://{SERVER4}/"], timeout=30)
        assert cp.returncode == 0 and cp.stdout == "vhost a.lab\n", cp.stderr

    def switches():
        return [(d["action"], d["port"]) for d in w.lines if d["action"].startswith("syncookies")]

    with Lab() as lab:
        # XDP_TX frames reach a veth peer's stack only when it has an XDP
        # program (test_syncookies.py): one that allows everything.
        lab.apply(lab.write_policy("all", '[[rule]]\nname = "all"\naction = "allow"\n'), side="client")
        lab.start_nginx()
        lab.apply(lab.write_policy("auto", E2E_POLICY))
        sc = lab.status()[0]["syncookies"]
        assert sc["auto_ports"] == [[80, 80]] and sc["ports"] == [] and sc["auto_on"] == []
        curl()                                           # off: the stack's own handshake
        assert lab.stats()["syncookie_synacks"]["packets"] == 0
        w = Watcher(lab, lab.write_policy("auto", E2E_POLICY), tmp_path)
        try:
            # Ready once it says what it switches and that it is watching
            # (a note before may say "watching" too).
            assert wait_until(lambda: any("syncookies auto on tcp ports 80" in ln for ln in w.err)
                              and any("xdpguard watch: watching " in ln for ln in w.err), 300), w.err
            # A spoofed SYN flood, bounded: 1,000/s for 6 s, over 200/s.
            flood = lab.popen("client", ["hping3", "-q", "-S", "-p", "80", "--rand-source", "-i", "u1000",
                                         "-c", "6000", SERVER4], what="hping3")
            try:
                assert wait_until(lambda: ("syncookies_on", 80) in switches(), scaled(5)), (w.lines, w.err)
                on = lab.status()[0]["syncookies"]["auto_on"]
                assert [o["port"] for o in on] == [80] and on[0]["syn_rate"] > 200 and on[0]["threshold"] == 200
                text = lab.xdpguard("status").stdout
                assert "syncookies auto (watch): tcp ports 80; on: 80 (SYN " in text, text
                before = lab.stats()["syncookie_synacks"]["packets"]
                curl()                                   # through the cookie path, during the flood
                assert lab.stats()["syncookie_synacks"]["packets"] > before
                assert switches() == [("syncookies_on", 80)]       # no flapping during the flood
            finally:
                lab.stop(flood)
            # The flood over: off after the hold (2 s), once.
            assert wait_until(lambda: ("syncookies_off", 80) in switches(), scaled(8)), (w.lines, w.err)
            assert switches() == [("syncookies_on", 80), ("syncookies_off", 80)]
            assert lab.status()[0]["syncookies"]["auto_on"] == []
            before = lab.stats()["syncookie_synacks"]["packets"]
            curl()
            assert lab.stats()["syncookie_synacks"]["packets"] == before
        finally:
            w.stop()
        # detach: the table and the sysctls go.
        table = sc["table"]
        lab.detach()
        assert lab.run("server", ["nft", "list", "table", "inet", table]).returncode != 0
