"""Crash consistency (issue 16, items 17-20): the CLI killed at named steps
(XDPGUARD_TEST_KILLPOINT, xdpguard/killpoint.py) must leave the interface
running one whole policy the record describes, and a following apply,
rollback or detach must succeed without --force. Also pins removed or
replaced by hand.

Which policy runs is read from the program's maps, not from the record:
the policies differ in their default action, kept per generation.
"""
from __future__ import annotations

import ctypes
import os
import subprocess

import pytest

from testing.lab import REPO, VethPair, xdpguard_cmd
from testing.timing import scaled
from xdpguard import bpfsys, loader, pins


@pytest.fixture
def pair(tmp_path, monkeypatch):
    from tests.conftest import require_kernel
    require_kernel()
    monkeypatch.setenv("XDPGUARD_STATE_DIR", str(tmp_path / "state"))
    with VethPair(prefix="xgk", split=False) as p:
        p.tmp = tmp_path
        try:
            yield p
        finally:
            xg(p, "detach", check=False)


def xg(p, *args, kill: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XDPGUARD_TEST_KILLPOINT", None)
    if kill:
        env["XDPGUARD_TEST_KILLPOINT"] = kill
    cp = subprocess.run([*xdpguard_cmd(), *map(str, args), "--iface", p.a, "--netns", p.ns_a],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=scaled(300))
    if kill:
        assert cp.returncode == -9, f"not killed at {kill}: {cp.stdout}{cp.stderr}"
    elif check:
        assert cp.returncode == 0, f"{args}: exit {cp.returncode}\n{cp.stdout}{cp.stderr}"
    return cp


def policy(p, name: str, default: str, rules: int = 1) -> str:
    text = f'[policy]\nname = "{name}"\ndefault = "{default}"\n'
    for i in range(rules):
        text += f'[[rule]]\nname = "r{i}"\nproto = "tcp"\ndport = {1000 + i}\naction = "allow"\n'
    path = p.tmp / f"{name}.toml"
    path.write_text(text)
    return path


def directory(p):
    return pins.iface_dir(p.ns_a, p.a)


def running(p) -> tuple[str, int]:
    """(default action of the generation the active word selects, attached program id)."""
    rec = pins.read_record(directory(p))
    maps = {n: pins.open_map(directory(p), n, rec) for n in ("active", "gens")}
    try:
        gen = loader.read_active(maps)
        default = maps["gens"].lookup(ctypes.c_uint32(gen)).default_action
    finally:
        for m in maps.values():
            m.close()
    from xdpguard.netns import in_netns
    with in_netns(p.ns_a):
        attached = bpfsys.xdp_query(p.ia)["prog_id"]
    return ("allow", "deny")[default], attached


def consistent(p) -> pins.Record:
    """The record describes what runs: its program is attached and its
    generation is the active one."""
    rec = pins.read_record(directory(p))
    default, attached = running(p)
    assert attached == rec.prog_id
    assert default == rec.policy.default, f"record says {rec.policy.name} ({rec.policy.default})"
    return rec


@pytest.mark.parametrize("step", ["inplace-write", "write-gen", "inplace-record", "inplace-flipped"])
def test_kill_in_place_apply(pair, step):
    xg(pair, "apply", policy(pair, "pa", "allow"))
    xg(pair, "apply", policy(pair, "pb", "deny"))
    xg(pair, "apply", policy(pair, "pc", "allow"), kill=step)
    # Item 17: the next writer finishes a flip the record already names.
    cp = xg(pair, "rollback", check=False)
    rec = consistent(pair)
    if step in ("inplace-record", "inplace-flipped"):
        assert cp.returncode == 0 and "'pb'" in cp.stdout and rec.policy.name == "pb"
    else:
        # Item 18: pa's generation was being overwritten: rollback never
        # flips to it; it compiles pa again from its kept copy (item 9).
        assert cp.returncode == 0 and "'pa'" in cp.stdout and rec.policy.name == "pa", cp.stderr
    xg(pair, "apply", policy(pair, "pd", "deny"))
    assert consistent(pair).policy.name == "pd"
    xg(pair, "rollback")
    consistent(pair)


def test_kill_rollback_after_record(pair):
    xg(pair, "apply", policy(pair, "pa", "allow"))
    xg(pair, "apply", policy(pair, "pb", "deny"))
    xg(pair, "rollback", kill="rollback-record")
    xg(pair, "apply", policy(pair, "pc", "deny"))
    xg(pair, "rollback")
    assert consistent(pair).policy.name == "pa"


@pytest.mark.parametrize("step", ["reload-attached", "reload-exchanged"])
def test_kill_reload(pair, step):
    xg(pair, "apply", policy(pair, "pa", "allow"))
    # 70 rules do not fit a program made for one: a reload.
    xg(pair, "apply", policy(pair, "big", "deny", rules=70), kill=step)
    # Item 19: the unpinned program is recognised as xdpguard's.
    xg(pair, "apply", policy(pair, "pb", "deny"))
    consistent(pair)
    xg(pair, "detach")
    assert running_off(pair)


def running_off(p) -> bool:
    from xdpguard.netns import in_netns
    with in_netns(p.ns_a):
        return bpfsys.xdp_query(p.ia)["prog_id"] == 0 and not directory(p).exists()


def test_removed_prog_pin(pair):
    xg(pair, "apply", policy(pair, "pa", "allow"))
    os.unlink(directory(pair) / "prog")
    xg(pair, "apply", policy(pair, "big", "deny", rules=70))   # a reload swaps by id
    consistent(pair)
    os.unlink(directory(pair) / "prog")
    xg(pair, "detach")
    assert running_off(pair)


def test_removed_meta_pin(pair):
    xg(pair, "apply", policy(pair, "pa", "allow"))
    xg(pair, "ban", "192.0.2.7")
    os.unlink(directory(pair) / "meta")
    cp = subprocess.run([*xdpguard_cmd(), "status", "--netns", pair.ns_a], capture_output=True, text=True)
    assert "pins without a record" in cp.stderr, cp.stderr
    cp = xg(pair, "apply", policy(pair, "pb", "deny"))
    assert "no record describes" in cp.stdout + cp.stderr
    consistent(pair)
    assert "192.0.2.7" in xg(pair, "bans").stdout    # the ban map was kept
    os.unlink(directory(pair) / "meta")
    xg(pair, "detach")
    assert running_off(pair)


def test_meta_replaced_by_another_map(pair):
    xg(pair, "apply", policy(pair, "pa", "allow"))
    meta = directory(pair) / "meta"
    os.unlink(meta)
    with bpfsys.closing_fd(bpfsys.obj_get(str(directory(pair) / "active"))) as fd:
        bpfsys.obj_pin(fd, str(meta))
    for args in (("stats",), ("apply", policy(pair, "pb", "deny"))):
        cp = xg(pair, *args, check=False)
        assert cp.returncode != 0 and "Traceback" not in cp.stderr and "not an xdpguard record" in cp.stderr
    xg(pair, "detach")
    assert running_off(pair)


def test_kill_ban_between_note_and_map(pair):
    """A ban killed after bans.json and before the map: not in force, and
    the next ban and unban of it succeed."""
    xg(pair, "apply", policy(pair, "pa", "allow"))
    xg(pair, "ban", "192.0.2.5", kill="ban-noted")
    assert "192.0.2.5" not in xg(pair, "bans").stdout
    xg(pair, "ban", "192.0.2.5")
    assert "192.0.2.5" in xg(pair, "bans").stdout
    xg(pair, "unban", "192.0.2.5")


def test_kill_rollback_of_a_reload(pair):
    """rollback to the program a reload replaced, killed after attaching
    it and before the pins swap: the next rollback finishes it."""
    xg(pair, "apply", policy(pair, "pa", "allow"))
    xg(pair, "apply", policy(pair, "big", "deny", rules=70))
    xg(pair, "rollback", kill="rollback-attached")
    cp = xg(pair, "rollback")
    assert "'pa'" in cp.stdout
    assert consistent(pair).policy.name == "pa"


def test_manual_ban_keeps_max_bans(pair):
    """Item 23: max_bans holds for `ban` as for watch; a re-ban is no new one."""
    path = pair.tmp / "mb.toml"
    path.write_text('[policy]\nname = "mb"\n[[rule]]\nname = "web"\nproto = "tcp"\ndport = 80\n'
                    'action = "allow"\n[mitigation]\nenabled = true\nmax_bans = 2\n')
    xg(pair, "apply", path)
    xg(pair, "ban", "192.0.2.1")
    xg(pair, "ban", "192.0.2.2")
    xg(pair, "ban", "192.0.2.2")
    cp = xg(pair, "ban", "192.0.2.3", check=False)
    assert cp.returncode == 2 and "max_bans (2)" in cp.stderr, cp.stderr
    assert "192.0.2.3" not in xg(pair, "bans").stdout


def test_disk_full_ban_and_unban_say_what_happened(pair, monkeypatch):
    """Item 22: with the state directory full, `ban` fails and bans
    nothing, `unban` fails and lifts nothing, and both name the file."""
    xg(pair, "apply", policy(pair, "pa", "allow"))
    mnt = pair.tmp / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        monkeypatch.setenv("XDPGUARD_STATE_DIR", str(mnt))
        xg(pair, "ban", "192.0.2.1")
        fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        cp = xg(pair, "ban", "192.0.2.2", check=False)
        assert cp.returncode == 1 and "bans.json" in cp.stderr and "not banned" in cp.stderr, cp.stderr
        cp = xg(pair, "unban", "192.0.2.1", check=False)
        assert cp.returncode == 1 and "bans.json" in cp.stderr and "stays in force" in cp.stderr, cp.stderr
        listed = xg(pair, "bans").stdout
        assert "192.0.2.1" in listed and "192.0.2.2" not in listed
        os.unlink(mnt / "fill")
        xg(pair, "unban", "192.0.2.1")
        assert "192.0.2.1" not in xg(pair, "bans").stdout
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def test_watch_killed_after_a_ban_keeps_the_offence(tmp_path):
    """Item 21: watch.json has the offence before the ban is in force, so
    SIGKILL right after the ban loses neither (the ban maps are stand-ins:
    what is checked is the order of the two writes)."""
    import json
    import multiprocessing

    from xdpguard import daemon
    from xdpguard.policy import load

    pol = load(tmp_path / "w.toml", '[policy]\nname = "w"\n[[rule]]\nname = "web"\nproto = "tcp"\ndport = 80\n'
               'action = "allow"\n[mitigation]\nenabled = true\n'
               'pps = "10/s"\nwindow = "1s"\nban = "60s"\n')
    state = tmp_path / "watch.json"

    class Sampler:
        def sample(self):
            return 2.0, {"192.0.2.9/32": {"pps": 1e6}}, {}

    class BanMaps:
        def expire(self):
            return []

        def entries(self):
            return []

        def add(self, *_a, **_kw):
            (tmp_path / "banned").write_text("yes")

    def child():
        os.environ["XDPGUARD_TEST_KILLPOINT"] = "watch-banned"
        w = daemon.Watch(pol, "x", None, 1.0, True, out=open(os.devnull, "w"))
        w.mit, w.sampler, w.banmaps, w.state_path = daemon.Mitigator(pol, []), Sampler(), BanMaps(), state
        w.decide()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == -9 and (tmp_path / "banned").exists()
    assert json.loads(state.read_text())["offenders"]["192.0.2.9/32"]["offences"] == 1
