"""Numbers a person reads at a glance (issue 17): human units in the tables
of stats, bans, top and status (10.8k pps, 570 KiB, 4.6 Mbit/s), exact
integers with --exact and always in --json; colour and screen clearing only
on a terminal (NO_COLOR honoured); top says what each rate counts, keeps a
banned source in view with the rate its ban drops now, and counts the
sources of a many-source flood; status names what a policy fills as a
policy does, with the ban capacity of max_bans, whether watch runs (its
PID, its probes) and whether the policy file changed since apply.

The first half needs no kernel; the second applies a real policy in a lab
(testing/lab.py) and reads the real program's counters.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from testing.lab import EXTRA4, SERVER4, SPOOF_NET, Lab, json_docs
from testing.webpolicy import web_policy
from xdpguard import cliutil, pins, stats
from xdpguard.cli_mitigation import _print_top, _top_view
from xdpguard.cliutil import Numbers, paint, table
from xdpguard.policy import load, sha256_on_disk

RECORD = pins.Record(netns="host", iface="eth1", mitigation=pins.MitigationInfo(True, 32, 64))


# ---------------------------------------------------------------- formatting

@pytest.mark.parametrize("n, text", [(0, "0"), (7, "7"), (950, "950"), (999, "999"), (1000, "1.0k"),
                                     (10_812, "10.8k"), (108_123, "108k"), (1_234_567, "1.2M"),
                                     (3.4e9, "3.4G")])
def test_counts(n, text):
    assert Numbers().count(n) == text
    assert Numbers(exact=True).count(n) == str(int(n))


@pytest.mark.parametrize("r, text", [(0.0, "0"), (0.8, "0.8"), (12.0, "12"), (950.4, "950"), (10_812.3, "10.8k")])
def test_rates(r, text):
    """A fraction of a packet per second stays one (0.8, not 1 or 0)."""
    assert Numbers().rate(r) == text
    assert Numbers(exact=True).rate(r) == f"{r:.1f}"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (512, "512 B"), (1024, "1.0 KiB"), (583_680, "570 KiB"),
                                     (5.6 * 2 ** 20, "5.6 MiB"), (3 * 2 ** 30, "3.0 GiB"),
                                     (1009 * 1024, "1.0 MiB"), (1000, "1.0 KiB")])
def test_sizes(n, text):
    assert Numbers().size(n) == text
    assert Numbers(exact=True).size(n) == str(int(n))


@pytest.mark.parametrize("bytes_s, text", [(0, "0 bit/s"), (10, "80 bit/s"), (575_000, "4.6 Mbit/s"),
                                           (1.25e8, "1.0 Gbit/s"), (1250, "10.0 kbit/s")])
def test_bit_rates_as_thresholds_are_written(bytes_s, text):
    """Rates in bits per second, the unit of `pps`/`bps` thresholds and links;
    the text parses back (units.parse_rate) to about the same rate."""
    from xdpguard.units import parse_rate
    assert Numbers().bits(bytes_s) == text
    assert Numbers(exact=True).bits(bytes_s) == f"{round(bytes_s * 8)} bit/s"
    if bytes_s:
        back = parse_rate(text.replace(" ", "")).per_second
        assert abs(back - bytes_s) <= 0.05 * bytes_s


def test_table_widths_ignore_colour():
    plain = table(["a", "n"], [["x", "1"], ["yy", "22"]], right={1})
    painted = table(["a", "n"], [[paint("x", "red", True), "1"], ["yy", "22"]], right={1})
    assert re.sub(r"\x1b\[[0-9;]*m", "", painted) == plain


def test_colour_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert not cliutil.colour(io.StringIO())
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert cliutil.colour(tty)
            monkeypatch.setenv("NO_COLOR", "1")
            assert not cliutil.colour(tty)
    finally:
        os.close(master)
        os.close(slave)
    assert paint("x", "red", False) == "x"


def test_frames_append_off_a_terminal():
    out = io.StringIO()
    cliutil.new_frame(True, out)
    cliutil.new_frame(False, out)
    assert out.getvalue() == "\n"
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            cliutil.new_frame(False, tty)
            tty.flush()
            assert os.read(master, 64) == b"\x1b[H\x1b[2J"
    finally:
        os.close(master)
        os.close(slave)


# ---------------------------------------------------------------- top's view

def _snap(rule_packets, ban_packets=0, bytes_per_packet=100):
    zero = {"packets": 0, "bytes": 0}
    return {"rules": [{"rule": "web", "action": "allow", "packets": rule_packets,
                       "bytes": rule_packets * bytes_per_packet, "dropped_packets": 0, "dropped_bytes": 0}],
            "bans": {"packets": ban_packets, "bytes": ban_packets * bytes_per_packet},
            "malformed": {**zero, "causes": {"truncated": dict(zero)}}, "nd_passed": dict(zero),
            "no_entry": dict(zero), "new_source_overflow": dict(zero), "syncookie_synacks": dict(zero),
            "syncookie_bad_acks": dict(zero), "syncookie_cannot_happen": {**zero, "causes": {}}}


def _ban(prefix, packets, left=600.0):
    return {"prefix": prefix, "reason": "syn_rate 900/s > 500/s", "source": "metric", "metric": "syn_rate",
            "remaining_s": left, "expired": False, "since": None, "expires": None,
            "packets": packets, "bytes": packets * 100}


def test_top_counts_a_many_source_flood_and_keeps_the_banned_in_view():
    """5,900 sources at 1 pps each (a random-source SYN flood): the top 10
    are 0.17% of it, and top says so; a banned source shows the rate its
    ban drops now, not only its total."""
    sources = {f"198.18.{i // 256}.{i % 256}/32": {"pps": 1.0, "bps": 60.0, "syn_rate": 1.0, "conn_rate": 0.0,
                                                    "resets": 0.0}
               for i in range(5900)}
    prev, cur = _snap(0, 1000), _snap(5900 * 2, 1000 + 2 * 1500)
    view = _top_view(RECORD, sources, {}, set(), prev, cur, 2.0,
                     [_ban("203.0.113.7/32", 1000 + 3000)], [_ban("203.0.113.7/32", 1000)])
    assert view["sources"]["distinct"] == 5900
    assert view["sources"]["pps"] == 5900.0
    assert view["sources"]["top_share"] == round(10 / 5900, 3)
    assert view["bans"][0]["drop_pps"] == 1500.0 and view["bans"][0]["drop_bps"] == 150_000.0
    assert view["xdp"] == {"pps": 7400.0, "bps": 740_000.0, "drop_pps": 1500.0, "ban_drop_pps": 1500.0}
    assert view["after_rules"] == {"pps": 5900.0, "drop_pps": 0.0}
    out = io.StringIO()
    sys.stdout, saved = out, sys.stdout
    try:
        _print_top(view, Numbers())
    finally:
        sys.stdout = saved
    text = out.getvalue()
    assert "at XDP, every frame before bans and rules: 7.4k pps, 5.9 Mbit/s" in text
    assert "5.9k sources sent 5.9k pps; the top 10 send 0.2%" in text
    banned = next(ln for ln in text.splitlines() if ln.startswith("203.0.113.7/32"))
    assert "1.5k" in banned and "1.2 Mbit/s" in banned and "banned, 10m0s left" in banned
    assert "one site only where a site has an IP of its own" in text
    assert "\x1b[" not in text


def test_source_totals_add_up_the_rates_before_rounding():
    """6,000 sources with one packet each in 3 s: 2,000 pps, not the
    1,800 that 6,000 rates rounded to 0.3 would add up to."""
    sources = {f"198.18.{i // 256}.{i % 256}/32": {"pps": 1 / 3, "bps": 18.0, "syn_rate": 1 / 3,
                                                    "conn_rate": 0.0, "resets": 0.0} for i in range(6000)}
    view = _top_view(RECORD, sources, {}, set(), _snap(0), _snap(6000), 3.0, [])
    assert view["sources"]["pps"] == 2000.0 and view["sources"]["distinct"] == 6000
    assert view["sources"]["pps"] == view["xdp"]["pps"]


def test_a_new_or_remade_ban_counts_from_zero():
    view = _top_view(RECORD, {}, {}, set(), _snap(0), _snap(0), 1.0,
                     [_ban("192.0.2.1/32", 50), _ban("192.0.2.2/32", 20)], [_ban("192.0.2.2/32", 900)])
    assert {b["prefix"]: b["drop_pps"] for b in view["bans"]} == {"192.0.2.1/32": 50.0, "192.0.2.2/32": 20.0}


# ---------------------------------------------------------------- status's parts

def test_policy_sha256_on_disk_is_loads(tmp_path):
    """The file and its set files, as `load` hashes them; a change in
    either is a change."""
    (tmp_path / "bad.txt").write_text("192.0.2.0/24\n")
    pol = tmp_path / "p.toml"
    pol.write_text('[policy]\nname = "p"\n[sets]\nbad = { file = "bad.txt" }\n'
                   '[[rule]]\nname = "b"\nsrc = "@bad"\naction = "deny"\n')
    assert sha256_on_disk(pol) == load(pol).sha256
    (tmp_path / "bad.txt").write_text("192.0.2.0/24\n198.51.100.0/24\n")
    assert sha256_on_disk(pol) == load(pol).sha256
    pol.write_text("not toml [")
    with pytest.raises(ValueError):
        sha256_on_disk(pol)
    with pytest.raises(OSError):
        sha256_on_disk(tmp_path / "gone.toml")


def test_watch_pid_is_the_lock_holder(tmp_path, monkeypatch):
    """The PID that holds watch's instance lock (flock), not whatever a
    file says: a lock file nobody holds (a killed watch's) is no watch."""
    from xdpguard import daemon
    monkeypatch.setattr(daemon, "RUN_ROOT", tmp_path)
    assert stats.watch_pid("lab", "veth0") is None
    path = tmp_path / "lab" / "veth0" / "watch.lock"
    path.parent.mkdir(parents=True)
    path.write_text("999999\n")
    assert stats.watch_pid("lab", "veth0") is None
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert stats.watch_pid("lab", "veth0") == holder.pid
        # A reader's own shared lock elsewhere is not the holder.
        with open(tmp_path / "other", "w") as other:
            fcntl.flock(other, fcntl.LOCK_SH)
            assert stats.watch_pid("lab", "veth0") == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert stats.watch_pid("lab", "veth0") is None


def test_usage_names_and_ban_capacity():
    rec = pins.Record(netns="host", iface="eth1", rules=[pins.RuleSlot("web", "allow", 8)],
                      mitigation=pins.MitigationInfo(True, 32, 64, max_bans=5000))
    maps = {"ban4": {"entries": 3, "capacity": 1 << 20}, "ban6": {"entries": 1, "capacity": 1 << 20},
            "lpm4": {"entries": 12, "capacity": 12}, "sbuckets": {"entries": 0, "capacity": 262144},
            "gens": {"entries": None, "capacity": 2}}
    u = stats.usage(rec, maps)
    assert u["bans"] == {"entries": 4, "capacity": 5000}
    assert u["rules"]["entries"] == 1 and u["sets_v4"] == {"entries": 12, "capacity": None}
    assert "gens" not in u


# ---------------------------------------------------------------- the real thing

RULES = ('[[rule]]\nname = "closed"\nproto = "udp"\ndport = 9999\naction = "deny"\n'
         '[[rule]]\nname = "sink"\nproto = "udp"\ndport = 9100\naction = "allow"\n')
INTERNAL = re.compile(r"\b(gens|vecs|rbuckets|nbuckets|sbuckets|srctab|srcstat|ban4|ban6|lpm4|lpm6|banstate)\b")


@pytest.fixture(scope="module")
def lab():
    from tests.conftest import require_kernel
    require_kernel()
    with Lab() as lab:
        lab.policy = lab.write_policy("numbers", web_policy("numbers", rules=RULES, max_bans=5000))
        lab.apply(lab.policy)
        yield lab


def _where(lab):
    return ["--iface", lab.server_if, "--netns", lab.server_ns]


def _exact_row(text: str, rule: str) -> list[str]:
    return next(ln.split() for ln in text.splitlines() if ln.split()[:1] == [rule])


@pytest.mark.e2e
def test_stats_human_exact_and_json(lab):
    """3,000 denied datagrams of 1,000 bytes of UDP payload: the table says
    3.0k and about 2.9 MiB, --exact the integers, --json the same integers
    as before (no new field changes an old one)."""
    before = lab.counters()["closed"]
    sent = lab.udp_send("client", EXTRA4[3], SERVER4, 9999, 3000, 20, max_packets=3000, size=1000 - 4)["sent"]
    assert sent == 3000
    doc = lab.stats()
    closed = next(r for r in doc["rules"] if r["rule"] == "closed")
    assert closed["packets"] - before["packets"] == 3000
    assert set(closed) == {"rule", "action", "packets", "bytes", "dropped_packets", "dropped_bytes"}
    human = lab.xdpguard("stats", *_where(lab)).stdout
    row = _exact_row(human, "closed")
    assert row[2] == Numbers().count(closed["packets"]) and row[2].endswith("k"), human
    assert " ".join(row[3:5]) == Numbers().size(closed["bytes"]) and row[4] == "MiB", human
    exact = _exact_row(lab.xdpguard("stats", *_where(lab), "--exact").stdout, "closed")
    assert exact[2:6] == [str(closed[k]) for k in ("packets", "bytes", "dropped_packets", "dropped_bytes")]


@pytest.mark.e2e
def test_bans_table_in_units(lab):
    lab.xdpguard("ban", EXTRA4[4], *_where(lab), "--ttl", "10m")
    try:
        lab.udp_send("client", EXTRA4[4], SERVER4, 9100, 2000, 20, max_packets=2000, size=600)
        entry = next(b for b in json_docs(lab.xdpguard("bans", *_where(lab), "--json").stdout)[0]["bans"]
                     if b["prefix"] == f"{EXTRA4[4]}/32")
        assert entry["packets"] >= 2000
        row = next(ln for ln in lab.xdpguard("bans", *_where(lab)).stdout.splitlines() if EXTRA4[4] in ln)
        assert row.split()[-3:] == [Numbers().count(entry["packets"]), *Numbers().size(entry["bytes"]).split()], row
        assert row.split()[-3].endswith("k"), row
        row = next(ln for ln in lab.xdpguard("bans", *_where(lab), "--exact").stdout.splitlines() if EXTRA4[4] in ln)
        assert row.split()[-2:] == [str(entry["packets"]), str(entry["bytes"])]
    finally:
        lab.xdpguard("unban", EXTRA4[4], *_where(lab), check=False)


@pytest.mark.e2e
def test_status_names_and_policy_file(lab):
    """User-facing names, ban capacity = max_bans, and the policy file's
    state: unchanged, then changed on disk."""
    rec = pins.read_record(pins.iface_dir(lab.server_ns, lab.server_if))
    human = lab.xdpguard("status", "--netns", lab.server_ns).stdout
    (s,) = lab.status()
    assert not INTERNAL.search(human), human
    assert re.search(r"^\s+bans \(max_bans\)\s+0\s+5\.0k$", human, re.M), human
    assert re.search(r"^\s+rules\s+3\s+", human, re.M), human
    assert s["usage"]["bans"]["capacity"] == 5000 and s["maps"]["ban4"]["capacity"] == 1 << 20
    assert "policy file: unchanged since apply" in human
    assert s["policy_file"]["changed"] is False and s["policy_file"]["path"] == rec.policy.source
    exact = lab.xdpguard("status", "--netns", lab.server_ns, "--exact").stdout
    assert re.search(r"^\s+bans \(max_bans\)\s+0\s+5000$", exact, re.M), exact
    text = lab.policy.read_text()
    lab.policy.write_text(text.replace("max_bans = 5000", "max_bans = 6000"))
    try:
        (s,) = lab.status()
        assert s["policy_file"]["changed"] is True
        assert "CHANGED since apply" in lab.xdpguard("status", "--netns", lab.server_ns).stdout
    finally:
        lab.policy.write_text(text)


@pytest.mark.e2e
def test_top_during_a_many_source_flood_with_a_banned_source(lab):
    """100 sources of the spoof range (SPOOF_NET) and a banned one, bounded
    (at most 60 s, stopped when top returns): top counts the sources, says
    how much the top 10 send, and shows the banned source with the rate
    its ban drops now."""
    spoof = [f"{SPOOF_NET.rsplit('.', 1)[0]}.{i}" for i in range(10, 110)]
    lab.xdpguard("ban", EXTRA4[5], *_where(lab), "--ttl", "10m")
    many = lab.udp_send("client", spoof, SERVER4, 9100, 2000, 60, background=True)
    banned = lab.udp_send("client", EXTRA4[5], SERVER4, 9100, 500, 60, background=True)
    try:
        cp = lab.xdpguard("top", *_where(lab), "--once", "--json", "--interval", "2")
        human = lab.xdpguard("top", *_where(lab), "--once", "--interval", "2").stdout
    finally:
        lab.stop_json(many)
        lab.stop_json(banned)
        lab.xdpguard("unban", EXTRA4[5], *_where(lab), check=False)
    view = json.loads(cp.stdout)
    assert 90 <= view["sources"]["distinct"] <= 101, view["sources"]
    assert 0.05 <= view["sources"]["top_share"] <= 0.2, view["sources"]
    ban = next(b for b in view["bans"] if b["prefix"] == f"{EXTRA4[5]}/32")
    assert 100 <= ban["drop_pps"] <= 650, ban      # a 500/s sender, slower on a loaded machine
    assert view["xdp"]["pps"] >= view["sources"]["pps"] + 0.5 * ban["drop_pps"]
    assert f"{EXTRA4[5]}/32" not in {s["source"] for s in view["top_pps"]}
    row = next(ln for ln in human.splitlines() if ln.startswith(f"{EXTRA4[5]}/32"))
    assert "banned, " in row and "left" in row, human
    assert re.search(r"per source \(after bans, before rules\): \d+ sources sent [\d.k]+ pps; the top 10 send [\d.]+%",
                     human), human
    assert "reaching the listener" in human and "after rules:" in human


@pytest.mark.e2e
def test_status_says_whether_watch_runs(lab, tmp_path):
    """No watch: "not running", and no probe set though the record keeps
    the one the last watch used; a watch running: its PID (the holder of
    its instance lock) and its probe set; stopped: not running again."""
    from testing.watcher import Watcher
    d = pins.iface_dir(lab.server_ns, lab.server_if)
    pins.modify_record(d, lambda r: replace(r, probes="tracepoint"))    # a watch that ran once
    (s,) = lab.status()
    human = lab.xdpguard("status", "--netns", lab.server_ns).stdout
    assert s["watch"] == {"running": False, "pid": None} and s["probes"] is None
    assert "watch: not running" in human and "probes" not in human
    w = Watcher(lab, lab.policy, tmp_path, interval="1s")
    try:
        (s,) = lab.status()
        human = lab.xdpguard("status", "--netns", lab.server_ns).stdout
    finally:
        w.stop()
    assert s["watch"] == {"running": True, "pid": w.p.pid}, s["watch"]
    assert s["probes"] == pins.read_record(d).probes and s["probes"] in ("kprobe", "tracepoint", "none")
    assert f"watch: running (PID {w.p.pid}), probes {s['probes']}" in human, human
    (s,) = lab.status()
    assert s["watch"] == {"running": False, "pid": None} and s["probes"] is None


@pytest.mark.e2e
def test_stats_watch_into_a_pipe_appends_plain_frames(lab, monkeypatch):
    """stats --watch with stdout a pipe: no screen clearing, no colour,
    frames one after another (bounded: stopped after 3 frames or 30 s)."""
    import time
    monkeypatch.delenv("NO_COLOR", raising=False)
    p = subprocess.Popen([*lab.xg, "stats", *_where(lab), "--watch", "200ms"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.monotonic() + 30
    try:
        while time.monotonic() < deadline and sum(ln.startswith(f"{lab.server_ns}/") for ln in lines) < 3:
            lines.append(p.stdout.readline())
    finally:
        p.terminate()
        p.wait(10)
    text = "".join(lines)
    assert "\x1b" not in text
    assert sum(ln.startswith(f"{lab.server_ns}/") for ln in lines) == 3, text
    assert "\n\n" in text and "bit/s" in text
