"""Network namespaces and veth pairs for tests, bench and demo: the one lab.

``VethPair``: a veth pair a <-> b, each end in a namespace of its own or
both in one, created inside the namespaces (never in the root one) under
names unique to the run, and removed on exit whatever happened. Every test
that needs an interface, the bench and the demo build on it; entering a
namespace is xdpguard.netns's ``in_netns`` (the product's own), tools run
under ``nsenter --net`` (``nsenter``; never ``ip netns exec``: it remounts
/sys and hides bpffs).

``Lab``: the end-to-end lab, two namespaces joined by one pair, addresses,
servers and the xdpguard CLI:

    client netns  xg<tag>-cli                     server netns  xg<tag>-srv
    xg<tag>c  10.200.0.2/24, .10-.20      <-->    xg<tag>s  10.200.0.1/24
              fd00:200::2/64, ::10                          fd00:200::1/64
              10.200.1.0/24 (local route: any                route 10.200.1.0/24
              address of it is the client's)                 via 10.200.0.2

xdpguard runs on the server veth (ingress of the server), in the root
namespace with ``--netns``.

Python:

    with VethPair("xgt", split=False) as v:       # v.ns_a, v.a, v.ia, v.b, ...
        with in_netns(v.ns_a):
            v.guard(v.ns_a, v.ia, v.a)
            ...

    with Lab() as lab:
        lab.apply(lab.write_policy("p", TOML))
        lab.run("client", ["ping", "-c", "3", SERVER4])
        lab.counters()["ping"]["packets"]

Shell (scripts/demo.sh):

    python -m testing.lab up --tag abc123 [--nginx] [--tcp-server 8080]   # prints NAME=value lines
    python -m testing.lab down --tag abc123

Teardown (``VethPair.close``, ``Lab.teardown``, ``down``) is idempotent:
the Lab detaches xdpguard from both veths and stops its processes; then
every process still in the namespaces is killed, the link deleted (its
peer and XDP programs go with it) and the namespaces deleted; only
namespaces this process created (or adopted: ``down``) are ever deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testing.timing import scaled
from xdpguard import netns as xns

REPO = Path(__file__).resolve().parent.parent

SERVER4 = "10.200.0.1"
CLIENT4 = "10.200.0.2"
EXTRA4 = [f"10.200.0.{i}" for i in range(10, 21)]
NET4 = "10.200.0.0/24"
SPOOF_NET = "10.200.1.0/24"
SERVER6 = "fd00:200::1"
CLIENT6 = "fd00:200::2"
EXTRA6 = ["fd00:200::10"]
NET6 = "fd00:200::/64"

PIN_ROOT = Path("/sys/fs/bpf/xdpguard")
_TAG_RE = re.compile(r"[0-9a-f]{1,8}")

# Every namespace a VethPair of this process created (the bench records
# them, so that a test can check that none survived).
CREATED: list[str] = []
# A file that processes append the namespaces they create to, one a line,
# when set (tests/conftest.py sets it for the session: its end checks that
# none of them, nor their pins and state, survived, also those of the
# bench or a `testing.lab up` the tests started).
CREATED_LOG = "XDPGUARD_TEST_CREATED"


def _note_created(ns: str) -> None:
    CREATED.append(ns)
    log = os.environ.get(CREATED_LOG)
    if log:
        with open(log, "a") as f:
            f.write(ns + "\n")


def leftovers(namespaces) -> list[tuple[str, str, Path]]:
    """What of these namespaces is still there, as (what, namespace, path):
    the "namespace", its xdpguard "pins", its xdpguard "state" directory."""
    from xdpguard import bans
    out = []
    for ns in dict.fromkeys(namespaces):
        for what, p in (("namespace", Path(xns.netns_path(ns))), ("pins", PIN_ROOT / ns),
                        ("state", bans.STATE_ROOT / ns)):
            if p.exists():
                out.append((what, ns, p))
    return out


class LabError(Exception):
    pass


def xdpguard_cmd() -> list[str]:
    exe = REPO / ".venv" / "bin" / "xdpguard"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("xdpguard")
    return [found] if found else [sys.executable, "-m", "xdpguard.cli"]


def _fmt(cp: subprocess.CompletedProcess) -> str:
    cmd = cp.args if isinstance(cp.args, str) else " ".join(map(str, cp.args))
    return f"$ {cmd}\n(exit {cp.returncode})\nstdout: {cp.stdout}\nstderr: {cp.stderr}"


def _host(cmd, timeout=None, check=True, input=None) -> subprocess.CompletedProcess:
    """Run a command in the root namespace (only iproute2 and xdpguard)."""
    cp = subprocess.run(cmd, capture_output=True, text=True, input=input,
                        timeout=scaled(30) if timeout is None else timeout)
    if check and cp.returncode != 0:
        raise LabError(_fmt(cp))
    return cp


def json_docs(text: str) -> list:
    """All JSON documents of a text (one per line, or concatenated)."""
    dec, i, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while i < len(text):
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


# ---------------------------------------------------------------- namespaces and veth pairs

def unique(prefix: str, length: int = 8) -> str:
    """prefix + random hex, `length` characters: a name no other run uses.
    8 keeps an interface name (one character more) inside the 15-character
    comm of its NAPI thread, "napi/<name>-<id>", which the bench looks up."""
    n = length - len(prefix)
    if n < 3:
        raise ValueError(f"prefix {prefix!r} leaves fewer than 3 random characters of {length}")
    return prefix + secrets.token_hex(n)[:n]


def nsenter(ns: str, argv) -> list[str]:
    """The command line running argv (a list, or a string for sh -c) in
    network namespace ns; nsenter keeps bpffs visible."""
    if isinstance(argv, str):
        argv = ["sh", "-c", argv]
    return ["nsenter", f"--net={xns.netns_path(ns)}", "--", *map(str, argv)]


def netns_list() -> list[str]:
    """The named namespaces (/run/netns)."""
    out = _host(["ip", "netns", "list"], check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def _netns_ino(path: str) -> int:
    return os.stat(path).st_ino


class VethPair:
    """A veth pair: end ``a`` in namespace ``ns_a``, end ``b`` in ``ns_b``
    (split) or both in one namespace (``ns_a == ns_b``, split=False).

    name = prefix + tag (default: random hex, 8 characters in all);
    namespaces ``<name>-<side>`` (unsplit: ``<name>``), interfaces
    ``<name><first letter of side>``. ``ia``/``ib`` are the ifindexes.
    Made by ``create()`` (``with``): namespaces, the pair created straight
    inside them, then ``configure()`` (lo and both ends up; subclasses add
    addresses and settings); on any failure, and on exit, ``close()``.
    """

    def __init__(self, prefix: str = "xgt", tag: str | None = None, split: bool = True,
                 sides: tuple[str, str] = ("a", "b")):
        self.name = prefix + tag if tag else unique(prefix)
        if split:
            self.ns_a, self.ns_b = (f"{self.name}-{s}" for s in sides)
        else:
            self.ns_a = self.ns_b = self.name
        self.a, self.b = (self.name + s[0] for s in sides)
        for ns in self.namespaces():
            xns.check_name(ns)
        for ifc in (self.a, self.b):
            xns.check_name(ifc, "iface")
        self.ia = self.ib = None
        self._created: list[str] = []

    def namespaces(self) -> list[str]:
        return list(dict.fromkeys((self.ns_a, self.ns_b)))

    def __enter__(self):
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        try:
            for ns in self.namespaces():
                _host(["ip", "netns", "add", ns])
                self._created.append(ns)
                _note_created(ns)
            _host(["ip", "link", "add", self.a, "netns", self.ns_a, "type", "veth",
                   "peer", "name", self.b, "netns", self.ns_b])
            self.ia = xns.ifindex(self.a, self.ns_a)
            self.ib = xns.ifindex(self.b, self.ns_b)
            self.configure()
        except BaseException:
            self.close()
            raise

    def configure(self) -> None:
        """Loopback and both ends up."""
        self.ip(self.ns_a, "link set lo up", f"link set {self.a} up")
        self.ip(self.ns_b, "link set lo up", f"link set {self.b} up")

    def adopt(self) -> None:
        """Take over this pair's namespaces, made by another process (a lab
        `up` before its `down`): close() then removes them."""
        present = set(netns_list())
        self._created = [ns for ns in self.namespaces() if ns in present]

    def close(self) -> None:
        """Idempotent; never raises for what is already gone."""
        errors = []
        for ns in self._created:
            # Anything still running in our namespaces is ours.
            for _ in range(3):
                pids = [int(p) for p in _host(["ip", "netns", "pids", ns], check=False).stdout.split()
                        if p.isdigit() and int(p) != os.getpid()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
        if self.ns_a in self._created:
            # Now, not when the namespace's last reference goes: the peer and
            # any XDP program go with it.
            _host(["ip", "-n", self.ns_a, "link", "del", self.a], check=False)
        for ns in reversed(self._created):
            cp = _host(["ip", "netns", "del", ns], check=False)
            if cp.returncode != 0 and os.path.exists(xns.netns_path(ns)):
                errors.append(_fmt(cp))
        # What xdpguard kept of them outlives the namespace: pins (a test
        # that failed before its detach) and the state directory.
        from xdpguard import bans
        for ns in self._created:
            for d in (PIN_ROOT / ns, bans.STATE_ROOT / ns):
                if d.exists():
                    shutil.rmtree(d, ignore_errors=True)
        self._created = []
        if errors:
            print(f"veth pair {self.name} teardown:\n" + "\n".join(errors), file=sys.stderr)

    # ------------------------------------------------------------ working inside

    def ns(self, which: str) -> str:
        return which

    def iface(self, which: str) -> str:
        return which

    def ip(self, ns: str, *lines: str) -> None:
        """`ip -batch` of lines in namespace ns."""
        _host(["ip", "-n", self.ns(ns), "-batch", "-"], input="\n".join(lines) + "\n")

    def sysctl(self, ns: str, key: str, value) -> None:
        """Write /proc/sys/<key> (net/ipv4/conf/all/rp_filter, ...) of namespace ns."""
        with xns.in_netns(self.ns(ns)):
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(str(value))

    def mac(self, ifname: str) -> str:
        ns = self.ns_a if ifname == self.a else self.ns_b
        return json.loads(_host(["ip", "-n", ns, "-j", "link", "show", "dev", ifname]).stdout)[0]["address"]

    def guard(self, ns: str, ifindex: int, ifname: str) -> None:
        """Refuse to touch an interface that is not ours: the calling thread
        must be inside our namespace ns (in_netns) and ifindex name ifname."""
        if ns not in self.namespaces() or ifname not in (self.a, self.b):
            raise LabError(f"{ifname} in {ns} is not an interface of veth pair {self.name}")
        if _netns_ino("/proc/thread-self/ns/net") != _netns_ino(xns.netns_path(ns)):
            raise LabError(f"not inside network namespace {ns}")
        if socket.if_indextoname(ifindex) != ifname:
            raise LabError(f"ifindex {ifindex} is not {ifname}")

    def run(self, ns: str, cmd, timeout: float | None = None, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run cmd (list, or a string for sh -c) in namespace ns; a timeout
        gives exit status 124."""
        args = nsenter(self.ns(ns), cmd)
        timeout = scaled(30) if timeout is None else timeout
        try:
            cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired as e:
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                        for x in (e.stdout, e.stderr))
            cp = subprocess.CompletedProcess(args, 124, out, err)
        if check and cp.returncode != 0:
            raise LabError(_fmt(cp))
        return cp


