"""Operating during an incident (issue 16): `watch` takes a new policy
(SIGHUP, or an apply from elsewhere), runs once per interface, stops when
its program is gone, exits 130 on SIGINT and 0 on SIGTERM, never writes
back a record it read earlier; `log` times its events right and takes
them from no other reader.

Real packets in a veth lab (testing/lab.py); every flood is bounded in
packets and seconds.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime

import pytest

from testing.lab import EXTRA4, PIN_ROOT, REPO, SERVER4, Lab, VethPair, json_docs
from testing.timing import scaled, slowdown, wait_until
from testing.watcher import Watcher
from testing.webpolicy import web_policy

pytestmark = pytest.mark.e2e

FLOODER = EXTRA4[5]              # 10.200.0.15
WINDOW = 1.0


def slack() -> float:
    """A few of watch's ticks and a flood's start-up, stretched on a slow machine."""
    return min(60.0, 4.0 * slowdown())


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


def _where(lab) -> list[str]:
    return ["--iface", lab.server_if, "--netns", lab.server_ns]


def _policy(lab, name, pps, allow=()):
    return lab.write_policy(name, web_policy(name, pps=pps, window=f"{WINDOW:g}s", ban="1m",
                                             allow=[f"{a}/32" for a in allow]))


def _banned(lab) -> set[str]:
    cp = lab.xdpguard("bans", *_where(lab), "--json")
    return {b["prefix"] for b in json.loads(cp.stdout)["bans"] if not b["expired"]}


def test_watch_takes_a_new_policy(lab, tmp_path):
    """Issue 16.1: thresholds and allowlist of an apply from elsewhere and of
    a SIGHUP reload are in force at once; a reload that fails keeps what runs."""
    lab.detach(check=False)
    lab.xdpguard("unban", FLOODER, *_where(lab), check=False)
    own = _policy(lab, "high", "2000/s")
    w = Watcher(lab, own, tmp_path)
    flood = lab.udp_send("client", FLOODER, SERVER4, 9, pps=400, seconds=scaled(120, cap=600), background=True)
    try:
        # Under the threshold of the policy watch started with: no ban.
        time.sleep(WINDOW + slack())
        assert not w.bans(), w.lines

        # An apply from elsewhere lowers it: watch says so and bans.
        t0 = time.monotonic()
        lab.apply(_policy(lab, "low", "100/s"))
        ban = w.wait_for(lambda: w.bans(f"{FLOODER}/32"), WINDOW + slack() + scaled(10))
        assert ban, f"not banned after the apply: {w.lines} {w.err}"
        assert ban[0]["threshold"] == 100 and ban[0]["_seen"] > t0
        assert w.notes("policy 'low'") and w.notes("applied from elsewhere"), w.err
        assert f"{FLOODER}/32" in _banned(lab)

        # SIGHUP: watch's own file, now allowlisting the flooder, is read
        # and applied; the ban watch made is lifted and not made again.
        own.write_text(_policy(lab, "high2", "100/s", allow=[FLOODER]).read_text())
        w.p.send_signal(signal.SIGHUP)
        assert w.wait_for(lambda: w.notes("reload (SIGHUP): policy 'high2'"), scaled(60)), w.err
        assert w.wait_for(lambda: [d for d in w.lines if d["action"] == "unban"
                                   and d["source"] == f"{FLOODER}/32"], slack()), w.lines
        assert lab.status()[0]["policy"] == "high2"
        time.sleep(WINDOW + slack())
        assert len(w.bans(f"{FLOODER}/32")) == 1 and f"{FLOODER}/32" not in _banned(lab)

        # A reload that fails validation changes nothing and says why.
        own.write_text("[policy]\nname = 'broken\n")
        w.p.send_signal(signal.SIGHUP)
        assert w.wait_for(lambda: w.notes("reload (SIGHUP) failed"), scaled(30)), w.err
        assert w.notes("keeping policy 'high2'") and w.p.poll() is None
        assert lab.status()[0]["policy"] == "high2"
    finally:
        lab.stop(flood)
        took = w.stop(signal.SIGTERM)
        lab.xdpguard("unban", FLOODER, *_where(lab), check=False)
    assert w.p.returncode == 0, "SIGTERM (a service manager's stop) is exit status 0"
    assert took < scaled(3.0)


def test_one_watch_per_interface_and_sigint(lab, tmp_path):
    """Issue 16.2 and 16.4: a second watch on the interface exits 2 at once
    naming the first; SIGINT ends the first with 130."""
    from xdpguard import pins
    lab.detach(check=False)
    pol = _policy(lab, "single", "100k/s")
    w = Watcher(lab, pol, tmp_path)
    try:
        state = tmp_path / lab.server_ns / lab.server_if / "watch.json"
        before = state.read_bytes() if state.exists() else None
        t0 = time.monotonic()
        cp = lab.xdpguard("watch", pol, *_where(lab), check=False, timeout=scaled(60))
        assert cp.returncode == 2, cp.stdout + cp.stderr
        assert f"PID {w.p.pid}" in cp.stderr and "one watch per interface" in cp.stderr, cp.stderr
        assert "Traceback" not in cp.stderr
        # Refused before anything (apply, probes): in seconds, nothing written.
        assert time.monotonic() - t0 < scaled(10)
        assert (state.read_bytes() if state.exists() else None) == before
        assert w.p.poll() is None
        # SIGINT while another process holds the pin lock (an apply, for
        # seconds): watch, waiting for it at its tick, stops at once.
        with pins.locked():
            time.sleep(2.0)
            took = w.stop(signal.SIGINT)
    finally:
        w.stop(signal.SIGINT)
    assert took < scaled(3.0), f"watch took {took:.1f}s to stop"
    assert w.p.returncode == 130, w.err
    assert w.notes("stopped; bans stay in force")


def test_watch_stops_when_its_program_is_gone(lab, tmp_path):
    """Issue 16.3: detach, and a namespace deleted under the interface, end
    watch with status 1 and one line; `stats --watch` and `top` running
    during a detach end with a clear message, not bpf_obj_get's."""
    lab.detach(check=False)
    pol = _policy(lab, "gone", "100k/s")
    watchers, readers = [], []
    with VethPair("xgo", split=False) as v:
        try:
            lab.apply(pol)
            lab.xdpguard("apply", pol, "--iface", v.a, "--netns", v.ns_a)
            # Both start at once: each compiles its probes for many seconds.
            watchers += [Watcher(lab, pol, tmp_path / "1", wait=False),
                         Watcher(lab, pol, tmp_path / "2", iface=v.a, netns=v.ns_a, wait=False)]
            w1, w2 = watchers
            # top too compiles probes: started beside them, read once it prints.
            top_out = tmp_path / "top.json"
            with open(top_out, "w") as f:
                top = subprocess.Popen([*lab.xg, "top", *_where(lab), "--interval", "0.2", "--json"],
                                       stdout=f, stderr=subprocess.PIPE, text=True, cwd=REPO)
            readers.append(top)
            w1.wait_ready()
            w2.wait_ready()
            stats = subprocess.Popen([*lab.xg, "stats", *_where(lab), "--watch", "0.2", "--json"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
            readers.append(stats)
            assert wait_until(lambda: top_out.stat().st_size > 0 or top.poll() is not None, scaled(300))
            assert top.poll() is None, top.stderr.read()
            time.sleep(0.5)

            lab.detach()
            assert w1.wait_exit(slack() + scaled(10)) == 1, w1.err
            assert w1.notes("xdpguard is no longer applied"), w1.err
            assert not w1.notes("bans stay in force"), w1.err
            for p in (stats, top):
                _out, err = p.communicate(timeout=scaled(10))
                assert p.returncode == 1 and "bpf_obj_get" not in err, (p.args, err)
                assert "no longer applied" in err and "Traceback" not in err, (p.args, err)

            # The namespace goes, and the interface with it.
            subprocess.run(["ip", "netns", "del", v.ns_a], check=True, timeout=scaled(30))
            assert w2.wait_exit(slack() + scaled(10)) == 1, w2.err
            assert w2.notes(f"the network namespace '{v.ns_a}' is gone"), w2.err
        finally:
            for w in watchers:
                w.stop(signal.SIGKILL)
            for p in readers:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            lab.detach(check=False)
            # Pins of a deleted namespace: detach cannot enter it.
            shutil.rmtree(PIN_ROOT / v.ns_a, ignore_errors=True)


def test_watch_changes_the_record_under_the_lock(lab, tmp_path, monkeypatch):
    """Issue 16.5: what another writer changes in the record while watch
    starts (its probes take seconds to compile) survives watch's own change."""
    from xdpguard import daemon, pins
    from xdpguard.policy import load
    lab.detach(check=False)
    pol = _policy(lab, "record", "100k/s")
    lab.apply(pol)
    directory = pins.iface_dir(lab.server_ns, lab.server_if)

    def probes_while_confirm_runs(_mitigation, _log=None):
        pins.modify_record(directory, lambda r: replace(r, confirm=pins.Confirm(4242.0)))
        return None
    monkeypatch.setattr(daemon, "open_probes", probes_while_confirm_runs)
    monkeypatch.setattr(daemon, "RUN_ROOT", tmp_path / "run")
    err = io.StringIO()
    w = daemon.Watch(load(pol), lab.server_if, lab.server_ns, 0.2, True, out=io.StringIO(), err=err)

    def stop_when_watching():
        wait_until(lambda: "watching" in err.getvalue(), scaled(60))
        w.exit_code = 0
        w.wake.set()
    threading.Thread(target=stop_when_watching, daemon=True).start()
    assert w.run() == 0, err.getvalue()
    rec = pins.read_record(directory)
    assert rec.probes == "none" and rec.confirm == pins.Confirm(4242.0)
    lab.detach()


def test_watch_lines_for_the_journal_and_one_time_format(lab, tmp_path, monkeypatch):
    """Issue 17 (conventions): a watch whose stderr is the journal
    (JOURNAL_STREAM names that file, as systemd does) writes its notes with
    syslog priorities and no time of their own; its decisions, on a stdout
    that is not the journal, carry RFC 3339 UTC times. `bans` and `status`
    give the same format, JSON with epoch seconds beside it."""
    from xdpguard import daemon
    from xdpguard.logline import rfc3339
    from xdpguard.policy import load
    lab.detach(check=False)
    lab.xdpguard("unban", FLOODER, *_where(lab), check=False)
    pol = _policy(lab, "journal", "100/s")
    lab.apply(pol)
    # XDP's own per-source counts decide a pps ban: no probe compile.
    monkeypatch.setattr(daemon, "open_probes", lambda *_a: None)
    monkeypatch.setattr(daemon, "RUN_ROOT", tmp_path / "run")
    out_p, err_p = tmp_path / "out", tmp_path / "err"
    flood = lab.udp_send("client", FLOODER, SERVER4, 9, pps=400, seconds=scaled(60, cap=300), background=True)
    t0 = time.time()
    try:
        with open(out_p, "w") as out, open(err_p, "w") as err:
            st = os.fstat(err.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
            w = daemon.Watch(load(pol), lab.server_if, lab.server_ns, 0.2, False, out=out, err=err)

            def stop_after_a_ban():
                wait_until(lambda: " ban " in out_p.read_text(), WINDOW + slack() + scaled(20))
                w.exit_code = 0
                w.wake.set()
            threading.Thread(target=stop_after_a_ban, daemon=True).start()
            assert w.run() == 0, err_p.read_text()
        t1 = time.time()
        notes = err_p.read_text().splitlines()
        assert notes and all(re.match(r"<[3-6]>xdpguard watch: ", ln) for ln in notes), notes
        assert notes[0].startswith("<6>xdpguard watch: watching ") and notes[-1].startswith("<6>"), notes
        decisions = out_p.read_text().splitlines()
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
        assert decisions and re.fullmatch(stamp + rf" ban {re.escape(FLOODER)}/32: pps \d+/s over 100/s; 60s "
                                          r"\(offence \d+\)", decisions[0]), decisions
        when = datetime.fromisoformat(decisions[0].split()[0]).timestamp()
        assert int(t0) <= when <= t1, (t0, decisions[0], t1)

        ban = [b for b in json.loads(lab.xdpguard("bans", *_where(lab), "--json").stdout)["bans"]
               if b["prefix"] == f"{FLOODER}/32"][0]
        assert ban["expires_rfc3339"] == rfc3339(ban["expires"]) and ban["since_rfc3339"] == rfc3339(ban["since"])
        assert int(t0) <= datetime.fromisoformat(ban["since_rfc3339"]).timestamp() <= t1
        assert re.fullmatch(stamp, ban["expires_rfc3339"]), ban
        human = lab.xdpguard("bans", *_where(lab)).stdout
        assert ban["expires_rfc3339"] in human, human

        st = lab.status()[0]
        assert st["applied_at_rfc3339"] == rfc3339(st["applied_at"]) and re.fullmatch(stamp, st["applied_at_rfc3339"])
        assert f"applied {st['applied_at_rfc3339']} from" in lab.xdpguard("status", "--netns", lab.server_ns).stdout
    finally:
        lab.stop(flood)
        lab.xdpguard("unban", FLOODER, *_where(lab), check=False)
        lab.detach(check=False)


LOGGED = """
[policy]
name = "logged"
log_rate = 50
[[rule]]
name = "no-discard"
proto = "udp"
dport = 9
action = "deny"
log = true
"""

# Sends n datagrams 0.1 s apart from a wall-clock fraction of .65 on, so
# that they straddle a second boundary; prints each one's wall time.
_SEND = r"""
import json, socket, sys, time
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
time.sleep((0.65 - time.time() % 1) % 1)
sent = []
for i in range(n):
    sent.append(time.time())
    s.sendto(b"x", (dst, 9))
    time.sleep(0.1)
print(json.dumps(sent))
"""


# argv[1:] run with SIGINT ignored.
_SIGINT_IGNORED = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.argv[1], sys.argv[1:])"]


def _log(lab, *extra) -> list[dict]:
    return [d for d in json_docs(lab.xdpguard("log", *_where(lab), "--json", *extra).stdout) if "seq" in d]


def _epoch(e: dict) -> float:
    """An event's time (RFC 3339, UTC, to the µs), checked against the
    epoch seconds beside it."""
    assert e["time"].endswith("+00:00") and len(e["time"]) == len("2026-01-01T00:00:00.000000+00:00"), e
    t = datetime.fromisoformat(e["time"]).timestamp()
    assert abs(t - e["time_epoch"]) < 1e-6, e
    return t


def test_log_times_and_readers(lab):
    """Issue 16.11 and 16.12: events sent across a second boundary come out
    in order, each within 50 ms of when it was sent; `log` run twice, and
    `log --follow` running meanwhile, all show every event; SIGINT ends
    --follow with 130 (also one started with SIGINT ignored), SIGTERM with 0."""
    lab.detach(check=False)
    lab.apply(lab.write_policy("logged", LOGGED))
    before = {e["seq"] for e in _log(lab)}
    # What they print first (the recent events) and then (followed) together.
    # The first starts with SIGINT ignored, as `xdpguard log --follow &` in a
    # script (or a CI job run so) does: Ctrl-C must end it all the same.
    cmd = [*lab.xg, "log", *_where(lab), "--follow", "--json"]
    follows = [subprocess.Popen(pre + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
               for pre in (_SIGINT_IGNORED, [])]
    shown: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
               for p, out in zip(follows, shown)]
    for t in readers:
        t.start()

    def seqs(lines) -> list[int]:
        return [d["seq"] for d in json_docs("".join(lines)) if "seq" in d and d["seq"] not in before]
    outs = None
    try:
        # Both follow before anything is sent (however long a loaded
        # machine takes to start them): they say so once their signal
        # handlers are set.
        assert wait_until(lambda: all(any('"following"' in ln for ln in out) for out in shown), scaled(60)), \
            (shown, [p.poll() for p in follows])
        n = 8
        sent = json.loads(lab.run("client", [sys.executable, "-c", _SEND, EXTRA4[6], SERVER4, str(n)],
                                  check=True, timeout=scaled(20)).stdout)
        first = [e for e in _log(lab) if e["seq"] not in before]
        second = [e for e in _log(lab) if e["seq"] not in before]
        assert len(first) == n and all(e["rule"] == "no-discard" and e["src"] == EXTRA4[6] for e in first), first
        assert second == first, "a second reader sees what the first saw"
        times = [_epoch(e) for e in first]
        assert int(sent[0]) != int(sent[-1]), "the sends straddle a second boundary"
        assert times == sorted(times), [e["time"] for e in first]
        off = [t - s for t, s in zip(times, sent)]
        assert all(-0.005 < d < 0.05 for d in off), list(zip([e["time"] for e in first], sent))
        assert [e["seq"] for e in first] == sorted(e["seq"] for e in first)
        # Signalled once each has shown every event.
        want = [e["seq"] for e in first]
        assert wait_until(lambda: all(seqs(out) == want for out in shown), scaled(30)), \
            [seqs(out) for out in shown]
        follows[0].send_signal(signal.SIGINT)
        follows[1].send_signal(signal.SIGTERM)
        # It exits at the next turn of its 0.2 s loop.
        outs = [p.wait(timeout=scaled(10)) for p in follows]
    finally:
        for p in follows:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in readers:
            t.join(scaled(10))
    errs = [p.stderr.read() for p in follows]
    for out in shown:
        assert seqs(out) == want, (out, errs)
    assert outs == [130, 0], errs
    assert _log(lab, "--last", "3") == first[-3:]
    lab.detach()
