"""Rollback history (issue 16, item 9): an apply of the running policy
(same sha256) is "unchanged" and touches nothing; `rollback` goes back one
step in a history of pins.HISTORY policies, never forward again, also when
the policy file was edited in place since (the copies of history.py);
`status` shows the history.

The real CLI in a lab (testing/lab.py). Each policy drops pings from an
address of its own, so pings tell which one runs.
"""
from __future__ import annotations

import json

import pytest

from testing.lab import EXTRA4, PIN_ROOT, SERVER4, Lab
from xdpguard import pins

pytestmark = pytest.mark.e2e

SRC = {"a": EXTRA4[0], "b": EXTRA4[1], "c": EXTRA4[2]}


def text(name: str, rules: int = 0) -> str:
    out = f'[policy]\nname = "pol-{name}"\n'
    out += f'[[rule]]\nname = "no-ping-{name}"\nproto = "icmp"\nsrc = "{SRC[name]}/32"\naction = "deny"\n'
    for i in range(rules):      # more rules than the program holds: a reload
        out += f'[[rule]]\nname = "r{i}"\nproto = "tcp"\ndport = {1000 + i}\naction = "allow"\n'
    return out


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


def _passes(lab, src) -> bool:
    cp = lab.run("client", ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-I", src, SERVER4],
                 timeout=30)
    return cp.returncode == 0


def running(lab) -> str:
    """The policy the program runs, by the pings it drops."""
    blocked = [n for n, src in SRC.items() if not _passes(lab, src)]
    assert len(blocked) == 1, f"pings dropped from {blocked}"
    return blocked[0]


def status(lab) -> dict:
    return [s for s in lab.status() if s["iface"] == lab.server_if][0]


def _where(lab):
    return ["--iface", lab.server_if, "--netns", lab.server_ns]


def test_rollback_walks_back_and_unchanged_applies_keep_it(lab):
    lab.detach(check=False)
    f = lab.dir / "edited-in-place.toml"
    for name in "abc":
        f.write_text(text(name))
        lab.apply(f)
    assert running(lab) == "c"
    before = status(lab)
    assert [h["policy"] for h in before["history"]] == ["pol-b", "pol-a"]
    dropped = lab.counters()["no-ping-c"]["packets"]
    # A reload and a restart of the service: the same file again.
    for _ in range(2):
        cp = lab.xdpguard("apply", f, *_where(lab))
        assert "policy 'pol-c' unchanged" in cp.stdout and "nothing done" in cp.stdout, cp.stdout
        doc = json.loads(lab.xdpguard("apply", f, *_where(lab), "--json").stdout)
        assert doc["unchanged"] is True
    after = status(lab)
    assert {k: after[k] for k in ("policy", "applied_at", "prog_id", "history")} == \
        {k: before[k] for k in ("policy", "applied_at", "prog_id", "history")}
    assert lab.counters()["no-ping-c"]["packets"] == dropped          # nothing was reset
    shown = lab.xdpguard("status", "--netns", lab.server_ns).stdout
    assert "history (rollback goes to the first): 'pol-b'" in shown and "'pol-a'" in shown

    cp = lab.xdpguard("rollback", *_where(lab))
    assert "rolled back to policy 'pol-b'" in cp.stdout
    assert running(lab) == "b" and [h["policy"] for h in status(lab)["history"]] == ["pol-a"]
    # The file holds pol-c now: pol-a comes from the copy kept at its apply.
    cp = lab.xdpguard("rollback", *_where(lab))
    assert "rolled back to policy 'pol-a'" in cp.stdout
    assert running(lab) == "a" and status(lab)["history"] == []
    assert status(lab)["sha256"] == before["history"][1]["sha256"]
    cp = lab.xdpguard("rollback", *_where(lab), check=False)
    assert cp.returncode == 2 and "no earlier policy" in cp.stderr
    assert running(lab) == "a"


