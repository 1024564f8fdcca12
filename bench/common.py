"""Shared helpers of the benchmark suite: tables, statistics, the bench's
veth pair (testing.lab's, always our own, always removed), CPU and
interface counters, small bcc programs, xdp-filter.

Safety rules kept here, once for every section:

* Nothing is attached to, or sent through, the machine's own interfaces:
  every interface is one end of a veth pair created by ``Lab`` inside
  namespaces named ``xgb<hex>``; ``Lab.guard`` refuses to touch an ifindex
  whose name it did not create, and the namespaces are deleted on exit
  (also on Ctrl-C and SIGTERM, which ``install_signal_handlers`` turns into
  KeyboardInterrupt so every ``finally`` runs).
* bpffs work never goes through ``ip netns exec`` (it remounts /sys and
  hides the pins): xdpguard gets ``--netns`` / ``in_netns``, other tools
  run under ``nsenter --net=/run/netns/NAME``.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testing.lab import VethPair, nsenter  # noqa: E402
from xdpguard import bpfsys  # noqa: E402
from xdpguard.netns import in_netns  # noqa: E402

PREFIX = "xgb"
NCPU = os.cpu_count() or 1


class Skip(Exception):
    """A measurement that cannot run here; the reason goes into the results."""


# ---------------------------------------------------------------- output

def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(title: str, headers: list[str], rows: list[list], note: str | None = None) -> None:
    cells = [[str(h) for h in headers]] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print()
    print(f"== {title}")
    for n, r in enumerate(cells):
        line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  " + line.rstrip())
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
    if note:
        for ln in note.splitlines():
            print(f"  {ln}")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------- signals, cleanup

_MAIN_PID = os.getpid()


def _raise_interrupt(signum, _frame):
    if os.getpid() != _MAIN_PID:
        # A forked helper (pyroute2 forks to work in a namespace, and stops
        # its children with SIGTERM): never unwind the benchmark's own
        # stack, and its cleanups, in a child.
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM / SIGHUP behave like Ctrl-C: every finally block runs."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise_interrupt)


def run(argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def nsrun(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a tool inside a bench namespace (nsenter: bpffs stays visible)."""
    assert ns.startswith(PREFIX), ns
    return run(nsenter(ns, argv), **kw)


# ---------------------------------------------------------------- the veth pair

class Lab(VethPair):
    """The bench's veth pair: sender end ``a`` in ``ns_a``, receiver end
    ``b`` in ``ns_b`` with RECV_V4 / RECV_V6 (``split=False``: one
    namespace). ``tag`` (a letter) names the section in the namespace
    names."""

    RECV_V4 = "198.51.100.1"
    RECV_V6 = "2001:db8:ffff::1"

    def __init__(self, split: bool = True, tag: str = ""):
        super().__init__(PREFIX + tag, split=split)

    def configure(self) -> None:
        # The sender stays silent: no IPv6 autoconf chatter in the counts.
        self.sysctl(self.ns_a, f"net/ipv6/conf/{self.a}/disable_ipv6", "1")
        super().configure()
        self.ip(self.ns_b, f"addr add {self.RECV_V4}/24 dev {self.b}", f"addr add {self.RECV_V6}/64 dev {self.b}")
        self.sysctl(self.ns_b, f"net/ipv6/conf/{self.b}/accept_dad", "0")
        self.sysctl(self.ns_b, "net/ipv4/conf/all/rp_filter", "0")
        self.sysctl(self.ns_b, f"net/ipv4/conf/{self.b}/rp_filter", "0")
        self.mac_a = self.mac(self.a)
        self.mac_b = self.mac(self.b)


# ---------------------------------------------------------------- interface and CPU counters

def ethtool_stats(ns: str, ifname: str) -> dict[str, int]:
    from pyroute2.ethtool.ioctl import IoctlEthtool
    with in_netns(ns):
        e = IoctlEthtool(ifname)
        try:
            return {k: int(v) for k, v in e.get_statistics()}
        finally:
            e.close()


