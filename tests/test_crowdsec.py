"""xdpguard as a CrowdSec bouncer, against a real CrowdSec Local API.

The LAPI runs alone (testing/engines.py: `crowdsec -no-cs -no-capi`, its
own config directory, SQLite database and random loopback port); the
decisions come from its own cscli. `xdpguard watch` with [crowdsec] and
no [mitigation] pulls them into the ban maps of a veth lab; real packets
check what XDP drops.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import time

import pytest

from tests.conftest import require_lab
from testing.engines import CrowdSecLAPI, Host, LockWatch, blocklist_csv, lock_aware_wait
from testing.lab import CLIENT4, EXTRA4, SERVER4, Lab
from testing.timing import scaled, slowdown
from xdpguard import pins
from xdpguard.crowdsec import decision_prefix, parse_go_duration

INTERVAL = 1.0
ALLOWED = EXTRA4[10]
START_DEADLINE = 300.0


# ---------------------------------------------------------------- no engine needed

@pytest.mark.parametrize("text, seconds", [
    ("58.78694404s", 58.78694404), ("1h59m58.786941307s", 7198.786941307), ("4h", 14400.0),
    ("-15.863246ms", -0.015863246), ("1m30s", 90.0), ("0", 0.0), ("2µs", 2e-6), ("500us", 5e-4)])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1x", "h", "1h-2m", "s1"])
def test_go_durations_refused(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_decision_prefixes():
    scopes = ("ip", "range")
    assert decision_prefix({"type": "ban", "scope": "Ip", "value": "192.0.2.7"}, scopes)[3] == "192.0.2.7/32"
    assert decision_prefix({"type": "ban", "scope": "Ip", "value": "2001:db8::1"}, scopes)[3] == "2001:db8::1/128"
    assert decision_prefix({"type": "ban", "scope": "Range", "value": "198.51.100.9/24"}, scopes)[3] == "198.51.100.0/24"
    assert decision_prefix({"type": "ban", "scope": "Range", "value": "198.51.100.0/24"}, ("ip",)) is None
    assert decision_prefix({"type": "captcha", "scope": "Ip", "value": "192.0.2.7"}, scopes) is None
    assert decision_prefix({"type": "ban", "scope": "Country", "value": "FR"}, scopes) is None
    with pytest.raises(ValueError):
        decision_prefix({"type": "ban", "scope": "Ip", "value": "not-an-ip"}, scopes)


# ---------------------------------------------------------------- a real LAPI

POLICY = """
[policy]
name = "crowdsec"
[[rule]]
name = "ping"
proto = "icmp"
action = "allow"
[mitigation]
allow = ["{allowed}"]
[crowdsec]
lapi = "{lapi}"
key_file = "{key_file}"
interval = "{interval}s"
scopes = ["ip", "range"]
push = true
machine_id = "{machine}"
password_file = "{password_file}"
"""
MACHINE = "xdpguard-push"


class Bouncing:
    def __init__(self, lapi: CrowdSecLAPI, host: Host):
        self.lapi, self.host = lapi, host


@pytest.fixture(scope="module")
def bouncing(tmp_path_factory):
    require_lab("crowdsec", "cscli")
    d = tmp_path_factory.mktemp("crowdsec")
    with CrowdSecLAPI(d / "lapi") as lapi, Lab() as lab:
        key_file = d / "bouncer.key"
        key_file.write_text(lapi.add_bouncer("xdpguard-tests") + "\n")
        # The machine xdpguard pushes its own bans as (push = true); -f: its
        # credentials file, not the one of the LAPI's own cscli.
        password_file = d / "machine.pass"
        password_file.write_text(secrets.token_hex(16) + "\n")
        os.chmod(password_file, 0o600)
        lapi.cscli("machines", "add", MACHINE, "--password", password_file.read_text().strip(),
                   "-f", str(d / "machine.yaml"))
        policy = lab.write_policy("crowdsec", POLICY.format(allowed=ALLOWED, lapi=lapi.url, key_file=key_file,
                                                            interval=f"{INTERVAL:g}", machine=MACHINE,
                                                            password_file=password_file))
        host = Host(lab, "bouncer", policy, "1s")
        host.start()
        try:
            host.wait_log("watching", timeout=scaled(START_DEADLINE, cap=900))
            host.wait_log("crowdsec: pulling decisions", timeout=scaled(30))
            yield Bouncing(lapi, host)
        finally:
            host.stop()


def _in_force(h: Host, prefix: str) -> bool:
    with h.banmaps() as bm:
        return bm.in_force(ipaddress.ip_network(prefix))


def _gets_through(h: Host, src: str) -> bool:
    cp = h.lab.run("client", ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", src, SERVER4], timeout=30)
    return cp.returncode == 0


def _tail(h: Host) -> str:
    """The watch's last lines, for a failure's message."""
    return "".join(h.err[-12:])


def _deadline() -> float:
    """The issue's bound: a decision is enforced within interval + 1 s."""
    return (INTERVAL + 1.0) * max(1.0, slowdown())