# Small servers started inside a namespace (stdlib only).
_TCP_SERVER = r"""
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(128)
print("ready", flush=True)
body = b"hello from %s:%d\n" % (addr.encode(), port)
def serve(c):
    try:
        c.settimeout(2)
        try:
            c.recv(4096)
        except OSError:
            pass
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n" % len(body) + body)
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# UDP sender: paced, bounded in packets AND seconds; a 4-byte sequence number
# heads every payload. SIGTERM stops it early. Prints one JSON line.
_UDP_SEND = r"""
import json, signal, socket, struct, sys, time
a = json.loads(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
fam = socket.AF_INET6 if ":" in a["dst"] else socket.AF_INET
socks = []
for src in a["srcs"]:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((src, 0))
    socks.append(s)
dst, pps, pad = (a["dst"], a["port"]), float(a["pps"]), b"x" * a.get("size", 32)
n, t0 = 0, time.monotonic()
first = last = t0
while n < a["max_packets"] and not stop:
    now = time.monotonic()
    if now - t0 >= a["seconds"]:
        break
    due = t0 + n / pps
    if due > now:
        time.sleep(due - now)
    last = time.monotonic()
    if n == 0:
        first = last
    try:
        socks[n % len(socks)].sendto(struct.pack("!I", n) + pad, dst)
    except OSError:
        pass
    n += 1
print(json.dumps({"sent": n, "duration": last - first, "first": first, "last": last}), flush=True)
"""

# UDP sink: counts datagrams and distinct sequence numbers until SIGTERM,
# then reads what is still queued. "drops" is what its socket dropped
# because its buffer was full (a sink on a slow machine falls behind): the
# last column of /proc/net/udp[6] for its inode. The data path delivered
# those, so a test of the data path must not count them as its losses.
_UDP_SINK = r"""
import json, os, signal, socket, struct, sys
addr, port = sys.argv[1], int(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
try:
    # As root, past net.core.rmem_max: that cap is per namespace only on
    # recent kernels (on 6.1 it is the host's, not the tests' to raise).
    s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 22)
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((addr, port))
s.settimeout(0.05)
print("ready", flush=True)
seen, total = set(), 0
def take(data):
    global total
    total += 1
    if len(data) >= 4:
        seen.add(struct.unpack("!I", data[:4])[0])
while not stop:
    try:
        take(s.recv(65536))
    except (socket.timeout, InterruptedError):
        continue
s.setblocking(False)
while True:
    try:
        take(s.recv(65536))
    except InterruptedError:
        continue
    except OSError:
        break
drops = None
inode = str(os.fstat(s.fileno()).st_ino)
with open("/proc/net/udp6" if fam == socket.AF_INET6 else "/proc/net/udp") as f:
    for ln in f.read().splitlines()[1:]:
        col = ln.split()
        if col[9] == inode:
            drops = int(col[-1])
top = max(seen) if seen else -1
missing = sorted(set(range(top + 1)) - seen)
print(json.dumps({"received": total, "unique": len(seen), "max_seq": top,
                  "missing": missing[:50], "nmissing": len(missing), "drops": drops}), flush=True)
"""

_NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type text/plain;
{servers}
}}
"""


class Proc:
    """A process started in a namespace, in its own session (killable as a group)."""

    def __init__(self, popen: subprocess.Popen, what: str):
        self.popen, self.what = popen, what

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float | None = None) -> tuple[str, str]:
        """SIGTERM (then SIGKILL); returns what it wrote (if piped)."""
        timeout = scaled(3) if timeout is None else timeout
        if self.alive():
            self.signal(signal.SIGTERM)
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            out, err = self.popen.communicate(timeout=timeout)
        return out or "", err or ""