def link_stats(ns: str, ifname: str) -> dict[str, int]:
    from pyroute2 import IPRoute
    with IPRoute(netns=ns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        st = ipr.get_links(idx)[0].get_attr("IFLA_STATS64")
        return {k: int(st[k]) for k in ("rx_packets", "rx_dropped", "tx_packets", "tx_dropped",
                                         "rx_errors", "rx_missed_errors")}


def set_gro(ns: str, ifname: str, on: bool) -> None:
    """GRO gives veth a NAPI instance, which XDP frames from the peer need
    when no XDP program is attached on this side."""
    from pyroute2.ethtool.ioctl import IoctlEthtool
    with in_netns(ns):
        e = IoctlEthtool(ifname)
        try:
            f = e.get_features()
            f["rx-gro"] = 1 if on else 0
            e.set_features(f)
        finally:
            e.close()


def set_tso(ns: str, ifname: str, on: bool) -> None:
    """Every TCP segmentation offload (tx-tcp*-segmentation) of an interface
    that can change (veth fixes them off while its peer has an XDP program)."""
    from pyroute2.ethtool.ioctl import IoctlEthtool
    with in_netns(ns):
        e = IoctlEthtool(ifname)
        try:
            f = e.get_features()
            names = [n for n in f.keys() if n.startswith("tx-tcp") and n.endswith("-segmentation")
                     and f.is_available(n) and f[n] != on]
            for name in names:
                f[name] = on
            if names:
                e.set_features(f)
        finally:
            e.close()


def snmp(ns: str) -> dict[str, int]:
    """/proc/net/snmp (+ snmp6) of a namespace: 'Ip.InReceives' -> n."""
    out: dict[str, int] = {}
    with in_netns(ns):
        lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        six = Path("/proc/thread-self/net/snmp6").read_text().splitlines()
    for h, v in zip(lines[0::2], lines[1::2]):
        hk, hv = h.split(), v.split()
        for k, x in zip(hk[1:], hv[1:]):
            out[hk[0].rstrip(":") + "." + k] = int(x)
    for ln in six:
        k, x = ln.split()
        out["Ip6." + k] = int(x)
    return out


def cpu_times() -> list[tuple[int, int]]:
    """Per CPU (busy, total) jiffies from /proc/stat."""
    out = []
    for ln in Path("/proc/stat").read_text().splitlines():
        if ln.startswith("cpu") and ln[3:4].isdigit():
            v = [int(x) for x in ln.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            total = sum(v[:8])
            out.append((total - idle, total))
    return out


def steal_times() -> list[tuple[int, int]]:
    """Per CPU (steal, total) jiffies from /proc/stat: time the hypervisor
    ran something else on this VM's virtual CPU."""
    out = []
    for ln in Path("/proc/stat").read_text().splitlines():
        if ln.startswith("cpu") and ln[3:4].isdigit():
            v = [int(x) for x in ln.split()[1:]]
            out.append((v[7] if len(v) > 7 else 0, sum(v[:8])))
    return out


def cpu_busy(before, after) -> list[float]:
    """Busy share (0..1) per CPU between two cpu_times() samples."""
    out = []
    for (b0, t0), (b1, t1) in zip(before, after):
        out.append((b1 - b0) / (t1 - t0) if t1 > t0 else 0.0)
    return out


def memlock_of_fd(fd: int) -> int | None:
    for ln in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if ln.startswith("memlock:"):
            return int(ln.split()[1])
    return None


def prog_maps_memlock(prog_fd: int) -> dict[str, int]:
    """memlock bytes of every map a program uses, by map name; an array of
    maps (the classifier tries) counts the maps in its slots too."""
    out = {}
    for mid in bpfsys.prog_info(prog_fd)["map_ids"]:
        fd = bpfsys.map_get_fd_by_id(mid)
        try:
            info = bpfsys.map_info(fd)
            total = memlock_of_fd(fd) or 0
            if info["type"] == bpfsys.BPF_MAP_TYPE_ARRAY_OF_MAPS:
                for i in range(info["max_entries"]):
                    inner = bpfsys.inner_map_fd(fd, i)
                    if inner is not None:
                        with bpfsys.closing_fd(inner):
                            total += memlock_of_fd(inner) or 0
            out[info["name"]] = total
        finally:
            os.close(fd)
    return out


# ---------------------------------------------------------------- threaded NAPI

def napi_threads(ifname: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(f"napi/{ifname}-"[:15]):
            pids.append(int(p))
    return pids


def set_threaded_napi(lab: Lab, cpu: int) -> list[int]:
    """Receiver veth NAPI in its own kthread, pinned to one CPU: the receive
    path then runs beside the sender like a NIC queue on its own core.

    sysfs is per namespace, so this one step uses `ip netns exec` (it only
    writes /sys/class/net/<our veth>/threaded; no BPF work happens there).
    """
    # Fails (EIO) while the device has no NAPI instance; the flag then
    # stays as it was, and the pids below tell.
    r = run(["ip", "netns", "exec", lab.ns_b, "sh", "-c", f"echo 1 > /sys/class/net/{lab.b}/threaded"],
            check=False)
    pids = []
    for _ in range(10 if r.returncode else 50):
        pids = napi_threads(lab.b)
        if pids:
            break
        time.sleep(0.02)
    if not pids:
        log(f"no NAPI thread for {lab.b} ({r.stderr.strip()}): receiver runs in softirq")
    for pid in pids:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError as e:
            log(f"cannot pin napi thread {pid}: {e}")
    return pids


def schedstat(path: str) -> tuple[int, int]:
    """(ns on a CPU, ns waiting for one) of a task: /proc/<pid>/schedstat."""
    try:
        f = Path(path).read_text().split()
        return int(f[0]), int(f[1])
    except (OSError, IndexError, ValueError):
        return 0, 0


@contextmanager
def pinned_thread(cpu: int) -> Iterator[None]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# ---------------------------------------------------------------- bounded kernel calls

def _noop(_signum, _frame):
    pass


def ensure_sigusr1() -> None:
    """SIGUSR1 interrupts a test run (EINTR); its Python handler does nothing."""
    import threading
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, _noop)


def run_bounded(fn, seconds: float, monitor=None) -> dict:
    """Run fn() (a long BPF_PROG_TEST_RUN) in a worker thread for at most
    `seconds`: then the worker gets SIGUSR1 and the kernel's test-run loop
    stops with EINTR. monitor(), if given, runs in the calling thread
    meanwhile (counter snapshots while traffic flows).

    Returns t0 / t1 (perf_counter when the call started / stopped) and
    whether it was interrupted.
    """
    import errno
    import threading
    ensure_sigusr1()
    box: dict = {}

    def worker():
        try:
            # Only our SIGUSR1 may interrupt the test run: any other signal
            # (SIGCHLD of a subprocess, ...) is left to the other threads.
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGUSR1})
            box["t0"] = time.perf_counter()
            box["result"] = fn()
        except OSError as e:
            if e.errno != errno.EINTR:
                box["error"] = e
            box["eintr"] = True
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e
        finally:
            box["t1"] = time.perf_counter()

    th = threading.Thread(target=worker, name="xgb-testrun", daemon=True)
    start = time.perf_counter()
    th.start()
    try:
        if monitor is not None:
            monitor()
        th.join(max(0.0, seconds - (time.perf_counter() - start)))
    finally:
        t_stop = None
        while th.is_alive():
            if t_stop is None:
                t_stop = time.perf_counter()
            signal.pthread_kill(th.ident, signal.SIGUSR1)
            th.join(0.05)
    if "error" in box:
        raise box["error"]
    if t_stop is None and box.get("eintr"):
        raise RuntimeError("test run interrupted by a signal that was not ours")
    t1 = box["t1"] if t_stop is None else min(box["t1"], t_stop)
    return {"t0": box.get("t0", start), "t1": t1, "interrupted": t_stop is not None,
            "result": box.get("result")}