def _timed(h: Host, cond, what: str) -> float:
    """Seconds until cond() holds, less the time the machine's pin lock
    was another process's (another xdpguard's apply: the bouncer waits for
    it to write, and that wait is no part of the bouncer)."""
    t0 = time.monotonic()
    with LockWatch({os.getpid(), h.p.pid}) as lock:
        assert lock.wait_until(cond, _deadline() + scaled(10), interval=0.01), _tail(h)
        took = time.monotonic() - t0
    print(f"\ncrowdsec {what}: {took * 1000:.0f} ms, of which the pin lock was another process's "
          f"{lock.foreign_s * 1000:.0f} ms (interval {INTERVAL:g}s)")
    return took - lock.foreign_s


def test_decision_added_and_deleted(bouncing):
    h, x = bouncing.host, EXTRA4[0]
    assert _gets_through(h, x)
    bouncing.lapi.cscli("decisions", "add", "--ip", x, "--duration", "1m", "--reason", "ssh-bf")
    took = _timed(h, lambda: _in_force(h, x), "decision add -> in force at XDP")
    assert took < _deadline(), took
    e = h.bans()[f"{x}/32"]
    assert e["origin"] == "crowdsec:ssh-bf" and e["reason"] == "ssh-bf", e
    assert 50 < e["remaining_s"] <= 60, e
    assert not _gets_through(h, x) and _gets_through(h, CLIENT4)
    assert h.bans()[f"{x}/32"]["packets"] > 0                       # dropped at XDP

    bouncing.lapi.cscli("decisions", "delete", "--ip", x)
    took = _timed(h, lambda: not _in_force(h, x), "decision delete -> lifted")
    assert took < _deadline(), took
    assert _gets_through(h, x)


def test_range_decision_and_allowlist(bouncing):
    h = bouncing.host
    n = len(h.err)
    bouncing.lapi.cscli("decisions", "add", "--range", "10.200.1.0/24", "--duration", "5m")
    bouncing.lapi.cscli("decisions", "add", "--ip", ALLOWED, "--duration", "5m")
    # The host's own network: its addresses and the allowlist win.
    bouncing.lapi.cscli("decisions", "add", "--range", "10.200.0.0/24", "--duration", "5m")
    _timed(h, lambda: _in_force(h, "10.200.1.0/24"), "range decision -> in force")
    # Logged by the bouncer's thread, which a write may hold on the pin lock.
    wait = lock_aware_wait({os.getpid(), h.p.pid})
    h.wait_log(f"crowdsec: not banning {ALLOWED}/32: it covers {ALLOWED}/32, allowlisted", since=n,
               timeout=scaled(30), wait=wait)
    h.wait_log("crowdsec: not banning 10.200.0.0/24: it covers ", since=n, timeout=scaled(30), wait=wait)
    assert not _in_force(h, ALLOWED) and not _in_force(h, "10.200.0.0/24")
    assert not _gets_through(h, "10.200.1.9")
    assert _gets_through(h, ALLOWED)
    bouncing.lapi.cscli("decisions", "delete", "--range", "10.200.1.0/24")
    _timed(h, lambda: not _in_force(h, "10.200.1.0/24"), "range decision delete -> lifted")


def _lapi_decisions(lapi: CrowdSecLAPI) -> list[dict]:
    """Every decision the LAPI holds (`cscli decisions list -a`: its alerts, with their decisions)."""
    alerts = json.loads(lapi.cscli("decisions", "list", "-a", "-o", "json") or "null") or []
    return [d for a in alerts for d in (a.get("decisions") or ())]


