"""`xdpguard doctor` against the running kernel.

Needs root, bcc and bpffs. The interface checks run only on a veth pair in
a fresh network namespace made here (unique names, removed again even on
failure); doctor is never pointed at the host's interfaces.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import require_tool

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF"),
]


def doctor(*args: str) -> tuple[int, dict | str, str]:
    r = subprocess.run([sys.executable, "-m", "xdpguard.cli", "doctor", *args],
                       capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout) if "--json" in args and r.returncode in (0, 1) else r.stdout
    return r.returncode, out, r.stderr


def by_name(rep: dict) -> dict:
    return {c["name"]: c for c in rep["checks"]}


@pytest.fixture
def vethns():
    """A fresh namespace holding an up veth pair (a <-> b); removed after."""
    from pyroute2 import IPRoute, netns

    name = "xgd" + secrets.token_hex(4)
    a, b = name + "a", name + "b"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname=a, kind="veth", peer=b)
            for ifc in (a, b):
                ipr.link("set", index=ipr.link_lookup(ifname=ifc)[0], state="up")
        yield SimpleNamespace(name=name, a=a, b=b)
    finally:
        try:
            with IPRoute(netns=name) as ipr:
                idx = ipr.link_lookup(ifname=a)
                if idx:
                    ipr.link("del", index=idx[0])  # takes the peer and any XDP program with it
        finally:
            netns.remove(name)


def test_doctor_json_here():
    rc, rep, err = doctor("--json")
    assert rc == 0, (rep, err)
    assert rep["ok"] is True
    checks = by_name(rep)
    for c in rep["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail")
        assert c["detail"]
        if c["status"] == "fail":
            assert c["fix"]
    for name in ("bpf_syscall", "bpf_jit", "btf", "bpffs", "kernel_headers", "bcc",
                 "map_lpm_trie", "map_lru_hash", "map_of_tries", "kprobes", "tracepoints", "memlock"):
        assert name in checks, name
    for name in ("bpf_syscall", "bpffs", "kernel_headers", "bcc", "map_lpm_trie", "map_lru_hash", "map_of_tries"):
        assert checks[name]["status"] == "ok", checks[name]
    # No interface given: no interface is touched or reported.
    assert "xdp_native" not in checks and "xdp_foreign" not in checks


def test_doctor_probes_match_the_kernel():
    """Reported as the kernel actually exposes them (no kprobes on this VM's
    kernel: CONFIG_KPROBES off; tracepoints present)."""
    from xdpguard.probes import detect
    rc, rep, _ = doctor("--json")
    checks = by_name(rep)
    kp, tp = detect.kprobes_available(), detect.tracepoints_available()
    assert checks["kprobes"]["status"] == ("ok" if kp else "warn")
    assert checks["tracepoints"]["status"] == ("ok" if tp or kp else "warn")
    if not kp:
        assert "unavailable" in checks["kprobes"]["detail"]
        if tp:
            assert "tracepoint" in checks["kprobes"]["detail"]
    if tp:
        assert "inet_sock_set_state" in checks["tracepoints"]["detail"]


def test_doctor_this_machine_has_no_kprobes():
    if os.path.isdir("/sys/bus/event_source/devices/kprobe") or any(
            os.path.exists(d + "/kprobe_events") for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        pytest.skip("this kernel has kprobes")
    rc, rep, _ = doctor("--json")
    checks = by_name(rep)
    assert checks["kprobes"]["status"] == "warn"
    assert checks["tracepoints"]["status"] == "ok"
    assert rep["ok"] is True


def test_doctor_human_table():
    rc, out, _ = doctor()
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["check", "status", "detail"]
    assert any(ln.startswith("bpf_syscall") for ln in lines)
    assert "xdpguard can run here" in out


def test_doctor_native_xdp_on_veth(vethns):
    rc, rep, err = doctor("--iface", vethns.a, "--netns", vethns.name, "--json")
    assert rc == 0, (rep, err)
    checks = by_name(rep)
    assert checks["xdp_native"]["status"] == "ok", checks["xdp_native"]
    assert "native" in checks["xdp_native"]["detail"]
    assert checks["xdp_foreign"]["status"] == "ok", checks["xdp_foreign"]
    # The test program is detached again.
    q = subprocess.run(["ip", "-n", vethns.name, "-d", "link", "show", vethns.a],
                       capture_output=True, text=True, check=True).stdout
    assert "xdp" not in q.split("\n", 1)[0], q


def test_doctor_foreign_program(vethns):
    require_tool("xdp-filter")
    ns_cmd = ["nsenter", f"--net=/run/netns/{vethns.name}"]
    subprocess.run(ns_cmd + ["xdp-filter", "load", vethns.a, "--mode", "skb"],
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
        subprocess.run(ns_cmd + ["xdp-filter", "unload", vethns.a], capture_output=True)
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


def test_check_functions_in_process(monkeypatch):
    """The fallback detection agrees with xdpguard.probes.detect."""
    from xdpguard import doctor as d
    from xdpguard.probes import detect
    assert d._kprobes_available() == detect.kprobes_available()
    assert d._tracepoints_available() == detect.tracepoints_available()
    # A missing JIT sysctl and a disabled JIT are warnings with a fix.
    monkeypatch.setattr(d, "JIT_SYSCTL", "/nonexistent/bpf_jit_enable")
    (c,) = d.check_jit(d.Context())
    assert c.status == "warn" and c.fix


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
    assert json.loads(capsys.readouterr().out)["ok"] is True
    monkeypatch.setattr(d, "CHECKS", [("boom", boom), ("jit", d.check_jit)])
    assert d.cmd_doctor(args) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False
    assert [c["name"] for c in rep["checks"]] == ["boom", "bpf_jit"]
    assert rep["checks"][0]["status"] == "fail" and "broken check" in rep["checks"][0]["detail"]
