"""Safe operations with real traffic: --confirm rollback, rollback, the
lockout guard, the drop log's rate limit, refusing a foreign XDP program."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import require_tool
from testing.lab import CLIENT4, EXTRA4, REPO, SERVER4, Lab
from testing.timing import scaled, wait_until

pytestmark = pytest.mark.e2e

ALLOW_PING = """
[policy]
name = "{name}"
[[rule]]
name = "ping"
proto = "icmp"
src = "{client}/32"
action = "allow"
[[rule]]
name = "{extra}"
proto = "udp"
dport = 9
action = "deny"
"""


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


def _ping_flow(lab, count=300, interval=0.01):
    return lab.popen("client", ["ping", "-q", "-c", str(count), "-i", str(interval), "-W", "1", SERVER4],
                     what="ping flow")


def _loss(out: str) -> int:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)) - int(m.group(2))


def test_confirm_timeout_restores_previous_without_loss(lab):
    lab.detach(check=False)
    a = lab.write_policy("a", ALLOW_PING.format(name="pol-a", client=CLIENT4, extra="a-only"))
    b = lab.write_policy("b", ALLOW_PING.format(name="pol-b", client=CLIENT4, extra="b-only"))
    lab.apply(a)
    flow = _ping_flow(lab, count=400)
    assert wait_until(lambda: lab.counters()["ping"]["packets"] > 0, scaled(10), interval=0.1), "no ping flow"
    cp = lab.xdpguard("apply", b, "--iface", lab.server_if, "--netns", lab.server_ns,
                      "--confirm", "1.5", check=False)
    assert cp.returncode == 3, cp.stdout + cp.stderr
    assert "not confirmed" in cp.stdout
    out, _ = flow.popen.communicate(timeout=scaled(30))     # the flow runs to its end
    assert _loss(out) == 0, out
    assert lab.stats()["policy"] == "pol-a"
    names = [r["rule"] for r in lab.stats()["rules"]]
    assert "a-only" in names and "b-only" not in names
    # Counters were kept across apply and rollback: every echo request is there.
    assert lab.counters()["ping"]["packets"] == 400


def test_confirm_in_time_keeps_new_policy(lab):
    lab.detach(check=False)
    a = lab.write_policy("a2", ALLOW_PING.format(name="pol-a", client=CLIENT4, extra="a-only"))
    b = lab.write_policy("b2", ALLOW_PING.format(name="pol-b", client=CLIENT4, extra="b-only"))
    lab.apply(a)
    # Time to see the new policy and confirm it: a few CLI runs, each slow
    # on a slow machine. Confirming ends the wait.
    window = scaled(20, cap=300)
    p = subprocess.Popen([*lab.xg, "apply", str(b), "--iface", lab.server_if, "--netns", lab.server_ns,
                          "--confirm", f"{window:.0f}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO)

    def pending():
        st = [s for s in lab.status() if s["iface"] == lab.server_if]
        return st and st[0]["policy"] == "pol-b" and st[0]["confirm_deadline"]
    assert wait_until(pending, window, interval=0.2), "the new policy did not come up awaiting confirmation"
    lab.xdpguard("confirm", "--iface", lab.server_if, "--netns", lab.server_ns)
    out, err = p.communicate(timeout=scaled(30))
    assert p.returncode == 0, out + err
    assert lab.stats()["policy"] == "pol-b"
    # rollback goes back one level, keeping counters, and works both ways
    lab.xdpguard("rollback", "--iface", lab.server_if, "--netns", lab.server_ns)
    assert lab.stats()["policy"] == "pol-a"
    assert lab.run("client", ["ping", "-c", "2", "-W", "1", SERVER4]).returncode == 0


def test_lockout_guard(lab):
    lab.detach(check=False)
    pol = lab.write_policy("lock", """
