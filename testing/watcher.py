"""`xdpguard watch --json` run by a test in the background, its lines collected."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

from testing.engines import LockWatch
from testing.lab import REPO, Lab, nsenter
from testing.timing import scaled, wait_until

# watch starts in seconds, but its first bcc compile of the probes took
# 54-81 s in an emulated guest, and the program's and the probes' over
# 300 s in one on a loaded host (stretched by scaled(60) there); the wait
# ends as soon as it says "watching".
START_DEADLINE = 300.0


class Watcher:
    """`xdpguard watch --json` on the lab's server interface (or iface in
    netns), its decisions in `lines` and its notes in `err`. It runs in the
    root namespace (as on a host), or with `ns` inside a lab namespace:
    there its --metrics exporter listens on that namespace's loopback, not
    the machine's. wait=False: start it, wait_ready() later."""

    def __init__(self, lab: Lab, policy, state_dir, interval="0.5s", extra=(), ns=None,
                 iface=None, netns=None, wait=True):
        env = dict(os.environ, XDPGUARD_STATE_DIR=str(state_dir))
        cmd = [*lab.xg, "watch", str(policy), "--iface", iface or lab.server_if,
               "--netns", netns or lab.server_ns, "--interval", interval, "--json", *extra]
        if ns:
            cmd = nsenter(lab.ns(ns), cmd)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, cwd=REPO)
        self.lines: list[dict] = []
        self.err: list[str] = []
        self.ready = threading.Event()
        self._readers = [threading.Thread(target=f, daemon=True) for f in (self._read, self._read_err)]
        for t in self._readers:
            t.start()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        wait_until(lambda: self.ready.is_set() or self.p.poll() is not None, max(START_DEADLINE, scaled(60)),
                   interval=0.1)
        if not self.ready.is_set():
            self.stop(signal.SIGKILL)
            raise AssertionError("watch did not start: " + "".join(self.err))

    def _read(self):
        for line in self.p.stdout:
            d = json.loads(line)
            d["_seen"] = time.monotonic()
            self.lines.append(d)

    def _read_err(self):
        for line in self.p.stderr:
            self.err.append(line)
            if "watching" in line:
                self.ready.set()

    def notes(self, text: str) -> list[str]:
        """Lines of standard error that contain text."""
        return [ln for ln in self.err if text in ln]

    def bans(self, source=None):
        return [d for d in self.lines if d["action"] == "ban" and (source is None or d["source"] == source)]

    def wait_for(self, pred, timeout):
        """pred()'s first true value within timeout seconds, not counting
        those in which another process held the machine's pin lock: watch
        bans and lifts bans under it, and another run's apply holds it for
        seconds (a bcc compile)."""
        with LockWatch({os.getpid(), self.p.pid}) as lock:
            return lock.wait_until(pred, max(timeout, 0.0))

    def wait_exit(self, timeout: float) -> int | None:
        """Its exit status once it has exited by itself within timeout (its
        output read to the end), else None."""
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._readers:
            t.join(scaled(5))
        return rc

    def stop(self, sig=signal.SIGTERM) -> float:
        t0 = time.monotonic()
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(scaled(10))
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        for t in self._readers:
            t.join(scaled(5))
        return time.monotonic() - t0
