"""`xdpguard doctor` against the running kernel.

Needs root, bcc and bpffs. The interface checks run only on a veth pair in
a fresh network namespace made here (unique names, removed again even on
failure); doctor is never pointed at the host's interfaces.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import require_tool
from testing.lab import VethPair, nsenter
from testing.timing import scaled

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF"),
]


def doctor(*args: str) -> tuple[int, dict | str, str]:
    r = subprocess.run([sys.executable, "-m", "xdpguard.cli", "doctor", *args],
                       capture_output=True, text=True, timeout=scaled(120))
    out = json.loads(r.stdout) if "--json" in args and r.returncode in (0, 1) else r.stdout
    return r.returncode, out, r.stderr


def by_name(rep: dict) -> dict:
    return {c["name"]: c for c in rep["checks"]}


@pytest.fixture
def vethns():
    """A fresh namespace holding an up veth pair (a <-> b); removed after."""
    with VethPair("xgd", split=False) as v:
        yield v


@pytest.fixture(scope="module")
def here():
    """One `doctor --json` run on this machine, shared by the tests that
    only read it (each run compiles the real program)."""
    rc, rep, err = doctor("--json")
    return SimpleNamespace(rc=rc, rep=rep, err=err, checks=by_name(rep))


def test_doctor_json_here(here):
    rc, rep, checks = here.rc, here.rep, here.checks
    assert rc == 0, (rep, here.err)
    assert rep["ok"] is True
    for c in rep["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail")
        assert c["detail"]
        if c["status"] == "fail":
            assert c["fix"]
    needed = ("bpf_syscall", "bpffs", "headers", "bcc", "map_types", "map_of_tries", "policy_write",
              "test_run", "xdp_generic")
    for name in needed + ("bpf_jit", "btf", "kprobes", "tracepoints", "memlock"):
        assert name in checks, name
    for name in needed:
        assert checks[name]["status"] == "ok", checks[name]
    # The real program, not a stand-in.
    assert "bpf/xdpguard.c" in checks["bcc"]["detail"]
    # No interface given: no interface is touched or reported.
    assert "xdp_native" not in checks and "xdp_foreign" not in checks


def test_doctor_headers_line(here):
    """The headers line names where the build link resolves and the kernel
    release those headers are of."""
    from xdpguard import doctor as d
    h = d.headers_used()
    detail = here.checks["headers"]["detail"]
    assert h["target"] == os.path.realpath(f"/lib/modules/{os.uname().release}/build")
    assert h["target"] in detail and h["version"] and h["version"] in detail


def test_doctor_feature_table(here):
    """Every kernel feature xdpguard uses, in order, with whether it is here,
    what it is for and what happens without it; probes, not versions."""
    from xdpguard import bpfsys, doctor as d
    from xdpguard.probes import collector, detect
    feats = here.rep["features"]
    assert [f["name"] for f in feats] == [f.name for f in d.FEATURES]
    for f in feats:
        assert set(f) == {"name", "available", "used_for", "without", "detail"}
        assert f["available"] in (True, False, None)
        assert f["used_for"] and f["without"]
    by = {f["name"]: f for f in feats}
    for name in ("bpf_syscall", "bpf_jit", "btf_vmlinux", "bpffs", "lpm_trie", "array_of_tries",
                 "percpu_array", "lru_hash", "lru_percpu_hash", "mmapable_array", "ringbuf", "map_batch",
                 "xdp_replace", "prog_test_run", "xdp_live_frames", "native_xdp", "kprobes",
                 "tracepoint sock:inet_sock_set_state", "tracepoint tcp:tcp_send_reset",
                 "raw_tracepoint consume_skb", "memcg_accounting"):
        assert name in by, name
    # What the program needs is here (it loaded and ran).
    for name in ("bpf_syscall", "bpffs", "lpm_trie", "array_of_tries", "percpu_array", "lru_hash",
                 "lru_percpu_hash", "mmapable_array", "ringbuf", "map_batch", "xdp_replace", "prog_test_run"):
        assert by[name]["available"] is True, by[name]
    # bpfsys's own probe, the one the benchmark picks its generator by.
    assert by["xdp_live_frames"]["available"] == (bpfsys.live_frames_refused() is None)
    # Native XDP needs an interface.
    assert by["native_xdp"]["available"] is None and "--iface" in by["native_xdp"]["detail"]
    # The SYN cookie helpers: the probe program apply's check loads.
    from xdpguard import syncookies
    assert by["syncookies"]["available"] == (syncookies.unavailable() is None)
    assert here.checks["syncookies"]["status"] == ("ok" if by["syncookies"]["available"] else "warn")
    # The per-generation tries differ in size from their template.
    assert "template 1" in by["array_of_tries"]["detail"]
    assert by["kprobes"]["available"] == detect.kprobes_available()
    # Each tracepoint as the collector finds it (it leaves out what this
    # kernel lacks, e.g. 6.1's tcp:tcp_send_reset without addresses).
    _, skipped = collector.build_cflags("tracepoint")
    for cat, ev in detect.TRACEPOINT_EVENTS:
        target = f"{cat}:{ev}"
        assert by[f"tracepoint {target}"]["available"] == (target not in skipped), (target, skipped)
        if target in skipped:
            assert by[f"tracepoint {target}"]["detail"] == skipped[target]


def test_doctor_probes_match_the_kernel(here):
    """Reported as the kernel actually exposes them (no kprobes on this VM's
    kernel: CONFIG_KPROBES off; tracepoints present)."""
    from xdpguard.probes import detect
    checks = here.checks
    kp, tp = detect.kprobes_available(), detect.tracepoints_available()
    assert checks["kprobes"]["status"] == ("ok" if kp else "warn")
    assert checks["tracepoints"]["status"] == ("ok" if tp or kp else "warn")
    if not kp:
        assert "unavailable" in checks["kprobes"]["detail"]
        if tp:
            assert "tracepoint" in checks["kprobes"]["detail"]
    if tp:
        assert "inet_sock_set_state" in checks["tracepoints"]["detail"]


def test_doctor_this_machine_has_no_kprobes(here):
    from xdpguard.probes import detect
    if detect.kprobes_available():
        pytest.skip("this kernel has kprobes")
    assert here.checks["kprobes"]["status"] == "warn"
    assert here.checks["tracepoints"]["status"] == "ok"
    assert here.rep["ok"] is True


def test_doctor_human_table():
    rc, out, _ = doctor()
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["check", "status", "detail"]
    assert any(ln.startswith("bpf_syscall") for ln in lines)
    i = lines.index(next(ln for ln in lines if ln.startswith("kernel features")))
    assert lines[i + 1].split()[:3] == ["feature", "here", "used"]
    assert any(ln.startswith("ringbuf ") and " yes " in ln for ln in lines[i:])
    assert "xdpguard can run here" in out


def test_doctor_native_xdp_on_veth(vethns):
    rc, rep, err = doctor("--iface", vethns.a, "--netns", vethns.name, "--json")
    assert rc == 0, (rep, err)
    checks = by_name(rep)
    assert checks["xdp_native"]["status"] == "ok", checks["xdp_native"]
    assert "native" in checks["xdp_native"]["detail"]
    assert checks["xdp_foreign"]["status"] == "ok", checks["xdp_foreign"]
    assert {f["name"]: f for f in rep["features"]}["native_xdp"]["available"] is True
    # The test program is detached again.
    q = subprocess.run(["ip", "-n", vethns.name, "-d", "link", "show", vethns.a],
                       capture_output=True, text=True, check=True).stdout
    assert "xdp" not in q.split("\n", 1)[0], q


def test_doctor_foreign_program(vethns):
    require_tool("xdp-filter")
    subprocess.run(nsenter(vethns.name, ["xdp-filter", "load", vethns.a, "--mode", "skb"]),
                   check=True, capture_output=True, text=True)
    try:
        rc, rep, err = doctor("--iface", vethns.a, "--netns", vethns.name, "--json")
        assert rc == 0, (rep, err)       # a warning, not a failure
        checks = by_name(rep)
        foreign = checks["xdp_foreign"]
        assert foreign["status"] == "warn", foreign
        assert "foreign" in foreign["detail"] and "--force" in foreign["detail"]
        assert foreign["fix"] and vethns.a in foreign["fix"]
        # Native and generic cannot coexist: not tested, and nothing replaced.
        assert checks["xdp_native"]["status"] == "warn"
        assert "not tested" in checks["xdp_native"]["detail"]
        # xdp-filter's program is still the one attached.
        rc2, rep2, _ = doctor("--iface", vethns.a, "--netns", vethns.name, "--json")
        assert by_name(rep2)["xdp_foreign"]["detail"] == foreign["detail"]
    finally:
        subprocess.run(nsenter(vethns.name, ["xdp-filter", "unload", vethns.a]), capture_output=True)
    rc, rep, _ = doctor("--iface", vethns.a, "--netns", vethns.name, "--json")
    assert by_name(rep)["xdp_foreign"]["status"] == "ok"


def test_doctor_usage_errors(vethns):
    rc, _, err = doctor("--iface", "nosuchif0", "--netns", vethns.name)
    assert rc == 2 and "no interface" in err
    rc, _, err = doctor("--iface", "x", "--netns", vethns.name + "gone")
    assert rc == 2 and "does not exist" in err
    rc, _, err = doctor("--iface", "bad/name")
    assert rc == 2
    rc, _, err = doctor("--netns", vethns.name)
    assert rc == 2 and "--iface" in err


def test_jit_check(monkeypatch):
    """A missing JIT sysctl and a disabled JIT are warnings with a fix."""
    from xdpguard import doctor as d
    monkeypatch.setattr(d, "JIT_SYSCTL", "/nonexistent/bpf_jit_enable")
    ctx = d.Context()
    (c,) = d.check_jit(ctx)
    assert c.status == "warn" and c.fix
    assert ctx.found["bpf_jit"][0] is False


def test_compile_failure_names_the_headers(monkeypatch):
    """The bcc check compiles the real program through the loader's own
    flags: when that fails, it says which headers bcc used (where the build
    link resolves, their kernel release) and what fixes it."""
    from xdpguard import doctor as d, loader
    flags = loader.program_cflags
    monkeypatch.setattr(loader, "program_cflags",
                        lambda *a, **k: flags(*a, **k) + ["-include", "/nonexistent/xg_broken.h"])
    ctx = d.Context()
    (c,) = d.check_bcc(ctx)
    h = d.headers_used()
    assert c.status == "fail", c
    assert "bpf/xdpguard.c" in c.detail and "xg_broken.h" in c.detail
    assert h["target"] in c.detail and h["version"] in c.detail
    assert "setup.sh" in c.fix and "linux-headers" in c.fix
    # What needs the program is not tested, and says so.
    for check in (d.check_tries, d.check_policy_write, d.check_test_run, d.check_xdp_generic):
        (c,) = check(ctx)
        assert c.status == "warn" and "not tested" in c.detail, c


def test_trie_check_goes_through_the_loader(monkeypatch):
    """map_of_tries puts the tries with loader._put_trie into the real
    program's arrays: when the loader's function fails, doctor fails."""
    import errno
    from xdpguard import doctor as d, loader
    calls = []

    def refused(maps, family, gen, entries):
        calls.append((maps, family, gen, len(entries)))
        raise OSError(errno.EINVAL, "bpf_map_update_elem(map fd 7, flags 0) failed: Invalid argument")

    monkeypatch.setattr(loader, "_put_trie", refused)
    checks, features = d.run()
    rep = d.report(checks, features)
    got = by_name(rep)
    assert got["bcc"]["status"] == "ok"
    assert got["map_of_tries"]["status"] == "fail" and "Invalid argument" in got["map_of_tries"]["detail"]
    assert got["map_of_tries"]["fix"]
    assert got["policy_write"]["status"] == "fail"      # apply's own fill goes through it too
    assert rep["ok"] is False
    assert {f["name"]: f for f in features}["array_of_tries"]["available"] is False
    # Called with the loaded program's maps (its template and array of tries).
    maps, family, gen, n = calls[0]
    assert {"lpm4", "lpm4_inner", "lpm6", "lpm6_inner"} <= set(maps) and n > 1


def test_map_types_are_probed(monkeypatch):
    """A map flag the kernel refuses makes map_types fail and its feature
    unavailable: decided by creating the map."""
    from xdpguard import bpfsys, doctor as d
    monkeypatch.setattr(bpfsys, "BPF_F_MMAPABLE", 1 << 30)    # no such flag
    ctx = d.Context()
    (c,) = d.check_maps(ctx)
    assert c.status == "fail" and "mmapable_array" in c.detail and c.fix
    assert ctx.found["mmapable_array"][0] is False
    assert ctx.found["ringbuf"][0] is True


def test_exit_status_follows_fail(monkeypatch, capsys):
    """A fail makes ok false and the exit status 1; warnings alone do not.
    A check that raises is reported as a fail, the others still run."""
    from xdpguard import doctor as d

    def boom(ctx):
        raise RuntimeError("broken check")

    args = SimpleNamespace(iface=None, netns=None, json=True)
    monkeypatch.setattr(d, "CHECKS", [("jit", d.check_jit),
                                      ("warn", lambda ctx: [d.Check("w", d.WARN, "a warning", "fix it")])])
    assert d.cmd_doctor(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is True
    # Features no check looked at are reported as not tested.
    feats = {f["name"]: f for f in rep["features"]}
    assert feats["ringbuf"]["available"] is None and feats["bpf_jit"]["available"] is not None
    monkeypatch.setattr(d, "CHECKS", [("boom", boom), ("jit", d.check_jit)])
    assert d.cmd_doctor(args) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False
    assert [c["name"] for c in rep["checks"]] == ["boom", "bpf_jit"]
    assert rep["checks"][0]["status"] == "fail" and "broken check" in rep["checks"][0]["detail"]