# ---------------------------------------------------------------- small bcc programs

TINY_SRC = r"""
#include <uapi/linux/bpf.h>
BPF_PERCPU_ARRAY(xgb_seen, u64, 1);

int xgb_pass(struct xdp_md *ctx) { return XDP_PASS; }
int xgb_drop(struct xdp_md *ctx) { return XDP_DROP; }

/* Empty XDP_DROP plus a per-CPU count: the receiver's own tally. */
int xgb_count_drop(struct xdp_md *ctx)
{
    u32 k = 0;
    u64 *v = xgb_seen.lookup(&k);
    if (v)
        *v += 1;
    return XDP_DROP;
}

/* The least any source filter does: read the frame's source address
 * (the first touch of the packet's cache lines), count, and drop the
 * flood pools (10.0.0.0/8, 2000::/8). */
int xgb_read_drop(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    unsigned char *p = data;
    u32 k = 0;
    u64 *v;

    if (data + 54 > end)
        return XDP_PASS;
    if (!(p[12] == 0x08 && p[13] == 0x00 && p[26] == 10) &&
        !(p[12] == 0x86 && p[13] == 0xdd && p[22] == 0x20))
        return XDP_PASS;
    v = xgb_seen.lookup(&k);
    if (v)
        *v += 1;
    return XDP_DROP;
}
"""


