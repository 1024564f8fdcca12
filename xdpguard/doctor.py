"""`xdpguard doctor`: can this machine run xdpguard, and what fixes it.

Every check looks at what the running kernel actually does (creates the
map, loads the program, looks for the PMU), never at its version number.
Each check has a status:

    ok    present and usable
    warn  works, with a limitation worth knowing (or not testable here)
    fail  something xdpguard needs is missing: exit status 1

Interfaces are touched only when named with --iface: the native-XDP check
loads a trivial XDP_PASS program ("xdpguard_doctor") and attaches it in
native mode with XDP_FLAGS_UPDATE_IF_NOEXIST (never replacing anything),
then detaches exactly that program again. Some NIC drivers reconfigure
their rings when an XDP program is attached or removed, which can
interrupt traffic for a moment: do not run it on a busy uplink casually.
"""
from __future__ import annotations

import errno
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

OK, WARN, FAIL = "ok", "warn", "fail"

BPFFS = "/sys/fs/bpf"
JIT_SYSCTL = "/proc/sys/net/core/bpf_jit_enable"
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
TRACEPOINT_PMU = "/sys/bus/event_source/devices/tracepoint"

# Name of the trivial program, so that a left-over attachment (the doctor
# killed between attach and detach) is recognisable: 15 characters max.
TEST_PROG = "xdpguard_doctor"
TEST_PROG_SRC = "int %s(struct xdp_md *ctx) { return XDP_PASS; }\n" % TEST_PROG

HEADERS_FIX = (
    "apt-get install -y linux-headers-amd64 && "
    "ln -sfn $(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1) /lib/modules/$(uname -r)/build && "
    "ln -sfn $(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n1) /lib/modules/$(uname -r)/source"
    "   (what scripts/setup.sh does)"
)
BCC_FIX = ("apt-get install -y python3-bpfcc; use a venv made with "
           "'python3 -m venv --system-site-packages .venv' so that it sees Debian's bcc")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass
class Context:
    """What one check leaves for a later one."""
    iface: str | None = None
    netns: str | None = None
    bpf_ok: bool = False
    bcc_module: object = None           # a loaded bcc.BPF with the test program
    test_prog_fd: int | None = None


# ---------------------------------------------------------------- helpers

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _err(e: BaseException) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