[policy]
name = "lockout"
default = "deny"
[[rule]]
name = "web"
proto = "tcp"
dport = 80
action = "allow"
""")
    env = dict(os.environ, SSH_CONNECTION=f"{CLIENT4} 50022 {SERVER4} 22")
    cmd = [*lab.xg, "apply", str(pol), "--iface", lab.server_if, "--netns", lab.server_ns]
    cp = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert cp.returncode == 2
    assert "the default (deny) would drop the SSH session" in cp.stderr
    assert "Traceback" not in cp.stderr
    assert lab.xdp_on() is None, "a refused policy must change nothing"
    cp = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=env, cwd=REPO)
    assert cp.returncode == 0, cp.stderr
    assert lab.xdp_on() is not None
    # protect entries are checked too
    pol2 = lab.write_policy("lock2", """
[policy]
name = "lockout2"
protect = ["10.200.0.12:22"]
[[rule]]
name = "no-ssh"
proto = "tcp"
dport = 22
action = "deny"
""")
    cp = lab.xdpguard("apply", pol2, "--iface", lab.server_if, "--netns", lab.server_ns, check=False)
    assert cp.returncode == 2 and "rule 'no-ssh' (rule 1) would drop protected 10.200.0.12/32" in cp.stderr


def _guard(monkeypatch, protect="", ssh=None, addrs=None, fails=None):
    """safety.lockouts of a small policy, with own_addresses answering
    addrs or raising fails."""
    from xdpguard import bans, safety
    from xdpguard.compiler import compile_policy
    from xdpguard.policy import load

    def own(_ns):
        if fails:
            raise fails
        return addrs or []
    monkeypatch.setattr(bans, "own_addresses", own)
    policy = load("g.toml", f"[policy]\n{protect}\n[[rule]]\nname = \"r\"\nproto = \"udp\"\naction = \"deny\"\n")
    env = {} if ssh is None else {"SSH_CONNECTION": ssh}
    return safety.lockouts(policy, compile_policy(policy), None, env)


def test_lockout_guard_says_what_it_could_not_check(monkeypatch):
    from xdpguard.errors import NetnsError
    g = _guard(monkeypatch, 'protect = ["192.0.2.10:22"]', fails=OSError(13, "Permission denied"))
    assert g.problems == []
    assert len(g.unchecked) == 1 and "cannot read the addresses and default gateways of this host" in g.unchecked[0]
    assert "Permission denied" in g.unchecked[0] and "ICMP from the gateways was not checked" in g.unchecked[0]
    g = _guard(monkeypatch, fails=NetnsError("network namespace 'x' does not exist"))
    assert "does not exist" in g.unchecked[0]
    # A protect entry of a family the host has no address of.
    g = _guard(monkeypatch, 'protect = ["[2001:db8::5]:22"]', addrs=[("192.0.2.1", "an address of this host")])
    assert g.unchecked == ["protect 2001:db8::5/128 port 22: this host has no IPv6 address; "
                           "checked without a destination address"]
    g = _guard(monkeypatch, ssh="10.0.0.1 50022 10.0.0.2", addrs=[("192.0.2.1", "an address of this host")])
    assert g.unchecked == ["SSH_CONNECTION '10.0.0.1 50022 10.0.0.2' is not 'client port server port': "
                           "the SSH session was not checked"]
    # Everything readable: nothing to say.
    assert _guard(monkeypatch, ssh="10.0.0.1 50022 10.0.0.2 22",
                  addrs=[("192.0.2.1", "an address of this host")]).unchecked == []
    # Not an error of reading addresses: not swallowed.
    with pytest.raises(ZeroDivisionError):
        _guard(monkeypatch, fails=ZeroDivisionError())


def test_apply_warns_what_the_guard_could_not_check(lab):
    lab.detach(check=False)
    pol = lab.write_policy("warn", ALLOW_PING.format(name="pol-w", client=CLIENT4, extra="w-only"))
    env = dict(os.environ, SSH_CONNECTION="garbage")
    cp = subprocess.run([*lab.xg, "apply", str(pol), "--iface", lab.server_if, "--netns", lab.server_ns],
                        capture_output=True, text=True, env=env, cwd=REPO)
    assert cp.returncode == 0, cp.stderr
    assert ("warning: lockout guard: SSH_CONNECTION 'garbage' is not 'client port server port': "
            "the SSH session was not checked") in cp.stderr
    lab.detach()


def test_drop_log_is_rate_limited(lab):
    lab.detach(check=False)
    pol = lab.write_policy("log", """
