"""Every bad command-line value is exit status 2 with a message naming the
flag, before anything runs (issue 16, items 10 and 15); a closed pipe is
no error. The real program, as an operator runs it."""
from __future__ import annotations

import os
import subprocess

import pytest

from testing.lab import REPO, Lab, xdpguard_cmd
from testing.timing import scaled

POLICY = """
[policy]
name = "{name}"
[[rule]]
name = "{name}-ping"
proto = "icmp"
action = "allow"
"""


def _run(*argv, stdout=subprocess.PIPE, timeout=60, env=None):
    return subprocess.run([*xdpguard_cmd(), *map(str, argv)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=REPO, timeout=scaled(timeout), env=env)


@pytest.fixture
def policy(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text(POLICY.format(name="p"))
    return p


BAD = [
    (["stats", "--watch", "-1"], "--watch"),
    (["stats", "--watch", "0"], "--watch"),
    (["stats", "--watch", "10ms"], "--watch"),
    (["top", "--interval", "0"], "--interval"),
    (["top", "--interval", "-2"], "--interval"),
    (["watch", "{policy}", "--iface", "xgnone0", "--metrics", "127.0.0.1:99999"], "--metrics"),
    (["watch", "{policy}", "--iface", "xgnone0", "--metrics", "127.0.0.1"], "--metrics"),
    (["test", "{policy}", "--src", "192.0.2.1", "--count", "0"], "--count"),
    (["test", "{policy}", "--src", "192.0.2.1", "--count", "100000000000"], "--count"),
    (["apply", "{policy}", "--iface", "xgnone0", "--confirm", "-5"], "--confirm"),
    (["apply", "{policy}", "--iface", "xgnone0", "--confirm", "0"], "--confirm"),
    (["apply", "{policy}", "--iface", "xgnone0", "--confirm", "soon"], "--confirm"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_is_usage_error(policy, argv, flag):
    cp = _run(*[a.format(policy=policy) for a in argv], timeout=30)
    assert cp.returncode == 2, cp.stderr
    assert flag in cp.stderr and "Traceback" not in cp.stderr, cp.stderr


def test_packets_file_count_bounded(policy, tmp_path):
    f = tmp_path / "pk.jsonl"
    for count in ("0", "true", "100000000000"):
        f.write_text('{"src": "192.0.2.1", "count": %s}\n' % count)
        cp = _run("test", policy, "--packets", f, timeout=30)
        assert cp.returncode == 2 and "count must be an integer 1..10000000" in cp.stderr, cp.stderr


# A namespace of no xdpguard: the same output whatever else runs here.
@pytest.mark.parametrize("argv", [["status", "--netns", "xgnone"], ["--help"],
                                  ["status", "--netns", "xgnone", "--json"]])
def test_closed_pipe_is_not_an_error(argv):
    r, w = os.pipe()
    os.close(r)                         # the reader is gone before the first write
    # Buffered, as under systemd or cron: with PYTHONUNBUFFERED (set on some
    # CI machines) every write fails at once and hides the flush at exit.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        cp = _run(*argv, stdout=w, env=env)
    finally:
        os.close(w)
    assert cp.returncode == 0, cp.stderr
    assert "Broken pipe" not in cp.stderr and "Traceback" not in cp.stderr, cp.stderr


@pytest.mark.e2e
def test_confirm_is_checked_before_anything_changes():
    """A bad --confirm leaves the running policy as it was; a duration in
    --ttl's syntax is taken."""
    with Lab() as lab:
        a = lab.write_policy("a", POLICY.format(name="pol-a"))
        b = lab.write_policy("b", POLICY.format(name="pol-b"))
        lab.apply(a)
        before = [s for s in lab.status() if s["iface"] == lab.server_if][0]
        for value in ("-5", "0", "-1m", "never"):
            cp = lab.xdpguard("apply", b, "--iface", lab.server_if, "--netns", lab.server_ns,
                              "--confirm", value, check=False)
            assert cp.returncode == 2 and "--confirm" in cp.stderr, cp.stdout + cp.stderr
        after = [s for s in lab.status() if s["iface"] == lab.server_if][0]
        assert (after["policy"], after["applied_at"], after["prog_id"]) == \
            (before["policy"], before["applied_at"], before["prog_id"])
        assert after["confirm_deadline"] is None
        # "10m": applied, waiting; confirmed from another process.
        p = subprocess.Popen([*lab.xg, "apply", str(b), "--iface", lab.server_if, "--netns", lab.server_ns,
                              "--confirm", "10m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
        try:
            from testing.timing import scaled, wait_until

            def pending():
                st = [s for s in lab.status() if s["iface"] == lab.server_if]
                return st and st[0]["policy"] == "pol-b" and st[0]["confirm_deadline"]
            assert wait_until(pending, scaled(60), interval=0.2), "no pending confirmation"
            import time
            left = pending() - time.time()
            assert 500 < left <= 600, left
            lab.xdpguard("confirm", "--iface", lab.server_if, "--netns", lab.server_ns)
            out, err = p.communicate(timeout=scaled(30))
            assert p.returncode == 0, out + err
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