class Tiny:
    """The empty programs: floor of BPF_PROG_TEST_RUN, flood baselines."""

    def __init__(self):
        from bcc import BPF
        self.b = BPF(text=TINY_SRC, cflags=["-w"])
        self.pass_fd = self.b.load_func(b"xgb_pass", BPF.XDP).fd
        self.drop_fd = self.b.load_func(b"xgb_drop", BPF.XDP).fd
        self.count_drop_fd = self.b.load_func(b"xgb_count_drop", BPF.XDP).fd
        self.read_drop_fd = self.b.load_func(b"xgb_read_drop", BPF.XDP).fd

    def seen(self) -> int:
        t = self.b[b"xgb_seen"]
        return sum(int(v) for v in t[t.Key(0)])

    def close(self) -> None:
        self.b.cleanup()


# ---------------------------------------------------------------- xdp-filter

XDPF_MAP_FLAG_SRC = 1


def _pdeathsig():
    # Runs in the child before exec: die with the benchmark.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _xdpfilt_id(status: str) -> int | None:
    """The id of xdp-filter's program in `xdp-loader status` output: on
    the interface's line, or on a dispatcher's component line (" => prio
    name id tag actions")."""
    for line in status.splitlines():
        words = line.split()
        names = [i for i, w in enumerate(words) if w.startswith("xdpfilt_")]
        if names:
            ids = [w for w in words[names[0] + 1:] if w.isdigit()]
            if ids:
                return int(ids[0])
    return None