[policy]
name = "logged"
log_rate = 5
[[rule]]
name = "no-ping"
proto = "icmp"
action = "deny"
log = true
""")
    lab.apply(pol)
    lab.xdpguard("log", "--iface", lab.server_if, "--netns", lab.server_ns)   # drain
    t0 = time.monotonic()
    lab.run("client", ["ping", "-q", "-c", "200", "-i", "0.005", "-W", "1", SERVER4], timeout=scaled(20))
    elapsed = time.monotonic() - t0
    cp = lab.xdpguard("log", "--iface", lab.server_if, "--netns", lab.server_ns, "--json")
    docs = [json.loads(l) for l in cp.stdout.splitlines()]
    events = [d for d in docs if "rule" in d]
    supp = [d for d in docs if "suppressed" in d]
    assert events and all(e["rule"] == "no-ping" and e["src"] == CLIENT4 and e["proto"] == "icmp" for e in events)
    # burst (one second of rate) + rate x elapsed, never more
    assert len(events) <= 5 + 5 * elapsed + 1
    assert supp and supp[0]["suppressed"] + len(events) >= 195


def test_refuses_foreign_xdp_program(lab):
    require_tool("xdp-filter")
    lab.detach(check=False)
    lab.run("server", ["xdp-filter", "load", lab.server_if, "--mode", "skb"], check=True)
    try:
        pol = lab.write_policy("f", ALLOW_PING.format(name="pol-f", client=CLIENT4, extra="x"))
        cp = lab.xdpguard("apply", pol, "--iface", lab.server_if, "--netns", lab.server_ns, check=False)
        assert cp.returncode == 2
        assert "another XDP program is attached" in cp.stderr and "--force" in cp.stderr
    finally:
        lab.run("server", ["xdp-filter", "unload", lab.server_if])


def test_failed_reapply_keeps_the_running_policy_and_rollback_recompiles(lab, monkeypatch):
    """A re-apply that fails while writing the inactive generation (here:
    no memory for a trie) changes nothing that runs; that generation was
    the rollback target and is half written, so rollback never flips to
    it: it compiles that policy again from the copy kept at its apply."""
    import errno

    from xdpguard import loader
    from xdpguard.compiler import compile_policy
    from xdpguard.policy import load
    lab.detach(check=False)
    pol = {n: lab.write_policy(n, ALLOW_PING.format(name=f"pol-{n}", client=CLIENT4, extra=f"{n}-only"))
           for n in ("a", "b", "c")}
    lab.apply(pol["a"])
    lab.apply(pol["b"])                       # in place: a stays in the other generation

    def no_memory(*_args, **_kw):
        raise OSError(errno.ENOMEM, "no memory for a trie")
    monkeypatch.setattr(loader, "_put_trie", no_memory)
    c = load(str(pol["c"]))
    with pytest.raises(OSError):
        loader.apply(c, compile_policy(c), lab.server_if, netns=lab.server_ns, log=lambda m: None)
    monkeypatch.undo()

    assert lab.status()[0]["policy"] == "pol-b"
    assert _loss(lab.run("client", ["ping", "-q", "-c", "3", "-i", "0.05", "-W", "1", SERVER4]).stdout) == 0
    cp = lab.xdpguard("rollback", "--iface", lab.server_if, "--netns", lab.server_ns, check=False)
    assert cp.returncode == 0 and "applied in place" in cp.stdout, cp.stdout + cp.stderr
    assert lab.status()[0]["policy"] == "pol-a"
    names = [r["rule"] for r in lab.stats()["rules"]]
    assert "a-only" in names and "b-only" not in names and "c-only" not in names
    assert _loss(lab.run("client", ["ping", "-q", "-c", "3", "-i", "0.05", "-W", "1", SERVER4]).stdout) == 0
    lab.apply(pol["c"])
    assert lab.status()[0]["policy"] == "pol-c"
    lab.xdpguard("rollback", "--iface", lab.server_if, "--netns", lab.server_ns)
    assert lab.status()[0]["policy"] == "pol-a"
    lab.detach()
