"""Real Redis and CrowdSec engines for the fleet tests and the bench.

Each runs as a process of its own, started here, on a random port of a
loopback, with its own directory (configuration, data, logs), and is
stopped and removed by ``stop()`` / the context manager. Nothing of the
machine's packaged services is used or touched: Debian's units stay
disabled, /etc/crowdsec and /var/lib/crowdsec are not read.

    with RedisServer(tmp / "redis", password="...") as r:
        r.client().ping()
    with CrowdSecLAPI(tmp / "crowdsec") as cs:          # root namespace
        key = cs.add_bouncer("xdpguard")
        cs.cscli("decisions", "add", "--ip", "192.0.2.7", "--duration", "1m")

A CrowdSecLAPI with ``netns=`` runs in that network namespace (its
loopback), and so do its cscli commands.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from testing.lab import REPO, nsenter
from testing.timing import scaled, wait_until
from xdpguard import bans, pins


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop(p: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class RedisServer:
    """redis-server with no persistence (a restart loses everything: the
    hardest case for the fleet), a password, on 127.0.0.1:<random>."""

    def __init__(self, directory: Path, password: str | None = None, port: int | None = None):
        self.dir = Path(directory)
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", f"dir {self.dir}", "daemonize no",
            f"logfile {self.dir / 'redis.log'}", 'save ""', "appendonly no",
            *([f"requirepass {self.password}"] if self.password else []), ""]))
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([exe, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + scaled(20)
        while True:
            try:
                if self.client().ping():
                    return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=10)


_CROWDSEC_CONFIG = """\
common:
  daemonize: false
  log_media: file
  log_level: info
  log_dir: {d}/
  working_dir: {d}
config_paths:
  config_dir: {d}/
  data_dir: {d}/data/
  simulation_path: {d}/simulation.yaml
  hub_dir: {d}/hub/
  index_path: {d}/hub/.index.json
  notification_dir: {d}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
cscli:
  output: human
  color: "no"
db_config:
  log_level: warning
  type: sqlite
  db_path: {d}/data/crowdsec.db
  use_wal: true
  # One connection: SQLite refused an import's writes beside the bouncers'
  # reads ("database is locked") with more.
  max_open_conns: 1
  flush:
    max_items: 1000000
    max_age: 7d
api:
  client:
    insecure_skip_verify: false
    credentials_path: {d}/local_api_credentials.yaml
  server:
    log_level: warning
    listen_uri: 127.0.0.1:{port}
    profiles_path: {d}/profiles.yaml
    trusted_ips:
      - 127.0.0.1
prometheus:
  enabled: false
  level: full
  listen_addr: 127.0.0.1
  listen_port: 6060
"""

_PROFILES = """\
name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
"""


class LockWatch:
    """How long the machine-wide pin lock (xdpguard/pins.py) is held by
    processes other than `ours`, sampled from /proc/locks every 20 ms.
    xdpguard's ban writers wait for it: where other xdpguard runs apply
    policies (a bcc compile under the lock), that wait is most of a ban's
    latency, and no part of what a bouncer or a fleet does."""

    def __init__(self, ours):
        """ours: process ids, or a function giving them (hosts restart)."""
        self.ino = os.stat(pins.ROOT).st_ino
        self.ours, self.samples, self.foreign = ours, 0, 0
        self.foreign_s = 0.0
        self.marks: list[tuple[float, float]] = []     # (wall time, seconds) held by another
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _holder(self) -> int | None:
        with open("/proc/locks") as f:
            for ln in f:
                col = ln.split()
                if "->" not in ln and len(col) > 5 and col[5].endswith(f":{self.ino}"):
                    return int(col[4])
        return None

    def _run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.02):
            holder = self._holder()
            now = time.monotonic()
            self.samples += 1
            if holder is not None and holder not in (self.ours() if callable(self.ours) else self.ours):
                self.foreign += 1
                self.foreign_s += now - last
                self.marks.append((time.time(), now - last))
            last = now

    def wait_until(self, cond, timeout: float, interval: float = 0.05, most: float = 600.0):
        """testing.timing.wait_until, its deadline moved on by the time the
        lock is another process's meanwhile (by at most `most` seconds)."""
        t0, f0 = time.monotonic(), self.foreign_s
        while True:
            hit = cond()
            spent = time.monotonic() - t0
            if hit or spent - (self.foreign_s - f0) >= timeout or spent >= timeout + most:
                return hit
            time.sleep(interval)

    def foreign_between(self, start: float, end: float) -> float:
        """Seconds another process held the lock between two wall times."""
        return sum(dt for t, dt in self.marks if start <= t <= end)

    def close(self) -> None:
        self.stop.set()
        self.t.join()

    def share(self) -> float:
        """Of the samples so far, the share with a foreign holder."""
        return self.foreign / max(1, self.samples)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lock_aware_wait(ours):
    """A wait_until for what follows a write of ours: its deadline moves on
    while the machine's pin lock is another process's (LockWatch)."""
    def wait(cond, timeout: float, interval: float = 0.05):
        with LockWatch(ours) as lock:
            return lock.wait_until(cond, timeout, interval)
    return wait