class XdpFilter:
    """xdp-filter loaded on a bench veth (inside its namespace), unloaded on exit.

    xdp-filter pins its maps in <bpffs>/xdp-filter, shared by every
    interface it is loaded on, and other users of this machine load and
    unload it too. So it runs in a private mount namespace (held by a
    `sleep` we start and stop) with a bpffs of its own mounted there:
    nothing of theirs is touched, nothing of theirs touches ours. We reach
    its maps through the program's own map ids, not through pins.
    """

    def __init__(self, ns: str, ifname: str, mode: str = "native", policy: str = "allow"):
        assert ns.startswith(PREFIX), ns
        self.ns, self.ifname, self.mode, self.policy = ns, ifname, mode, policy
        self.loaded = False
        self.holder = None
        self.prog_fd = self.maps_fd = None

    def _run(self, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", f"--net=/run/netns/{self.ns}",
                    *args], check=check, **kw)

    def __enter__(self) -> "XdpFilter":
        import shutil
        for tool in ("xdp-filter", "unshare", "nsenter"):
            if not shutil.which(tool):
                raise Skip(f"{tool} not installed")
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
                                       preexec_fn=_pdeathsig)
        try:
            for _ in range(100):        # until unshare has exec'd sleep in the new namespace
                try:
                    if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt") \
                            and Path(f"/proc/{self.holder.pid}/comm").read_text().strip() == "sleep":
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            else:
                raise RuntimeError("unshare --mount did not start")
            run(["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])
            mode = {"native": "native", "generic": "skb", "skb": "skb"}[self.mode]
            self._run(["xdp-filter", "load", self.ifname, "--mode", mode, "--policy", self.policy])
            self.loaded = True
            with in_netns(self.ns):
                ifindex = socket.if_nametoindex(self.ifname)
                self.prog_id = bpfsys.xdp_query(ifindex)["prog_id"]
            if not self.prog_id:
                raise RuntimeError("xdp-filter loaded, but no XDP program on the interface")
            self.prog_fd = bpfsys.prog_get_fd_by_id(self.prog_id)
            self.prog_name = bpfsys.prog_info(self.prog_fd)["name"]
            # Where libxdp's dispatcher works (Debian 12's 6.1), the program
            # on the interface (test-run as operators run it) is the
            # dispatcher, and xdp-filter's maps are its component's (an
            # freplace program, which has no test run); where it does not
            # (the 6.18 here), libxdp attaches xdp-filter's program itself.
            own = _xdpfilt_id(self._run(["xdp-loader", "status", self.ifname]).stdout)
            self.maps_fd = bpfsys.prog_get_fd_by_id(own) if own and own != self.prog_id else None
        except BaseException:
            self.close()
            raise
        return self

    def _map_fd(self, name: str) -> int:
        for mid in bpfsys.prog_info(self.maps_fd or self.prog_fd)["map_ids"]:
            fd = bpfsys.map_get_fd_by_id(mid)
            if bpfsys.map_info(fd)["name"] == name:
                return fd
            os.close(fd)
        raise RuntimeError(f"xdp-filter program has no map {name}")

    def add_src(self, addrs: list[str], via_cli: int = 10) -> None:
        """Filter source addresses: the first via_cli with `xdp-filter ip`,
        the rest written straight into its map (the value the CLI writes:
        MAP_FLAG_SRC on every CPU), since one process per address would take
        minutes for 10,000."""
        for a in addrs[:via_cli]:
            self._run(["xdp-filter", "ip", a, "--mode", "src"])
        rest4 = [a for a in addrs[via_cli:] if ":" not in a]
        rest6 = [a for a in addrs[via_cli:] if ":" in a]
        for name, fam, items in (("filter_ipv4", socket.AF_INET, rest4), ("filter_ipv6", socket.AF_INET6, rest6)):
            if not items:
                continue
            fd = self._map_fd(name)
            try:
                keys = b"".join(socket.inet_pton(fam, a) for a in items)
                one = XDPF_MAP_FLAG_SRC.to_bytes(8, "little")
                vals = one * bpfsys.num_possible_cpus() * len(items)
                bpfsys.map_update_batch(fd, keys, vals, len(items))
            finally:
                os.close(fd)

    def count(self, family: int = 4) -> int:
        fd = self._map_fd("filter_ipv4" if family == 4 else "filter_ipv6")
        try:
            return sum(1 for _ in bpfsys.map_keys(fd, 4 if family == 4 else 16))
        finally:
            os.close(fd)

    def action_counts(self) -> dict[str, int]:
        """xdp_stats_map: packets per XDP action, summed over CPUs."""
        fd = self._map_fd("xdp_stats_map")
        out = {}
        try:
            for act, name in enumerate(("aborted", "drop", "pass", "tx", "redirect")):
                raw = bpfsys.map_lookup(fd, act.to_bytes(4, "little"), bpfsys.percpu_value_size(16))
                out[name] = sum(int.from_bytes(v[:8], "little") for v in bpfsys.percpu_split(raw, 16)) if raw else 0
        finally:
            os.close(fd)
        return out

    def close(self) -> None:
        for fd in (self.prog_fd, self.maps_fd):
            if fd is not None:
                os.close(fd)
        self.prog_fd = self.maps_fd = None
        if self.loaded:
            r = self._run(["xdp-filter", "unload", self.ifname], check=False)
            if r.returncode != 0:
                log(f"xdp-filter unload {self.ifname}: {r.stderr.strip()} (the veth goes with its namespace)")
            self.loaded = False
        if self.holder is not None:
            # Our own `sleep`: its mount namespace and private bpffs go with it.
            self.holder.kill()
            self.holder.wait()
            self.holder = None

    def __exit__(self, *exc) -> None:
        self.close()


def git_rev() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def git_dirty() -> list[str]:
    """Uncommitted changes to what is measured (bpf/, xdpguard/) at the start."""
    r = subprocess.run(["git", "-C", str(REPO), "status", "--short", "--", "bpf", "xdpguard"],
                       capture_output=True, text=True)
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]


def dump_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.rename(path)