class Nginx:
    def __init__(self, proc: Proc, directory: Path, vhosts: list[str], listen: list[tuple[str, int]]):
        self.proc, self.dir, self.vhosts, self.listen = proc, directory, vhosts, listen

    def stop(self) -> None:
        # SIGQUIT: graceful; Proc.stop follows with TERM/KILL of the group.
        if self.proc.alive():
            self.proc.signal(signal.SIGQUIT)
            try:
                self.proc.popen.wait(timeout=scaled(3))
            except subprocess.TimeoutExpired:
                pass
        self.proc.stop()


class Lab(VethPair):
    """Server and client namespaces joined by a veth pair (see module doc):
    the server is end a, the client end b."""

    def __init__(self, tag: str | None = None):
        tag = tag or secrets.token_hex(3)
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"lab tag {tag!r}: 1-8 lowercase hex digits")
        super().__init__("xg", tag, sides=("srv", "cli"))
        self.tag = tag
        self.server_ns, self.server_if = self.ns_a, self.a
        self.client_ns, self.client_if = self.ns_b, self.b
        self.dir = Path(tempfile.gettempdir()) / f"xglab-{self.tag}"
        self.procs: list[Proc] = []
        self.xg = xdpguard_cmd()

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Lab":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def names(self) -> dict:
        return {"TAG": self.tag, "SERVER_NS": self.server_ns, "CLIENT_NS": self.client_ns,
                "SERVER_IF": self.server_if, "CLIENT_IF": self.client_if, "LAB_DIR": str(self.dir),
                "SERVER4": SERVER4, "CLIENT4": CLIENT4, "SERVER6": SERVER6, "CLIENT6": CLIENT6,
                "SPOOF_NET": SPOOF_NET}

    def setup(self) -> None:
        if set(self.namespaces()) & set(netns_list()):
            raise LabError(f"lab {self.tag} already exists (python -m testing.lab down --tag {self.tag})")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.create()
            self._wait_ready()
        except BaseException:
            self.teardown()
            raise

    def configure(self) -> None:
        super().configure()
        self.ip("server",
                f"addr add {SERVER4}/24 dev {self.server_if}",
                f"addr add {SERVER6}/64 dev {self.server_if} nodad",
                f"route add {SPOOF_NET} via {CLIENT4}")
        self.ip("client",
                f"addr add {CLIENT4}/24 dev {self.client_if}",
                *[f"addr add {a}/24 dev {self.client_if}" for a in EXTRA4],
                f"addr add {CLIENT6}/64 dev {self.client_if} nodad",
                *[f"addr add {a}/64 dev {self.client_if} nodad" for a in EXTRA6],
                # AnyIP: every address of the spoof range is local to the client,
                # so hping3 -a / bind() from it work and replies are accepted.
                f"route add local {SPOOF_NET} dev lo")
        for ns in ("server", "client"):
            for key in ("net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter"):
                self.sysctl(ns, key, 0)

    def _wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (scaled(10) if timeout is None else timeout)
        while True:
            r4 = self.run("client", ["ping", "-n", "-q", "-c", "1", "-W", "1", SERVER4], timeout=scaled(5))
            r6 = self.run("client", ["ping", "-6", "-n", "-q", "-c", "1", "-W", "1", SERVER6], timeout=scaled(5))
            if r4.returncode == 0 and r6.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"lab {self.tag}: no connectivity\n{_fmt(r4)}\n{_fmt(r6)}")
            time.sleep(0.2)

    def teardown(self) -> None:
        """Idempotent; never raises for what is already gone."""
        errors = []
        for ns, ifc in ((self.server_ns, self.server_if), (self.client_ns, self.client_if)):
            if (PIN_ROOT / ns / ifc).exists():
                cp = self.xdpguard("detach", "--iface", ifc, "--netns", ns, check=False)
                if cp.returncode != 0:
                    errors.append(f"xdpguard detach failed:\n{_fmt(cp)}")
        for p in reversed(self.procs):
            try:
                p.stop(timeout=scaled(2))
            except Exception as e:   # noqa: BLE001 - keep tearing down
                errors.append(f"stopping {p.what}: {e}")
        self.procs.clear()
        # Only if detach failed above; say so (close() removes them).
        errors += [f"xdpguard pins left in {d}: removed by the lab"
                   for d in (PIN_ROOT / ns for ns in (self.server_ns, self.client_ns)) if d.exists()]
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            print(f"lab {self.tag} teardown:\n" + "\n".join(errors), file=sys.stderr)

    # ------------------------------------------------------------ commands

    def ns(self, which: str) -> str:
        """A namespace by role ('server', 'client') or name."""
        return {"server": self.server_ns, "client": self.client_ns}.get(which, which)

    def iface(self, which: str) -> str:
        return {"server": self.server_if, "client": self.client_if}.get(which, which)

    def popen(self, ns: str, cmd, what: str | None = None, **kw) -> Proc:
        """Start cmd in a namespace in the background; stopped on teardown."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = Proc(subprocess.Popen(nsenter(self.ns(ns), cmd), start_new_session=True, **kw),
                 what or (cmd if isinstance(cmd, str) else " ".join(map(str, cmd))))
        self.procs.append(p)
        return p

    def stop(self, proc) -> tuple[str, str]:
        """Stop a Proc or Nginx started by this lab."""
        if isinstance(proc, Nginx):
            proc.stop()
            proc = proc.proc
            out = ("", "")
        else:
            out = proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)
        return out

    def wait_listen(self, ns: str, port: int, proto: str = "tcp", timeout: float | None = None) -> None:
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        deadline = time.monotonic() + (scaled(10) if timeout is None else timeout)
        while time.monotonic() < deadline:
            out = self.run(ns, ["ss", flag, f"sport = :{port}"], timeout=scaled(5)).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise LabError(f"nothing listens on {proto} port {port} in {self.ns(ns)}")

    def start_nginx(self, ns: str = "server", listen=None,
                    vhosts=("a.lab", "b.lab")) -> Nginx:
        """nginx with its own config, pid and logs in the lab dir; listens only on
        lab addresses. Each vhost answers 'vhost NAME'. Returns a handle (stop())."""
        listen = list(listen or [(SERVER4, 80), (f"[{SERVER6}]", 80)])
        d = self.dir / f"nginx-{len(self.procs)}"
        d.mkdir(parents=True, exist_ok=True)
        servers = []
        for i, name in enumerate(vhosts):
            ls = "".join(f"        listen {a}:{p}{' default_server' if i == 0 else ''};\n" for a, p in listen)
            servers.append(f"    server {{\n{ls}        server_name {name};\n"
                           f"        location / {{ return 200 \"vhost {name}\\n\"; }}\n    }}")
        conf = d / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(dir=d, servers="\n".join(servers)))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.run(ns, [nginx, "-t", "-q", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                 check=True, timeout=scaled(10))
        proc = self.popen(ns, [nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                          what="nginx", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _a, p in listen:
            self.wait_listen(ns, p)
        return Nginx(proc, d, list(vhosts), listen)

    def tcp_server(self, ns: str = "server", port: int = 8080, addr: str = SERVER4) -> Proc:
        """A tiny TCP server answering every connection with an HTTP/1.0 200."""
        p = self.popen(ns, [sys.executable, "-u", "-c", _TCP_SERVER, addr, str(port)],
                       what=f"tcp server {addr}:{port}", stderr=subprocess.DEVNULL)
        line = p.popen.stdout.readline()
        if line.strip() != "ready":
            self.stop(p)
            raise LabError(f"tcp server on {addr}:{port} did not start")
        return p

    def udp_send(self, ns: str, srcs, dst: str, port: int, pps: float, seconds: float,
                 max_packets: int | None = None, background: bool = False, size: int = 32):
        """Send UDP from srcs (round robin) at pps, for at most seconds and
        max_packets (default pps*seconds). Foreground: returns
        {"sent", "duration", ...}; background: a Proc (stop_json() it)."""
        if isinstance(srcs, str):
            srcs = [srcs]
        args = {"srcs": list(srcs), "dst": dst, "port": int(port), "pps": pps, "seconds": seconds,
                "max_packets": int(max_packets if max_packets is not None else pps * seconds),
                "size": size}
        cmd = [sys.executable, "-u", "-c", _UDP_SEND, json.dumps(args)]
        if background:
            return self.popen(ns, cmd, what=f"udp sender -> {dst}:{port}")
        cp = self.run(ns, cmd, timeout=seconds + scaled(10), check=True)
        return json.loads(cp.stdout.strip().splitlines()[-1])

    def udp_sink(self, ns: str = "server", port: int = 9100, addr: str = SERVER4) -> Proc:
        """A UDP receiver counting sequence numbers; stop_json() returns
        {"received", "unique", "max_seq", "missing", "nmissing", "drops"}
        (drops: what its full socket buffer dropped)."""
        p = self.popen(ns, [sys.executable, "-u", "-c", _UDP_SINK, addr, str(port)],
                       what=f"udp sink {addr}:{port}")
        if p.popen.stdout.readline().strip() != "ready":
            self.stop(p)
            raise LabError(f"udp sink on {addr}:{port} did not start")
        return p

    def stop_json(self, proc: Proc) -> dict:
        """Stop a sender/sink (SIGTERM) and parse its JSON summary."""
        out, err = self.stop(proc)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise LabError(f"{proc.what}: no summary (stderr: {err})")
        return json.loads(lines[-1])

    # ------------------------------------------------------------ xdpguard

    def xdpguard(self, *args, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run the CLI in the root namespace (pass --netns yourself, or use
        apply/detach/stats/status below, which add --iface/--netns)."""
        cmd = [*self.xg, *map(str, args)]
        # A first bcc compile under emulation takes minutes.
        timeout = scaled(180, cap=900) if timeout is None else timeout
        # Own session: a Ctrl-C of the test run does not hit it, and an
        # interrupt here lets it finish (a killed apply can leave pins).
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise LabError(_fmt(subprocess.CompletedProcess(cmd, -9, out, err)) + f"\n(timed out after {timeout}s)")
        except BaseException:
            try:
                p.communicate(timeout=scaled(60))
            except BaseException:
                p.kill()
                p.wait()
            raise
        cp = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if check and cp.returncode != 0:
            raise LabError(_fmt(cp))
        return cp

    def _where(self, side: str) -> list[str]:
        return ["--iface", self.iface(side), "--netns", self.ns(side)]

    def apply(self, policy, mode: str | None = None, side: str = "server", check: bool = True):
        """Apply a policy file; returns the apply --json document (or the
        CompletedProcess when check=False)."""
        args = ["apply", str(policy), *self._where(side), "--json"]
        if mode:
            args += ["--mode", mode]
        cp = self.xdpguard(*args, check=check)
        return json_docs(cp.stdout)[0] if check else cp

    def detach(self, side: str = "server", check: bool = True) -> subprocess.CompletedProcess:
        return self.xdpguard("detach", *self._where(side), check=check)

    def status(self) -> list[dict]:
        """This lab's entries of `xdpguard status --json`."""
        out = []
        for ns in (self.server_ns, self.client_ns):
            doc = json_docs(self.xdpguard("status", "--netns", ns, "--json").stdout)[0]
            out += [r for r in doc["interfaces"] if r["netns"] == ns]
        return out

    def stats(self, side: str = "server") -> dict:
        """`xdpguard stats --iface IF --netns NS --json` as a dict."""
        docs = json_docs(self.xdpguard("stats", *self._where(side), "--json").stdout)
        if len(docs) != 1:
            raise LabError(f"stats --json: expected one document, got {len(docs)}")
        return docs[0]

    def counters(self, side: str = "server") -> dict[str, dict]:
        """Per-rule counters by rule name (and 'default')."""
        return {r["rule"]: r for r in self.stats(side)["rules"]}

    def write_policy(self, name: str, text: str) -> Path:
        p = self.dir / f"{name}.toml"
        p.write_text(text)
        return p

    def xdp_on(self, side: str = "server") -> str | None:
        """'xdp', 'xdpgeneric', ... as `ip link` shows it, or None."""
        out = self.run(side, ["ip", "-d", "link", "show", "dev", self.iface(side)], check=True).stdout
        m = re.search(r"\b(xdp|xdpgeneric|xdpdrv|xdpoffload|xdpmulti)\b", out)
        return m.group(1) if m else None


# ---------------------------------------------------------------- shell entry

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testing.lab", description="xdpguard lab namespaces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create a lab; print NAME=value lines for the shell")
    up.add_argument("--tag", help="hex tag (default: random)")
    up.add_argument("--nginx", action="store_true", help="nginx on the server, port 80, vhosts a.lab b.lab")
    up.add_argument("--tcp-server", type=int, action="append", default=[], metavar="PORT",
                    help="a small TCP/HTTP server on the server address (repeatable)")
    down = sub.add_parser("down", help="tear a lab down (idempotent)")
    down.add_argument("--tag", required=True)
    args = ap.parse_args(argv)

    lab = Lab(args.tag)
    if args.cmd == "down":
        lab.adopt()
        lab.teardown()
        return 0
    lab.setup()
    try:
        if args.nginx:
            lab.start_nginx()
        for port in args.tcp_server:
            lab.tcp_server(port=port)
    except BaseException:
        lab.teardown()
        raise
    # The servers outlive this process; `down` stops them (ip netns pids).
    for p in lab.procs:
        for f in (p.popen.stdout, p.popen.stderr):
            if f:
                f.close()
    for k, v in lab.names().items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