def blocklist_csv(path: Path, n: int, duration: str = "1h") -> Path:
    """n decisions for `cscli decisions import`: addresses of
    100.64.0.0/10 (shared address space, nothing a lab routes)."""
    path.write_text("duration,scope,value\n" + "".join(
        f"{duration},ip,100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}\n" for i in range(n)))
    return path


class CrowdSecLAPI:
    """The CrowdSec Local API alone (`crowdsec -no-cs -no-capi`): its own
    config directory, SQLite database and port; a machine registered for
    cscli. With netns, everything runs in that network namespace."""

    def __init__(self, directory: Path, netns: str | None = None, port: int | None = None):
        self.dir = Path(directory)
        self.netns = netns
        self.port = port or (free_port() if netns is None else 8080)
        self.conf = self.dir / "config.yaml"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "CrowdSecLAPI":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _cmd(self, args: list[str]) -> list[str]:
        return nsenter(self.netns, args) if self.netns else args

    def start(self) -> None:
        d = self.dir
        for sub in ("data", "hub", "notifications"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_CROWDSEC_CONFIG.format(d=d, port=self.port))
        (d / "profiles.yaml").write_text(_PROFILES)
        (d / "simulation.yaml").write_text("simulation: off\n")
        (d / "hub" / ".index.json").write_text("{}")
        self.cscli("machines", "add", "xdpguard-tests", "--auto", "-f", str(d / "local_api_credentials.yaml"))
        exe = shutil.which("crowdsec") or "/usr/bin/crowdsec"
        self.proc = subprocess.Popen(self._cmd([exe, "-c", str(self.conf), "-no-cs", "-no-capi"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + scaled(60)
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = d / "crowdsec_api.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"crowdsec LAPI did not start on port {self.port}:\n{tail}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        """Whether the LAPI answers (403 to a request without a key)."""
        if self.netns:
            cp = subprocess.run(self._cmd(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                           f"{self.url}/v1/decisions"]), capture_output=True, text=True)
            return cp.stdout.strip() not in ("", "000")
        try:
            urllib.request.urlopen(f"{self.url}/v1/decisions", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.proc, timeout=scaled(15))
        self.proc = None

    def cscli(self, *args, timeout: float | None = None) -> str:
        exe = shutil.which("cscli") or "/usr/bin/cscli"
        cp = subprocess.run(self._cmd([exe, "-c", str(self.conf), *map(str, args)]), capture_output=True,
                            text=True, timeout=scaled(60) if timeout is None else timeout,
                            env=dict(os.environ, NO_COLOR="1"))
        if cp.returncode != 0:
            raise RuntimeError(f"cscli {' '.join(map(str, args))}: exit {cp.returncode}\n{cp.stdout}{cp.stderr}")
        return cp.stdout

    def add_bouncer(self, name: str) -> str:
        """A bouncer's API key (`cscli bouncers add NAME -o raw`)."""
        return self.cscli("bouncers", "add", name, "-o", "raw").strip().splitlines()[-1].strip()


class Host:
    """A simulated host: a lab (testing/lab.py) and its `xdpguard watch`,
    run in the root namespace like a host's daemon; its stderr collected."""

    def __init__(self, lab, name: str, policy, interval: str, netns: str | None = None):
        """netns: where watch runs (the LAPI's namespace); default the root one."""
        self.lab, self.name, self.policy, self.interval, self.netns = lab, name, policy, interval, netns
        self.p: subprocess.Popen | None = None
        self.err: list[str] = []
        self.directory = pins.iface_dir(lab.server_ns, lab.server_if)

    @property
    def where(self) -> list[str]:
        return ["--iface", self.lab.server_if, "--netns", self.lab.server_ns]

    def start(self) -> None:
        cmd = [*self.lab.xg, "watch", str(self.policy), *self.where, "--interval", self.interval, "--json"]
        self.p = subprocess.Popen(nsenter(self.netns, cmd) if self.netns else cmd, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
        threading.Thread(target=self._read, args=(self.p,), daemon=True).start()

    def _read(self, p) -> None:
        for line in p.stderr:
            self.err.append(line)

    def wait_log(self, text: str, since: int = 0, timeout: float = 30.0, wait=wait_until) -> str:
        """The first line of its stderr with text, from line `since` on
        (wait: how to wait, e.g. lock_aware_wait's)."""
        def seen():
            return next((ln for ln in self.err[since:] if text in ln), None)
        got = wait(lambda: seen() or (self.p.poll() is not None and "exited"), timeout)
        assert got and got != "exited", f"{self.name}: no '{text}' in:\n" + "".join(self.err[since:])
        return got

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(scaled(30))
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()

    def xdpguard(self, *args, check=True):
        return self.lab.xdpguard(*args, *self.where, check=check)

    def banmaps(self):
        return bans.BanMaps(self.directory, pins.read_record(self.directory))

    def bans(self) -> dict[str, dict]:
        """`bans --json`, in force, by prefix."""
        doc = json.loads(self.xdpguard("bans", "--json").stdout)
        return {b["prefix"]: b for b in doc["bans"] if not b["expired"]}

    def counters(self) -> dict:
        """The fleet's counters in fleet.json (written within a second)."""
        st = bans.read_json(bans.state_dir(self.lab.server_ns, self.lab.server_if) / "fleet.json", {})
        return st.get("counters", {})