@contextmanager
def _stderr_to(buf: list) -> Iterator[None]:
    """Capture file descriptor 2 (clang's and libbpf's own messages)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.append(tmp.read().decode(errors="replace"))


def _netns_prefix(netns: str | None, tool: str) -> str:
    """How to run an operator command inside the namespace."""
    if netns in (None, "host"):
        return ""
    if tool == "ip":
        return f"-n {netns} "
    # nsenter, not 'ip netns exec' (which remounts /sys and hides bpffs).
    return f"nsenter --net=/run/netns/{netns} "


# ---------------------------------------------------------------- BPF basics

def check_bpf_syscall(ctx: Context) -> list[Check]:
    from xdpguard import bpfsys
    try:
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, "xg_doctor", 4, 8, 1)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            fix = "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON)"
        elif e.errno == errno.ENOSYS:
            fix = "a kernel built with CONFIG_BPF_SYSCALL=y"
        elif e.errno == errno.ENOENT and "libbpf" in str(e):
            fix = "apt-get install -y libbpf1"
        else:
            fix = None
        return [Check("bpf_syscall", FAIL, f"cannot create a BPF map: {_err(e)}", fix)]
    os.close(fd)
    ctx.bpf_ok = True
    return [Check("bpf_syscall", OK, "bpf(2) works: created and freed a map")]


def check_jit(ctx: Context) -> list[Check]:
    v = _read(JIT_SYSCTL)
    if v is None:
        return [Check("bpf_jit", WARN,
                      f"{JIT_SYSCTL} missing: no BPF JIT in this kernel, programs are interpreted (much slower)",
                      "a kernel built with CONFIG_BPF_JIT=y")]
    if v == "0":
        return [Check("bpf_jit", WARN, "BPF JIT disabled: XDP programs run in the interpreter (much slower)",
                      "sysctl -w net.core.bpf_jit_enable=1")]
    what = "enabled" if v == "1" else f"enabled (mode {v}: with debug output)"
    return [Check("bpf_jit", OK, f"JIT {what}")]


def check_btf(ctx: Context) -> list[Check]:
    if os.path.exists(VMLINUX_BTF):
        return [Check("btf", OK, f"{VMLINUX_BTF} present (the TCP probes take struct offsets from it)")]
    return [Check("btf", WARN,
                  f"{VMLINUX_BTF} missing: the TCP probes (kernel statistics, automatic bans) cannot "
                  "start; access control and rate limits are not affected",
                  "a kernel built with CONFIG_DEBUG_INFO_BTF=y")]


def _fs_supported(fstype: str) -> bool:
    text = _read("/proc/filesystems") or ""
    return any(line.split()[-1] == fstype for line in text.splitlines() if line.split())


def check_bpffs(ctx: Context) -> list[Check]:
    fix = f"mount -t bpf bpf {BPFFS}"
    if os.path.ismount(BPFFS):
        return [Check("bpffs", OK, f"bpffs mounted at {BPFFS} (pins live in {BPFFS}/xdpguard)")]
    if not _fs_supported("bpf"):
        return [Check("bpffs", FAIL, "this kernel has no bpf filesystem: applied policies cannot be pinned",
                      "a kernel built with CONFIG_BPF_SYSCALL=y")]
    return [Check("bpffs", WARN,
                  f"bpffs is not mounted at {BPFFS}; 'xdpguard apply' mounts it itself, but mount it at "
                  "boot so that other tools see the pins", fix)]


# ---------------------------------------------------------------- compiler side

def check_headers(ctx: Context) -> list[Check]:
    rel = platform.release()
    build = f"/lib/modules/{rel}/build"
    if not os.path.exists(build):
        what = "a dangling link" if os.path.islink(build) else "missing"
        return [Check("kernel_headers", FAIL, f"{build} is {what}: bcc cannot compile", HEADERS_FIX)]
    if not os.path.isdir(os.path.join(build, "include")):
        return [Check("kernel_headers", FAIL, f"{build} has no include/: bcc cannot compile", HEADERS_FIX)]
    target = os.path.realpath(build)
    detail = f"{build} -> {target}"
    base = os.path.basename(target)
    if base.startswith("linux-headers-") and rel not in base:
        detail += (f" (headers of another kernel than {rel}: fine for bcc's XDP program; "
                   "the probes take struct offsets from BTF)")
    return [Check("kernel_headers", OK, detail)]


def check_bcc(ctx: Context) -> list[Check]:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
        where = f" from {sys.executable}" + (" (a venv: made with --system-site-packages?)" if venv else "")
        return [Check("bcc", FAIL, f"cannot import bcc{where}: {_err(e)}", BCC_FIX)]
    from bcc import BPF
    ver = getattr(bcc, "__version__", "?")
    msgs: list[str] = []
    try:
        with _stderr_to(msgs):
            b = BPF(text=TEST_PROG_SRC.encode())
            fn = b.load_func(TEST_PROG.encode(), BPF.XDP)
    except Exception as e:   # bcc raises bare Exception for compile and verifier errors
        out = " ".join(ln.strip() for ln in "".join(msgs).splitlines() if "error" in ln)[:300]
        return [Check("bcc", FAIL, f"bcc {ver} imports but cannot compile and load an XDP program: "
                      f"{_err(e)}{': ' + out if out else ''}",
                      "check kernel_headers; then: apt-get install --reinstall python3-bpfcc libbpfcc")]
    ctx.bcc_module, ctx.test_prog_fd = b, fn.fd
    return [Check("bcc", OK, f"bcc {ver}: compiled and loaded a trivial XDP program")]


def check_maps(ctx: Context) -> list[Check]:
    from xdpguard import bpfsys
    out = []
    specs = (("map_lpm_trie", bpfsys.BPF_MAP_TYPE_LPM_TRIE, "xg_doctor_lpm", 8, 4, bpfsys.BPF_F_NO_PREALLOC,
              "LPM trie (address classifier)"),
             ("map_lru_hash", bpfsys.BPF_MAP_TYPE_LRU_HASH, "xg_doctor_lru", 8, 8, 0,
              "LRU hash (per-source buckets, bans)"))
    for name, mtype, mname, ks, vs, flags, what in specs:
        try:
            fd = bpfsys.map_create(mtype, mname, ks, vs, 16, flags)
        except OSError as e:
            out.append(Check(name, FAIL, f"cannot create a {what} map: {_err(e)}",
                             "a kernel with CONFIG_BPF_SYSCALL=y (LPM tries since 4.11, LRU hashes since 4.10)"))
            continue
        os.close(fd)
        out.append(Check(name, OK, f"{what} maps can be created"))
    out.append(_check_trie_array())
    return out


def _check_trie_array() -> Check:
    """An array of LPM tries, with a trie of another size put in: how the
    classifier keeps one trie per generation (loader._put_trie)."""
    from xdpguard import bpfsys
    fds = []
    try:
        fds.append(bpfsys.map_create(bpfsys.BPF_MAP_TYPE_LPM_TRIE, "xg_doctor_tmpl", 8, 4, 1,
                                     bpfsys.BPF_F_NO_PREALLOC))
        fds.append(bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY_OF_MAPS, "xg_doctor_aom", 4, 4, 2,
                                     inner_map_fd=fds[0]))
        fds.append(bpfsys.map_create(bpfsys.BPF_MAP_TYPE_LPM_TRIE, "xg_doctor_lpm2", 8, 4, 64,
                                     bpfsys.BPF_F_NO_PREALLOC))
        bpfsys.map_update(fds[1], bytes(4), fds[2].to_bytes(4, sys.byteorder))
    except OSError as e:
        return Check("map_of_tries", FAIL, f"cannot make an array of LPM tries: {_err(e)}",
                     "a kernel with maps of maps (4.12+) that lets inner tries differ in size (5.10+)")
    finally:
        for fd in fds:
            os.close(fd)
    return Check("map_of_tries", OK, "arrays of LPM tries (one classifier trie per generation) work")


# ---------------------------------------------------------------- probes

def _detect():
    """xdpguard.probes.detect when it imports, else the minimal fallback below."""
    try:
        from xdpguard.probes import detect
        return detect.kprobes_available, detect.tracepoints_available, getattr(detect, "missing_tracepoints", None)
    except ImportError:
        return _kprobes_available, _tracepoints_available, None


def _tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def _kprobes_available() -> bool:
    if os.path.isdir(KPROBE_PMU):
        return True
    return any(os.path.exists(os.path.join(d, "kprobe_events")) for d in TRACEFS_DIRS)


def _tracepoints_available(mount: bool = True) -> bool:
    if not os.path.isdir(TRACEPOINT_PMU):
        return False
    if _tracefs() is None and mount and os.path.isdir(TRACEFS_DIRS[0]):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_DIRS[0]], capture_output=True)
    d = _tracefs()
    return d is not None and os.path.exists(os.path.join(d, "events/sock/inet_sock_set_state/format"))


def check_probes(ctx: Context) -> list[Check]:
    kp_fn, tp_fn, missing_fn = _detect()
    kp = bool(kp_fn())
    tp = bool(tp_fn())            # mounts tracefs when needed
    out = []
    if kp:
        out.append(Check("kprobes", OK, "kprobes available: the kprobe set of TCP probes is used"))
    else:
        why = (f"no {KPROBE_PMU} and no kprobe_events in tracefs (kernel built without CONFIG_KPROBES "
               "or CONFIG_KPROBE_EVENTS)")
        if tp:
            out.append(Check("kprobes", WARN, f"kprobes unavailable: {why}; the tracepoint set is used instead",
                             "none needed (optional: a kernel with CONFIG_KPROBES=y)"))
        else:
            out.append(Check("kprobes", WARN, f"kprobes unavailable: {why}",
                             "a kernel with CONFIG_KPROBES=y, or see tracepoints"))
    tfs = _tracefs()
    if tp:
        extra = ""
        if missing_fn is not None:
            missing = missing_fn()
            if missing:
                extra = f" (optional events missing: {', '.join(missing)})"
        used = "not used: kprobes are preferred" if kp else "used for the TCP probes"
        out.append(Check("tracepoints", OK, f"sock:inet_sock_set_state available in {tfs}, {used}{extra}"))
    else:
        if not os.path.isdir(TRACEPOINT_PMU):
            why, fix = f"no {TRACEPOINT_PMU}", "a kernel with CONFIG_TRACEPOINTS=y and CONFIG_PERF_EVENTS=y"
        elif tfs is None:
            why, fix = "tracefs is not mounted and could not be mounted", "mount -t tracefs tracefs /sys/kernel/tracing"
        else:
            why, fix = f"no sock:inet_sock_set_state in {tfs}/events", "a kernel >= 4.16 with CONFIG_TRACEPOINTS=y"
        if kp:
            out.append(Check("tracepoints", OK, f"tracepoints unavailable ({why}); not needed: kprobes are used"))
        else:
            out.append(Check("tracepoints", WARN,
                             f"tracepoints unavailable ({why}) and no kprobes: no kernel TCP statistics, "
                             "so no automatic bans; access control and rate limits work", fix))
    return out


# ---------------------------------------------------------------- memlock

# Run in a child: RLIMIT_MEMLOCK forced to 0 (soft and hard), then a raw
# BPF_MAP_CREATE (not through libbpf, which would raise the limit again).
# Success means the kernel charges BPF memory to the memory cgroup (5.11+)
# and ignores RLIMIT_MEMLOCK for BPF.
_MEMCG_PROBE = r"""
import ctypes, os, resource, sys
nr = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
libc = ctypes.CDLL(None, use_errno=True)
attr = (ctypes.c_uint32 * 32)()
attr[0], attr[1], attr[2], attr[3] = 2, 4, 8, 1     # ARRAY, key 4, value 8, 1 entry
fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(0), attr, ctypes.c_uint(ctypes.sizeof(attr)))
if fd >= 0:
    os.close(fd)
    sys.exit(0)