def test_own_bans_pushed_to_the_lapi(bouncing):
    """push = true: a ban made here (`xdpguard ban`) becomes a decision in
    the LAPI, origin xdpguard, scenario xdpguard/manual, and stays a local
    ban here (no loop); its unban deletes the decision, and the host does
    not take it back from the stream."""
    h, lapi, x, y = bouncing.host, bouncing.lapi, EXTRA4[5], EXTRA4[6]
    wait = lock_aware_wait({os.getpid(), h.p.pid})

    def pushed():
        return [d for d in _lapi_decisions(lapi) if d.get("value") == x]
    h.xdpguard("ban", x, "--ttl", "10m", "--reason", "scanner")
    assert wait(pushed, _deadline() + scaled(10)), (_lapi_decisions(lapi), _tail(h))
    (d,) = pushed()
    assert (d["origin"], d["scenario"], d["type"], d["scope"]) == ("xdpguard", "xdpguard/manual", "ban", "Ip"), d
    h.wait_log("crowdsec: pushing this host's bans to ", timeout=scaled(10), wait=wait)
    assert h.bans()[f"{x}/32"]["origin"] == "local"

    h.xdpguard("unban", x)
    assert wait(lambda: not pushed(), _deadline() + scaled(10)), (pushed(), _tail(h))
    # A decision added after the delete in force: the host has pulled since.
    lapi.cscli("decisions", "add", "--ip", y, "--duration", "1m")
    _timed(h, lambda: _in_force(h, y), "decision add -> in force (after a push's delete)")
    assert not _in_force(h, x) and f"{x}/32" not in h.bans()
    assert _gets_through(h, x)
    lapi.cscli("decisions", "delete", "--ip", y)
    _timed(h, lambda: not _in_force(h, y), "decision delete -> lifted")


def test_100k_decisions(bouncing, tmp_path):
    """100,000 decisions imported with cscli: all enforced, however the
    LAPI hands them out (in a few large deltas, and some only in the whole
    state: an import commits them late). Then the bouncer's own share: a
    watch starting on empty ban maps puts all 100,000 in force within 5 s
    of the LAPI's answer to its startup pull."""
    h = bouncing.host
    n = 100_000
    csv = blocklist_csv(tmp_path / "decisions.csv", n)
    # From no decision at all: none of the earlier ones expires meanwhile.
    bouncing.lapi.cscli("decisions", "delete", "--all")

    def crowdsec_bans():
        return [p for p, e in h.bans().items() if e["origin"].startswith("crowdsec:")]
    assert lock_aware_wait({os.getpid(), h.p.pid})(lambda: not crowdsec_bans(), _deadline() + scaled(10)), \
        (crowdsec_bans(), _tail(h))
    with h.banmaps() as bm:
        before = bm.maps[4].count()
    t0 = time.monotonic()
    bouncing.lapi.cscli("decisions", "import", "-i", csv, "--reason", "bulk", timeout=scaled(600))
    t_import = time.monotonic()

    def count():
        with h.banmaps() as bm:
            return bm.maps[4].count() - before
    assert lock_aware_wait({os.getpid(), h.p.pid})(lambda: count() >= n, scaled(180), interval=0.1), \
        (count(), _tail(h))
    took = time.monotonic() - t_import
    print(f"\ncrowdsec: {n} decisions imported in {t_import - t0:.1f} s; all in force {took:.2f} s after "
          f"the import ended")
    with h.banmaps() as bm:
        assert bm.records()["100.64.0.1/32"].origin == "crowdsec:bulk"

    # The startup pull, timed by the watch: the LAPI's answer, then its own
    # part (the answer parsed, checked, written to the maps and records).
    h.stop()
    with h.banmaps() as bm:
        with pins.locked():
            bm.remove_many([e["prefix"] for e in bm.entries()])
        assert bm.empty()
    n_err = len(h.err)
    t0 = time.monotonic()
    h.start()
    line = h.wait_log("crowdsec: pulling decisions", since=n_err, timeout=scaled(300))
    took = time.monotonic() - t0
    assert count() >= n, (count(), line)
    m = re.search(r"(\d+) bans in force \(the LAPI answered in ([\d.]+) s, in force ([\d.]+) s later", line)
    assert m and int(m.group(1)) >= n, line
    lapi_s, own_s = float(m.group(2)), float(m.group(3))
    print(f"crowdsec: a watch starting on empty maps: {n} decisions in force {took:.2f} s after it started; "
          f"the LAPI answered in {lapi_s:.2f} s, in force {own_s:.2f} s later ({line.strip()})")
    assert own_s < 5.0 * max(1.0, slowdown()), line
