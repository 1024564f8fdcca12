"""The benchmark suite runs end to end (bench/run.py --quick) and writes
well-formed JSON with every section. No timing is asserted: the numbers
depend on the machine; only their presence and shape are checked."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.traffic import AF_PACKET, GENERATOR_ENV, LIVE_FRAMES
from testing.timing import scaled

pytestmark = [pytest.mark.kernel]

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("percpu", "flood", "limiter", "control")
CLASSES = {"v4 udp denied", "v4 tcp syn pass", "v6 udp pass", "v6 udp denied", "vlan v4 syn pass",
           "limit within", "limit over", "banned"}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def _env(generator: str | None) -> dict:
    """The environment of a bench run: the generator forced, or chosen by
    the bench (GENERATOR_ENV unset)."""
    env = {k: v for k, v in os.environ.items() if k != GENERATOR_ENV}
    if generator:
        env[GENERATOR_ENV] = generator
    return env


@pytest.fixture(scope="module")
def expected_generator():
    """The generator the bench picks on this kernel by itself."""
    from xdpguard import bpfsys
    return LIVE_FRAMES if bpfsys.live_frames_refused() is None else AF_PACKET


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, blocklists_dir):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=scaled(600), cwd=REPO, env=_env(None))
    return r, out


def _check_flood_runs(fl: dict, generator: str) -> None:
    assert fl["runs"] and fl["generator"] == generator
    for r in fl["runs"]:
        assert r["generator"] == generator
        assert r["sent"] > 0
        # Every frame sent is received or lost with a reason.
        assert r["sent"] == r["received"] + r["lost_ring_full"] + r["unaccounted"]
        assert r["received"] == r["dropped"] + r["passed"]


def test_quick_run_succeeds(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.is_file()
    assert str(out) in r.stdout               # the JSON path is printed
    assert "targets" in r.stdout


def test_json_sections(quick_run, expected_generator):
    _, out = quick_run
    res = json.loads(out.read_text())
    assert res["meta"]["quick"] is True
    assert res["meta"]["generator"] == expected_generator
    assert res["errors"] == {}
    for s in SECTIONS:
        assert s in res and "error" not in res[s], s
        assert res[s]["elapsed_s"] >= 0
    # No NaN or infinity anywhere (json.loads accepts them; strict readers do not).
    assert all(math.isfinite(x) for x in _numbers(res))


def test_percpu_shape(quick_run):
    res = json.loads(quick_run[1].read_text())["percpu"]
    assert set(res["classes"]) == CLASSES
    assert set(res["floor"]) == CLASSES
    for key in ("a", "b", "c", "d"):
        p = res["policies"][key]
        assert set(p["prod"]) == CLASSES
        assert all(isinstance(v, (int, float)) and v > 0 for v in p["prod"].values())
        assert all(p["prod_verdicts_ok"].values()), (key, p["prod_verdicts_ok"])
    xf = res["xdp_filter"]
    assert "skipped" in xf or set(xf["10"]) == CLASSES
    assert {"c_vs_a", "d_vs_a"} <= set(res["ratios"])


def test_flood_accounting(quick_run, expected_generator):
    r, out = quick_run
    res = json.loads(out.read_text())["flood"]
    _check_flood_runs(res, expected_generator)
    assert {"xdpguard_vs_nft", "xdpguard_vs_xdp_drop", "spoof_vs_single"} <= set(res["targets"])
    assert f"generator: {expected_generator}" in r.stdout


def test_quick_run_with_the_fallback_generator(tmp_path, blocklists_dir):
    """The sections that flood, with the AF_PACKET generator forced (what a
    kernel refusing live frames gets): same accounting, and every run and
    table says which generator sent its frames."""
    out = tmp_path / "afp.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--sections", "flood,limiter",
                        "--json-out", str(out)],
                       capture_output=True, text=True, timeout=scaled(600), cwd=REPO, env=_env(AF_PACKET))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    assert res["meta"]["generator"] == AF_PACKET
    assert res["meta"]["generator_why"] == f"{GENERATOR_ENV}={AF_PACKET}"
    _check_flood_runs(res["flood"], AF_PACKET)
    assert not res["flood"]["skipped"], res["flood"]["skipped"]
    assert res["limiter"]["flood"] and all(x["generator"] == AF_PACKET for x in res["limiter"]["flood"])
    assert f"generator: {AF_PACKET}" in r.stdout
    # The table's last column: every row's generator.
    table = r.stdout.split("== flood: frames over veth", 1)[1].splitlines()
    rows = table[3:3 + len(res["flood"]["summary"])]
    assert rows and all(row.split()[-1] == AF_PACKET for row in rows), table


def test_run_refuses_an_unknown_generator():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sections", "flood"],
                       capture_output=True, text=True, timeout=scaled(60), cwd=REPO, env=_env("warp-drive"))
    assert r.returncode == 2 and f"{GENERATOR_ENV}='warp-drive'" in r.stderr and "Traceback" not in r.stderr


def test_limiter_and_control_shape(quick_run):
    res = json.loads(quick_run[1].read_text())
    lim = res["limiter"]
    assert lim["testrun"] and lim["flood"]
    for r in lim["testrun"] + lim["flood"]:
        assert {"system", "per", "sources", "rate", "admitted_pps", "error"} <= set(r)
    ctl = res["control"]
    for k in ("first_apply", "reapply_100k", "stats", "py_compile_100k", "memory"):
        assert k in ctl, k
    assert ctl["reapply_100k"]["in_place"] is True
    assert len(ctl["stats"]["runs_s"]) == 10


def test_targets_listed(quick_run):
    res = json.loads(quick_run[1].read_text())
    tg = res["targets"]
    assert len(tg) == 21
    for t in tg:
        assert t["status"] in ("PASS", "MISS", "n/a")
    # The feedback-loop, established-sources and SYN flood sections run in full runs only.
    assert [t["status"] for t in tg if t["target"].startswith("spoofed flood:")] == ["n/a"] * 3
    assert [t["status"] for t in tg if t["target"].startswith(("watch", "legit"))] == ["n/a"] * 3
    assert [t["status"] for t in tg if t["target"].startswith("SYN flood")] == ["n/a"] * 2


def test_nothing_left_behind(quick_run):
    """No namespace the run created, nor an xdpguard pin in one, survives."""
    created = json.loads(quick_run[1].read_text())["meta"]["namespaces"]
    assert created and all(n.startswith("xgb") for n in created)
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not netns & set(created)
    root = Path("/sys/fs/bpf/xdpguard")
    if root.is_dir():
        assert not {d.name for d in root.iterdir()} & set(created)


@pytest.mark.parametrize("generator", [None, AF_PACKET], ids=["chosen", AF_PACKET])
def test_behind_experiment_runs(tmp_path, generator, expected_generator):
    """bench/behind.py (the cost of work behind a frame's first read): one
    short round of two variants, well-formed JSON, a table on stdout; with
    the generator the bench picks and with the fallback forced."""
    out = tmp_path / "behind.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "behind.py"), "--rounds", "1", "--seconds", "0.2",
                        "--moves", "0,20", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=scaled(300), cwd=REPO, env=_env(generator))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "work behind the frame's first read" in r.stdout
    res = json.loads(out.read_text())
    assert res["generator"] == (generator or expected_generator)
    assert f"generator: {res['generator']}" in r.stdout
    assert set(res["variants"]) == {"read-drop", "+ 20 moves", "+ 4 lookups"}
    for v in res["variants"].values():
        assert len(v["mpps_core"]) == 1 and v["median"] > 0
    assert res["variants"]["read-drop"]["vs_read_drop"] == 1.0


def test_behind_refuses_bad_arguments():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "behind.py"), "--moves", "10,0"],
                       capture_output=True, text=True, timeout=scaled(60), cwd=REPO)
    assert r.returncode == 2 and "must start with 0" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_an_unknown_flood_mode():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sections", "flood",
                        "--flood-modes", "xdp-drop,warp-drive"],
                       capture_output=True, text=True, timeout=scaled(60), cwd=REPO)
    assert r.returncode == 2 and "unknown flood mode 'warp-drive'" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_a_bad_round_count():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sections", "flood",
                        "--flood-rounds", "0"],
                       capture_output=True, text=True, timeout=scaled(60), cwd=REPO)
    assert r.returncode == 2 and "--flood-rounds must be 1 to 99" in r.stderr and "Traceback" not in r.stderr


def test_flood_profile_refused_without_perf(tmp_path):
    """--flood-profile where perf is not on PATH: exit 2 and why, before
    any section runs."""
    env = dict(os.environ, PATH=str(tmp_path))
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sections", "flood",
                        "--flood-profile"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 2 and "perf is not installed" in r.stderr, r.stderr[-2000:]


def test_run_refuses_a_pool_it_has_not():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sections", "flood",
                        "--flood-pools", "1,7"],
                       capture_output=True, text=True, timeout=scaled(60), cwd=REPO)
    assert r.returncode == 2 and "--flood-pools takes some of 1,1024,10000000" in r.stderr
    assert "Traceback" not in r.stderr


def test_flood_rounds_sets_the_rounds(tmp_path, blocklists_dir):
    """--flood-rounds 3: three runs of every mode, family and pool, each
    round starting with another mode."""
    out = tmp_path / "rounds.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--sections", "flood",
                        "--flood-modes", "xdp-drop,xdp-read-drop", "--flood-rounds", "3", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=scaled(300), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    fl = json.loads(out.read_text())["flood"]
    assert fl["repetitions"] == 3
    runs = fl["runs"]
    for fam in fl["families"]:
        for pool in fl["pools"]:
            for mode in ("xdp-drop", "xdp-read-drop"):
                got = sorted(x["rep"] for x in runs if (x["mode"], x["family"], x["pool"]) == (mode, fam, pool))
                assert got == [0, 1, 2], (mode, fam, pool, got)
    first = [next(x["mode"] for x in runs if x["rep"] == rep) for rep in range(3)]
    assert first == ["xdp-drop", "xdp-read-drop", "xdp-drop"]


def test_analysis_finds_every_stage_in_the_program():
    """bench/analysis.py cuts bpf/xdpguard.c at fixed lines; a stage whose
    line moved is silently "n/a" in a full run, so a change to the program
    must keep every cut point."""
    from bench.analysis import FULL, GENERAL, STAGES, stage_source
    assert stage_source()[1] == [n for n, *_ in STAGES] + [GENERAL, FULL]


# Two floods from the same 10M-pool sources into the bench's per-source
# limit, each run prepared as flood.py prepares it. In a child process:
# pyroute2's namespace handles failed inside pytest after a live-frames
# run (link_lookup found no link), as every other flood here runs.
_TWO_FLOODS = """
import json, sys, tempfile
from pathlib import Path
from types import SimpleNamespace
from bench import flood, traffic
from bench.common import Lab
pool, rate, seconds = flood.SPOOF_POOL, 1_000_000, 0.03
sender = traffic.Sender()
runs = []
try:
    b, _ = sender.prog(4, pool)
    with Lab(tag="t") as lab:
        rx = flood.setup_mode(SimpleNamespace(tiny=None, workdir=Path(tempfile.mkdtemp())), lab, "xdpguard-limit")
        try:
            for _ in range(2):
                b[b"xgb_n"].clear()     # the pool's first sources again
                rx.prepare(4, pool)
                runs.append(flood.measure(lab, sender, 4, pool, 1 << 30, seconds, rx, rate=rate))
        finally:
            rx.close()
finally:
    sender.close()
json.dump(runs, sys.stdout)
"""


def test_limit_runs_start_from_empty_buckets():
    """The spoofed-limit oracle of bench/flood.py (a run admits the
    new-source budget's burst + rate x time) holds from run to run: a
    second flood from the same forged sources is admitted by the budget
    again, not by the buckets the first one left (empty_limits)."""
    from bench import flood
    from xdpguard.policy import NEW_SOURCES_PER_RATE
    r = subprocess.run([sys.executable, "-c", _TWO_FLOODS], capture_output=True, text=True,
                       timeout=scaled(120), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    budget = NEW_SOURCES_PER_RATE * flood.LIMIT_RATE     # per second, burst one second of it
    for run in json.loads(r.stdout):
        assert run["received"] > 3 * budget, run     # else the budget is never short
        want = budget * (1 + run["seconds"])
        assert budget <= run["passed"] <= want * 1.02, (run["passed"], want, run)


def test_spoofed_times_every_class():
    """bench/spoofed.py runs and times the limit with the seen-sources
    filter as the budget's frames left it and with every bit set."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "spoofed.py"), "--frames", "20", "--rounds", "1",
                        "--json"], capture_output=True, text=True, timeout=scaled(120), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    classes = json.loads(r.stdout)["classes"]
    assert {"v4 spoofed limit, seen filter full", "v6 spoofed limit, seen filter full",
            "v4 spoofed deny", "v6 spoofed limit (budget empty)"} <= set(classes)
    assert all(c["cold_median"] > 0 and c["hot_median"] > 0 for c in classes.values())


def test_spoofed_limit_target_pairs_each_round_with_the_deny_beside_it():
    """The 0.8x target is the median of the rounds' limit / deny ratios,
    the deny's runs of the limit group (seconds apart), never the deny's
    own group (minutes apart), whose medians the paired runs stay out of."""
    from bench import flood
    pool = flood.SPOOF_POOL

    def run(mode, group, rep, core):
        return {"mode": mode, "group": group, "rep": rep, "family": 4, "pool": pool, "core_mpps": core}
    runs = [run("xdpguard-native", "drop", rep, 100.0) for rep in range(3)]
    runs += [run("xdpguard-limit", "limit", rep, 4.0) for rep in range(3)]
    runs += [run(flood.PAIRED_DENY, "limit", rep, core) for rep, core in enumerate((8.0, 10.0, 5.0))]
    assert [flood._paired_deny(r) for r in runs] == [False] * 6 + [True] * 3
    t: dict = {}
    flood._spoofed_limit_targets(t, lambda *a: None, lambda *a: None, (4,), runs)
    assert t["spoofed_limit_vs_deny"] == 0.5      # median of 0.5, 0.4, 0.8
    assert t["spoofed_limit_vs_deny_rounds"] == {"v4": [0.5, 0.4, 0.8]}


def test_established_sources_keep_their_rate_through_a_spoofed_flood():
    """bench/established.py: established sources over their rate get
    burst + rate x time and never more, the budget admits its burst +
    rate x time of forged sources and never more, a client at half its
    rate loses nothing, while forged frames outrun the budget."""
    # A budget of 100 new sources/s: an emulated guest's test runs (a few
    # thousand a second) outrun it 20x, not the bench's 1,000.
    r = subprocess.run([sys.executable, str(REPO / "bench" / "established.py"), "--sources", "64",
                        "--seconds", "2", "--budget", "100", "--json"], capture_output=True, text=True,
                       timeout=scaled(120), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["flooded"], res
    assert res["client_sent"] >= 8 and res["client_lost"] == 0, res
    # Never fails open; the coarse clock lags by under a tick.
    assert res["established_passed_max"] <= res["established_want"] + 1, res
    assert res["established_passed_min"] >= 0.8 * res["established_want"], res
    assert res["forged_passed"] <= res["forged_want"] + 1, res
    assert res["forged_passed"] >= 0.8 * res["forged_want"], res
    t = res["targets"]
    assert t["client_lost"] == 0 and t["established_worst_error"] is not None


def test_established_refuses_bad_arguments():
    for args in (["--sources", "0"], ["--seconds", "0.1"], ["--sources", "70000"], ["--budget", "5"]):
        r = subprocess.run([sys.executable, str(REPO / "bench" / "established.py"), *args],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 2 and "established:" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_flood_profile_charges_samples_to_the_programs_c_lines():
    """--flood-profile (bench/perfprofile.py): perf samples of a thread
    that runs xdpguard's program land on the program, and each on a line
    of its C (the JIT's line info), e.g. the fast lane's first read of the
    frame; samples outside the program stay under their function."""
    import threading
    import time

    from conftest import require_tool
    from bench import perfprofile
    from testrun import compile_text, make_rig
    from xdpguard import bpfsys, packet
    require_tool("perf")
    require_tool("bpftool")
    rig = make_rig(compile_text("""
[policy]
name = "profile"
[[rule]]
name = "web"
action = "limit"
proto = "tcp"
dport = [80]
rate = "100/s"
per = "source"
""")[1])
    try:
        info = bpfsys.prog_info(rig.fn.fd)
        lines = perfprofile.ProgLines(info["id"])
        assert lines.tag == info["tag"] and len(lines.addrs) > 100
        assert any("h_proto" in t for t in lines.lines), sorted(set(lines.lines))[:20]
        frame = packet.build("198.51.100.7", "192.0.2.1", "tcp", 40000, 80)
        with perfprofile.recording([threading.get_native_id()]) as rec:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                bpfsys.prog_test_run(rig.fn.fd, frame, repeat=100_000)
        p = perfprofile.attribute(rec["path"], {lines.tag: lines})
    finally:
        rig.close()
    assert not rec["path"].exists()
    prog = p["functions"].get(perfprofile.PROGRAM, 0)
    assert prog > 0.2 * p["samples"] > 0, p["functions"]
    assert sum(p["lines"].values()) == prog
    assert "(prologue)" not in p["lines"] or p["lines"]["(prologue)"] < prog / 2
    funcs, top = perfprofile.rows(perfprofile.merge(p, p))
    assert perfprofile.PROGRAM in dict(funcs)
    assert top and all(0 < float(share) <= 100 for _, share in top)


def test_xdp_filter_program_found_behind_libxdps_dispatcher():
    """xdp-filter's maps belong to its own program: the one on the
    interface (libxdp without its dispatcher, as on the 6.18 here) or the
    dispatcher's component (Debian 12's 6.1, where the percpu section
    failed with "xdp-filter program has no map filter_ipv4")."""
    from bench.common import _xdpfilt_id
    head = ("CURRENT XDP PROGRAM STATUS:\n\n"
            "Interface        Prio  Program name      Mode     ID   Tag               Chain actions\n"
            + "-" * 86 + "\n")
    legacy = head + "xgdA                   xdpfilt_alw_all   skb      23182 2d8506cc913c856b \n"
    dispatcher = (head + "xgdA                   xdp_dispatcher    native   50   94d5f00c20184d17 \n"
                  " =>              10     xdpfilt_alw_all            55   2d8506cc913c856b  XDP_PASS\n")
    assert _xdpfilt_id(legacy) == 23182
    assert _xdpfilt_id(dispatcher) == 55
    assert _xdpfilt_id(head + "xgdA                   <no XDP program>\n") is None


def test_flood_profile_keeps_the_deny_beside_the_limit_apart(capsys):
    """The deny's runs of the limit group (the 0.8x target's pairs) are
    profiled apart from the deny's own group, as its medians are."""
    from bench import flood
    from bench import perfprofile as profiling
    pool = flood.SPOOF_POOL

    def run(mode, group, samples):
        return {"mode": mode, "group": group, "family": 4, "pool": pool,
                "profile": {"samples": samples, "functions": {profiling.PROGRAM: samples},
                            "lines": {"a line": samples}}}
    result = {"runs": [run(flood.PAIRED_DENY, "drop", 10), run(flood.PAIRED_DENY, "drop", 5),
                       run(flood.PAIRED_DENY, "limit", 7), run("xdpguard-limit", "limit", 3)]}
    flood._profile_tables(result, [flood.PAIRED_DENY, "xdpguard-limit"], (4,), (pool,))
    p = result["profiles"]
    assert p[f"{flood.PAIRED_DENY} v4 {pool:,} sources"]["samples"] == 15
    assert p[f"{flood.PAIRED_DENY} v4 {pool:,} sources, beside the limit"]["samples"] == 7
    assert p[f"xdpguard-limit v4 {pool:,} sources"]["samples"] == 3
    assert all("profile" not in r for r in result["runs"])
    assert "beside the limit: the receiver's time by function" in capsys.readouterr().out