def test_rollback_of_a_reload_does_not_toggle(lab):
    lab.detach(check=False)
    a, big = lab.dir / "a.toml", lab.dir / "big.toml"
    a.write_text(text("a"))
    big.write_text(text("b", rules=80))
    lab.apply(a)
    cp = lab.xdpguard("apply", big, *_where(lab))
    assert "replaced the running program" in cp.stdout            # a reload: a stays in @prev
    assert running(lab) == "b"
    lab.xdpguard("rollback", *_where(lab))
    assert running(lab) == "a"
    assert not (PIN_ROOT / lab.server_ns / f"{lab.server_if}@prev").exists()
    cp = lab.xdpguard("rollback", *_where(lab), check=False)
    assert cp.returncode == 2 and "no earlier policy" in cp.stderr
    assert running(lab) == "a"


def test_history_keeps_the_last_policies(lab):
    lab.detach(check=False)
    n = pins.HISTORY + 2
    files = []
    for i in range(n):
        f = lab.dir / f"h{i}.toml"
        f.write_text(f'[policy]\nname = "h{i}"\n[[rule]]\nname = "r"\nproto = "udp"\ndport = {9 + i}\naction = "deny"\n')
        lab.apply(f)
        files.append(f)
    hist = [h["policy"] for h in status(lab)["history"]]
    assert hist == [f"h{i}" for i in range(n - 2, n - 2 - pins.HISTORY, -1)] and len(hist) >= 3
    for want in hist:
        lab.xdpguard("rollback", *_where(lab))
        assert status(lab)["policy"] == want
    cp = lab.xdpguard("rollback", *_where(lab), check=False)
    assert cp.returncode == 2 and "no earlier policy" in cp.stderr
    lab.detach()


# ---------------------------------------------------------------- without the kernel

SET_POLICY = '[policy]\nname = "sets"\n[sets]\nbl = { file = "bl.netset" }\n' \
             '[[rule]]\nname = "bl"\nsrc = "@bl"\naction = "deny"\n'


def test_sha256_covers_the_set_files(tmp_path):
    import hashlib

    from xdpguard.policy import load
    p, s = tmp_path / "p.toml", tmp_path / "bl.netset"
    p.write_text(SET_POLICY)
    s.write_text("192.0.2.0/24\n")
    first = load(p).sha256
    s.write_text("198.51.100.0/24\n")
    assert load(p).sha256 != first              # a new blocklist is a new policy
    plain = tmp_path / "plain.toml"
    plain.write_text(text("a"))
    assert load(plain).sha256 == hashlib.sha256(plain.read_bytes()).hexdigest()   # sha256sum's


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A policy reading a set file, both in tmp_path, and a state directory
    of the test's own."""
    from xdpguard import bans
    monkeypatch.setattr(bans, "STATE_ROOT", tmp_path / "state")
    p, s = tmp_path / "p.toml", tmp_path / "bl.netset"
    p.write_text(SET_POLICY)
    s.write_text("192.0.2.0/24\n2001:db8::/32\n")
    return p, s


def test_kept_copy_survives_edits(files):
    from xdpguard import history
    from xdpguard.policy import load
    p, s = files
    pol = load(p)
    assert history.save(pol, "ns", "eth0") is None
    p.write_text(text("b"))
    s.write_text("garbage\n")
    info = pins.PolicyInfo(pol.name, pol.sha256, pol.source, 1.0)
    kept = history.load_kept("ns", "eth0", info)
    assert (kept.name, kept.sha256, kept.source) == (pol.name, pol.sha256, pol.source)
    assert kept.sets == pol.sets
    # Pruned once neither the record nor its history names it.
    rec = pins.Record(policy=pins.PolicyInfo("other", "00" * 32))
    history.prune("ns", "eth0", rec)
    with pytest.raises(Exception, match="no copy of policy 'sets'"):
        history.load_kept("ns", "eth0", info)
    assert list((history.history_dir("ns", "eth0") / "blobs").iterdir()) == []


def test_a_set_file_changed_before_its_copy_is_said(files):
    from xdpguard import history
    from xdpguard.policy import load
    p, s = files
    pol = load(p)
    s.write_text("198.51.100.0/24\n")         # between reading and keeping
    assert "changed since it was read" in history.save(pol, "ns", "eth0")
    assert not (history.history_dir("ns", "eth0") / f"{pol.sha256}.json").exists()