sys.exit(10 + ctypes.get_errno())
"""
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "i686": 357, "i386": 357, "armv7l": 386,
            "ppc64le": 361, "s390x": 351, "riscv64": 280}


def _memcg_accounting() -> bool | None:
    """True: BPF memory is charged to the cgroup; False: to RLIMIT_MEMLOCK;
    None: could not tell."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return None
    try:
        r = subprocess.run([sys.executable, "-c", _MEMCG_PROBE, str(nr)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode == 0:
        return True
    if r.returncode == 10 + errno.EPERM:
        return False
    return None


def _fmt_limit(v: int) -> str:
    if v == resource.RLIM_INFINITY:
        return "unlimited"
    return f"{v // 1024} KiB"


def check_memlock(ctx: Context) -> list[Check]:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    lim = f"RLIMIT_MEMLOCK {_fmt_limit(soft)} (hard {_fmt_limit(hard)})"
    if not ctx.bpf_ok:
        return [Check("memlock", WARN, f"{lim}; not tested (bpf(2) unusable)")]
    memcg = _memcg_accounting()
    if memcg:
        return [Check("memlock", OK,
                      f"{lim}: irrelevant here, this kernel charges BPF memory to the memory cgroup "
                      "(a map was created with the limit at 0); a cgroup memory limit (MemoryMax=) "
                      "would apply instead")]
    fix = "ulimit -l unlimited (systemd: LimitMEMLOCK=infinity)"
    if memcg is None:
        if soft == resource.RLIM_INFINITY:
            return [Check("memlock", OK, f"{lim}; could not tell how this kernel accounts BPF memory")]
        return [Check("memlock", WARN, f"{lim}; could not tell whether the kernel charges BPF memory to "
                      "this limit (kernels before 5.11 do)", fix)]
    if soft == resource.RLIM_INFINITY:
        return [Check("memlock", OK, f"{lim}: this kernel charges BPF memory to RLIMIT_MEMLOCK (no "
                      "memcg accounting, kernel < 5.11); unlimited is enough")]
    return [Check("memlock", WARN,
                  f"{lim}: this kernel charges BPF memory to RLIMIT_MEMLOCK (no memcg accounting, "
                  "kernel < 5.11); large policies can fail with EPERM (bcc raises the limit itself "
                  "when it may, xdpguard's own map calls do not)", fix)]


# ---------------------------------------------------------------- interface

def _ifindex(ctx: Context) -> int:
    from xdpguard.netns import in_netns
    with in_netns(ctx.netns):
        return socket.if_nametoindex(ctx.iface)




def check_xdp_native(ctx: Context) -> list[Check]:
    """Attach the trivial program in native mode, only if nothing is attached."""
    from xdpguard import bpfsys
    from xdpguard.netns import in_netns
    iface = ctx.iface
    name = "xdp_native"
    if ctx.test_prog_fd is None:
        return [Check(name, FAIL, f"{iface}: not tested: no test program (see bcc)", None)]
    ip = _netns_prefix(ctx.netns, "ip")
    with in_netns(ctx.netns):
        ifindex = socket.if_nametoindex(iface)
        q = bpfsys.xdp_query(ifindex)
        if q["drv_prog_id"]:
            return [Check(name, OK, f"{iface}: a program is attached in native mode: the driver supports it")]
        if q["prog_id"]:
            return [Check(name, WARN, f"{iface}: not tested: a program is attached in {q['attach_mode']} "
                          "mode (native and generic XDP cannot coexist on an interface)", None)]
        try:
            bpfsys.xdp_attach(ifindex, ctx.test_prog_fd,
                              bpfsys.XDP_FLAGS_DRV_MODE | bpfsys.XDP_FLAGS_UPDATE_IF_NOEXIST)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, bpfsys.ENOTSUPP):
                return [Check(name, WARN, f"{iface}: the driver has no native XDP: 'apply' falls back to "
                              "generic mode (works, but after the skb is allocated: much slower)",
                              "a NIC driver with native XDP, or accept generic mode (apply --mode generic)")]
            if e.errno in (errno.EEXIST, errno.EBUSY):
                return [Check(name, WARN, f"{iface}: not tested: a program was attached meanwhile", None)]
            return [Check(name, WARN, f"{iface}: native attach refused: {_err(e)}",
                          "see the kernel message above; apply --mode generic works without driver support")]
        try:
            bpfsys.xdp_detach(ifindex, bpfsys.XDP_FLAGS_DRV_MODE, old_prog_fd=ctx.test_prog_fd)
        except OSError as e:
            return [Check(name, FAIL, f"{iface}: native XDP works, but the test program could not be "
                          f"detached again: {_err(e)}", f"ip {ip}link set dev {iface} xdpdrv off")]
    return [Check(name, OK, f"{iface}: native (driver) XDP supported: attached and detached a test program")]


def check_foreign(ctx: Context) -> list[Check]:
    from xdpguard import bpfsys, pins
    from xdpguard.netns import in_netns
    iface, name = ctx.iface, "xdp_foreign"
    try:
        record = pins.read_record(pins.iface_dir(ctx.netns, iface))
        stale = None
    except (pins.PinError, OSError, ValueError) as e:
        record, stale = None, _err(e)
    with in_netns(ctx.netns):
        q = bpfsys.xdp_query(socket.if_nametoindex(iface))
    pid = q["prog_id"]
    if not pid:
        detail = f"{iface}: no XDP program attached"
        if record:
            detail += " (xdpguard pins are left without an attached program: see 'xdpguard status')"
        return [Check(name, OK, detail)]
    if record and record.get("prog_id") == pid:
        pol = (record.get("policy") or {}).get("name", "?")
        return [Check(name, OK, f"{iface}: xdpguard's program is attached (id {pid}, {q['attach_mode']} "
                      f"mode, policy '{pol}')")]
    from xdpguard import bpfsys
    pname = bpfsys.prog_name(pid)
    detail = (f"{iface}: a foreign XDP program is attached (id {pid}, '{pname}', {q['attach_mode']} mode); "
              "'xdpguard apply' refuses to replace it without --force")
    if stale:
        detail += f" (xdpguard pins here are unreadable: {stale})"
    if pname == "xdp_dispatcher":       # libxdp's multi-program dispatcher
        fix = f"{_netns_prefix(ctx.netns, 'nsenter')}xdp-loader unload {iface} --all"
    elif pname.startswith("xdpfilt_"):   # xdp-filter (xdp-tools)
        fix = f"{_netns_prefix(ctx.netns, 'nsenter')}xdp-filter unload {iface}"
    else:
        kind = {"generic": "xdpgeneric", "native": "xdpdrv", "offload": "xdpoffload"}.get(q["attach_mode"], "xdp")
        fix = f"ip {_netns_prefix(ctx.netns, 'ip')}link set dev {iface} {kind} off"
    fix += f"   (or: xdpguard apply POLICY --iface {iface}{' --netns ' + ctx.netns if ctx.netns else ''} --force)"
    return [Check(name, WARN, detail, fix)]


# ---------------------------------------------------------------- driver

CHECKS: list[tuple[str, Callable[[Context], list[Check]]]] = [
    ("bpf_syscall", check_bpf_syscall),
    ("bpf_jit", check_jit),
    ("btf", check_btf),
    ("bpffs", check_bpffs),
    ("kernel_headers", check_headers),
    ("bcc", check_bcc),
    ("maps", check_maps),
    ("probes", check_probes),
    ("memlock", check_memlock),
]
IFACE_CHECKS = [
    ("xdp_native", check_xdp_native),
    ("xdp_foreign", check_foreign),
]


def run_checks(iface: str | None = None, netns: str | None = None) -> list[Check]:
    """All checks; the interface ones only with an interface."""
    ctx = Context(iface=iface, netns=None if netns in (None, "host") else netns)
    out: list[Check] = []
    todo = CHECKS + (IFACE_CHECKS if iface else [])
    try:
        for name, fn in todo:
            try:
                out.extend(fn(ctx))
            except Exception as e:   # a broken check must not hide the others
                out.append(Check(name, FAIL, f"check failed: {type(e).__name__}: {_err(e)}"))
    finally:
        if ctx.bcc_module is not None:
            ctx.bcc_module.cleanup()
    return out


def report(checks: list[Check]) -> dict:
    return {"checks": [asdict(c) for c in checks], "ok": all(c.status != FAIL for c in checks)}


def cmd_doctor(args) -> int:
    from xdpguard.netns import NetnsError, check_name
    from xdpguard.output import emit_json, table
    iface, netns = getattr(args, "iface", None), getattr(args, "netns", None)
    try:
        if iface:
            check_name(iface, "iface")
        if netns:
            check_name(netns, "netns")
        if netns and not iface:
            raise ValueError("--netns needs --iface")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if iface:
        # An interface that does not exist is a usage error, as for apply.
        try:
            _ifindex(Context(iface=iface, netns=None if netns in (None, "host") else netns))
        except NetnsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError:
            where = f" in network namespace '{netns}'" if netns and netns != "host" else ""
            print(f"error: no interface '{iface}'{where}", file=sys.stderr)
            return 2
    checks = run_checks(iface, netns)
    rep = report(checks)
    if args.json:
        emit_json(rep)
    else:
        rows = [[c.name, c.status.upper() if c.status != OK else c.status, c.detail] for c in checks]
        print(table(["check", "status", "detail"], rows, right=set()))
        fixes = [c for c in checks if c.status != OK and c.fix]
        if fixes:
            print("\nto fix:")
            for c in fixes:
                print(f"  {c.name}: {c.fix}")
        bad = sum(c.status == FAIL for c in checks)
        warn = sum(c.status == WARN for c in checks)
        print("\n" + (f"{bad} check(s) failed: xdpguard cannot run here" if bad
                      else "xdpguard can run here" + (f" ({warn} warning(s))" if warn else "")))
    return 0 if rep["ok"] else 1
