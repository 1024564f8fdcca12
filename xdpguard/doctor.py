"""`xdpguard doctor`: can this machine run xdpguard, and what fixes it.

Every check does what xdpguard itself does, through the same code, and
looks at what the running kernel actually does (creates the map, loads the
program, runs it), never at its version number: bcc compiles the real
program (bpf/xdpguard.c, loader.compile_program), the kernel loads it, a
sample policy is written into it as `apply` writes one (loader.write_gen,
with the classifier tries of loader._put_trie), BPF_PROG_TEST_RUN checks
its verdicts, and it is attached in generic mode to the loopback of a
network namespace made for the test. Each check has a status:

    ok    present and usable
    warn  works, with a limitation worth knowing (or not testable here)
    fail  something xdpguard needs is missing: exit status 1

Beside the checks, a table of the kernel features xdpguard uses: whether
this kernel has each, what it is used for, what xdpguard does without it.

Interfaces are touched only when named with --iface: the native-XDP check
loads a trivial XDP_PASS program ("xdpguard_doctor") and attaches it in
native mode with XDP_FLAGS_UPDATE_IF_NOEXIST (never replacing anything),
then detaches exactly that program again. Some NIC drivers reconfigure
their rings when an XDP program is attached or removed, which can
interrupt traffic for a moment: do not run it on a busy uplink casually.
"""
from __future__ import annotations

import errno
import mmap
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from xdpguard.bpfsys import XDP_DROP, XDP_PASS
from xdpguard.probes import collector, detect
from xdpguard.probes.collector import KPROBE_PROGS, TRACEPOINT_PROGS

OK, WARN, FAIL = "ok", "warn", "fail"

BPFFS = "/sys/fs/bpf"
JIT_SYSCTL = "/proc/sys/net/core/bpf_jit_enable"
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
# Where scripts/setup.sh records the headers it verified bcc compiles with.
SETUP_RECORD = ".xdpguard-headers"

# Name of the trivial program, so that a left-over attachment (the doctor
# killed between attach and detach) is recognisable: 15 characters max.
TEST_PROG = "xdpguard_doctor"
TEST_PROG_SRC = "int %s(struct xdp_md *ctx) { return XDP_PASS; }\n" % TEST_PROG

BCC_FIX = ("apt-get install -y python3-bpfcc; use a venv made with "
           "'python3 -m venv --system-site-packages .venv' so that it sees Debian's bcc")

# Written into the real program as apply writes a policy.
SAMPLE_POLICY = Path(__file__).with_name("doctor_sample.toml")
# (source, destination, what the sample policy makes of a UDP frame)
SAMPLE_VERDICTS = (
    ("192.0.2.1", "198.51.100.1", XDP_DROP),
    ("198.51.100.200", "192.0.2.1", XDP_DROP),
    ("198.51.100.1", "192.0.2.1", XDP_PASS),
    ("10.0.0.1", "203.0.113.5", XDP_DROP),
    ("2001:db8:1::1", "2001:db8:ff::1", XDP_DROP),
    ("2001:db8:ff::1", "2001:db8:1::1", XDP_PASS),
)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Feature:
    """A kernel feature xdpguard uses; the checks find whether it is here."""
    name: str
    used_for: str
    without: str


_NO_LOAD = "the XDP program does not load: xdpguard cannot run"
_COUNTER = {"syns": "SYNs reaching listeners", "handshakes": "completed handshakes",
            "synack_retrans": "SYN-ACK retransmissions", "rst_sent": "resets sent",
            "rst_recv": "resets received"}


def _tp_feature(p: collector.Prog) -> str:
    return f"{'raw_' if p.kind == 'raw_tracepoint' else ''}tracepoint {p.target}"


FEATURES: tuple[Feature, ...] = (
    Feature("bpf_syscall", "every map and program", "nothing: xdpguard cannot run"),
    Feature("bpf_jit", "the XDP program as machine code", "the interpreter runs it, several times slower"),
    Feature("btf_vmlinux", "struct offsets of the TCP probes (watch, top)",
            "offsets from the kernel headers: wrong counts if they are another kernel's"),
    Feature("bpffs", "pins: program and maps outlive the command", "apply cannot pin: xdpguard cannot run"),
    Feature("lpm_trie", "classifier tries, ban maps", _NO_LOAD),
    Feature("array_of_tries", "one classifier trie per generation, sized for its policy",
            "apply fails (its tries differ in size from the template)"),
    Feature("percpu_array", "per-rule counters, fast lane memory", _NO_LOAD),
    Feature("lru_hash", "per-source rate-limit buckets", _NO_LOAD),
    Feature("lru_percpu_hash", "per-source statistics (top, watch), TCP probe counts", _NO_LOAD),
    Feature("mmapable_array", "the source table (srctab), written through mmap", _NO_LOAD),
    Feature("ringbuf", "sampled drops (xdpguard log)", _NO_LOAD),
    Feature("map_batch", "writing a generation's arrays", "apply fails"),
    Feature("xdp_replace", "atomic program swap (reload, rollback)", "apply over a running program fails"),
    Feature("prog_test_run", "xdpguard test, the benchmark", "xdpguard test cannot run; filtering is not affected"),
    Feature("xdp_live_frames", "the benchmark's flood generator",
            "the benchmark floods through AF_PACKET instead; xdpguard is not affected"),
    Feature("native_xdp", "apply --mode native (auto tries it first)",
            "generic mode: works, slower (after the skb is made)"),
    Feature("syncookies", "SYN cookies at XDP (syncookies = true)",
            "check and apply refuse syncookies; nftables' SYNPROXY alone can answer SYNs"),
    Feature("kprobes", "the TCP probes' kprobe set (preferred)", "the tracepoint set is used"),
    *(Feature(_tp_feature(p),
              f"{_COUNTER[p.counter]} (tracepoint set)",
              "no tracepoint set: without kprobes, no TCP statistics, no automatic bans" if p.required
              else f"the tracepoint set counts no {_COUNTER[p.counter]}")
      for p in TRACEPOINT_PROGS),
    Feature("memcg_accounting", "BPF memory charged to the memory cgroup",
            "RLIMIT_MEMLOCK must cover the maps (ulimit -l)"),
)
_FEATURE_NAMES = frozenset(f.name for f in FEATURES)


@dataclass
class Context:
    """What one check leaves for a later one."""
    iface: str | None = None
    netns: str | None = None
    bpf_ok: bool = False
    found: dict = field(default_factory=dict)    # feature name -> (available, detail)
    modules: list = field(default_factory=list)  # bcc.BPF objects to clean up
    sample: tuple | None = None                  # (tables, shape, slots, plan) of SAMPLE_POLICY
    maps: dict | None = None                     # the real program's maps
    prog_fd: int | None = None                   # the real program
    filled: bool = False                         # the sample policy is in it

    def feature(self, name: str, available: bool | None, detail: str = "") -> None:
        assert name in _FEATURE_NAMES, name
        self.found[name] = (available, detail)


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


def _sample(ctx: Context) -> tuple:
    """The sample policy's tables, the shape apply would give them, its
    rule slots and its source tables (plan.build)."""
    if ctx.sample is None:
        from xdpguard import loader, plan, policy
        from xdpguard.compiler import compile_policy
        tables = compile_policy(policy.load(SAMPLE_POLICY))
        shape = loader.Shape.for_tables(tables)
        slots, _ = loader.assign_slots(tables, None)
        ctx.sample = (tables, shape, slots, plan.build(tables, shape.dir_nodes, slots))
    return ctx.sample


def _bcc_version() -> str:
    import bcc
    return getattr(bcc, "__version__", "?")


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
        ctx.feature("bpf_syscall", False, _err(e))
        return [Check("bpf_syscall", FAIL, f"cannot create a BPF map: {_err(e)}", fix)]
    os.close(fd)
    ctx.bpf_ok = True
    ctx.feature("bpf_syscall", True)
    return [Check("bpf_syscall", OK, "bpf(2) works: created and freed a map")]


def check_jit(ctx: Context) -> list[Check]:
    v = _read(JIT_SYSCTL)
    if v is None:
        ctx.feature("bpf_jit", False, f"no {JIT_SYSCTL}")
        return [Check("bpf_jit", WARN,
                      f"{JIT_SYSCTL} missing: no BPF JIT in this kernel, programs are interpreted (much slower)",
                      "a kernel built with CONFIG_BPF_JIT=y")]
    if v == "0":
        ctx.feature("bpf_jit", False, "disabled")
        return [Check("bpf_jit", WARN, "BPF JIT disabled: XDP programs run in the interpreter (much slower)",
                      "sysctl -w net.core.bpf_jit_enable=1")]
    what = "enabled" if v == "1" else f"enabled (mode {v}: with debug output)"
    ctx.feature("bpf_jit", True, what)
    return [Check("bpf_jit", OK, f"JIT {what}")]


def check_btf(ctx: Context) -> list[Check]:
    from xdpguard.probes import btf
    fallback = ("the TCP probes (watch, top) take struct offsets from the kernel headers instead, "
                "right only if they are the running kernel's; access control and rate limits are not affected")
    if not os.path.exists(VMLINUX_BTF):
        ctx.feature("btf_vmlinux", False, f"no {VMLINUX_BTF}")
        return [Check("btf", WARN, f"{VMLINUX_BTF} missing: {fallback}",
                      "a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    try:
        n = len(btf.probe_offset_cflags())     # what the probe collector compiles with
    except (OSError, btf.BTFError) as e:
        ctx.feature("btf_vmlinux", False, _err(e))
        return [Check("btf", WARN, f"{VMLINUX_BTF} unusable ({_err(e)}): the TCP probes cannot start; "
                      "access control and rate limits are not affected", None)]
    ctx.feature("btf_vmlinux", True, f"{n} struct offsets")
    return [Check("btf", OK, f"{VMLINUX_BTF}: the TCP probes take {n} struct offsets from it")]


def _fs_supported(fstype: str) -> bool:
    text = _read("/proc/filesystems") or ""
    return any(line.split()[-1] == fstype for line in text.splitlines() if line.split())


def check_bpffs(ctx: Context) -> list[Check]:
    fix = f"mount -t bpf bpf {BPFFS}"
    if os.path.ismount(BPFFS):
        ctx.feature("bpffs", True, f"mounted at {BPFFS}")
        return [Check("bpffs", OK, f"bpffs mounted at {BPFFS} (pins live in {BPFFS}/xdpguard)")]
    if not _fs_supported("bpf"):
        ctx.feature("bpffs", False, "no bpf filesystem")
        return [Check("bpffs", FAIL, "this kernel has no bpf filesystem: applied policies cannot be pinned",
                      "a kernel built with CONFIG_BPF_SYSCALL=y")]
    ctx.feature("bpffs", True, "not mounted")
    return [Check("bpffs", WARN,
                  f"bpffs is not mounted at {BPFFS}; 'xdpguard apply' mounts it itself, but mount it at "
                  "boot so that other tools see the pins", fix)]


# ---------------------------------------------------------------- compiler side

def headers_used() -> dict:
    """Which kernel headers bcc compiles with: /lib/modules/$(uname -r)/build,
    the directory it resolves to (None if missing) and the kernel release
    those headers are of (None if unknown)."""
    rel = platform.release()
    build = f"/lib/modules/{rel}/build"
    target = os.path.realpath(build) if os.path.exists(build) else None
    version = None
    if target:
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"',
                      _read(os.path.join(target, "include/generated/utsrelease.h")) or "")
        version = m.group(1) if m else _read(os.path.join(target, "include/config/kernel.release"))
    record = (_read(os.path.join(f"/lib/modules/{rel}", SETUP_RECORD)) or "").split()
    return {"release": rel, "build": build, "target": target, "version": version,
            "verified": bool(target) and record[:1] == [target]}


def _headers_text(h: dict) -> str:
    if not h["target"]:
        return f"{h['build']} ({'a dangling link' if os.path.islink(h['build']) else 'missing'})"
    return f"{h['target']} (headers of {h['version'] or 'an unknown kernel version'})"


def _setup_fix() -> str:
    from xdpguard import layout
    script = layout.bpf_dir().parent / "scripts" / "setup.sh"
    where = str(script) if script.is_file() else "scripts/setup.sh of the xdpguard source tree"
    return (f"{where} (as root) points /lib/modules/$(uname -r)/build at the first installed headers "
            "that bcc compiles bpf/xdpguard.c with (the kernel's own, then Debian's "
            "linux-headers-*-amd64, newest first); if none does: apt-get install linux-headers-amd64 "
            "(or the headers of an older kernel), then run it again")


def check_headers(ctx: Context) -> list[Check]:
    h = headers_used()
    if not h["target"] or not os.path.isdir(os.path.join(h["target"], "include")):
        what = _headers_text(h) if not h["target"] else f"{h['target']} (no include/)"
        return [Check("headers", FAIL, f"{h['build']} -> {what}: bcc has no kernel headers to compile with",
                      _setup_fix())]
    detail = f"{h['build']} -> {_headers_text(h)}"
    if h["verified"]:
        detail += ", chosen by scripts/setup.sh"
    if h["version"] and h["version"] != h["release"]:
        detail += (f"; not the running kernel's ({h['release']}): bcc needs headers it can compile, "
                   "the TCP probes take struct offsets from BTF")
    return [Check("headers", OK, detail)]


def _compile_errors(text: str) -> str:
    errs = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    out = "; ".join(errs[:2]) + (f" (and {len(errs) - 2} more)" if len(errs) > 2 else "")
    return out[:500]


def check_bcc(ctx: Context) -> list[Check]:
    """bcc compiles the real program as apply does, and the kernel loads it."""
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
        where = f" from {sys.executable}" + (" (a venv: made with --system-site-packages?)" if venv else "")
        return [Check("bcc", FAIL, f"cannot import bcc{where}: {_err(e)}", BCC_FIX)]
    from xdpguard import layout, loader
    ver = _bcc_version()
    src = layout.bpf_dir() / "xdpguard.c"
    _tables, shape, _slots, _plan = _sample(ctx)
    msgs: list[str] = []
    try:
        with _stderr_to(msgs):
            b, fn = loader.compile_program(shape)
    except Exception as e:   # LoadError; bcc raises bare Exception for compile and verifier errors
        text = "".join(msgs)
        if "compile" in str(e).lower():
            h = headers_used()
            return [Check("bcc", FAIL, f"bcc {ver} cannot compile {src} with the kernel headers in "
                          f"{_headers_text(h)}: {_compile_errors(text) or _err(e)}", _setup_fix())]
        log = " | ".join(ln.strip() for ln in text.strip().splitlines()[-4:])[:500]
        return [Check("bcc", FAIL, f"bcc {ver} compiled {src}, but the kernel refused to load it: "
                      f"{_err(e)}{': ' + log if log else ''}",
                      "see the kernel features below for what this kernel lacks")]
    ctx.modules.append(b)
    ctx.prog_fd = fn.fd
    ctx.maps = loader.bcc_maps(b, shape.map_names())
    return [Check("bcc", OK, f"bcc {ver} compiled {src} (headers: {headers_used()['version'] or '?'}) "
                  "and the kernel loaded it")]


# ---------------------------------------------------------------- maps

def _probe_map(mtype: int, ks: int, vs: int, entries: int, flags: int = 0, then=None) -> str | None:
    """None when this kernel creates the map (and `then(fd)` works), else why not."""
    from xdpguard import bpfsys
    try:
        with bpfsys.closing_fd(bpfsys.map_create(mtype, "xg_doctor", ks, vs, entries, flags)) as fd:
            if then is not None:
                then(fd)
    except OSError as e:
        return _err(e)
    return None


def _mmap_write(fd: int) -> None:
    with mmap.mmap(fd, 2 * 1024, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        mm[1024:1028] = b"\1\2\3\4"


def _batch_write(fd: int) -> None:
    from xdpguard import bpfsys
    keys = b"".join(i.to_bytes(4, sys.byteorder) for i in range(4))
    bpfsys.map_update_batch(fd, keys, bytes(4 * 8), 4)


def check_maps(ctx: Context) -> list[Check]:
    """Each map type and flag of bpf/xdpguard.c, created the way it declares them."""
    from xdpguard import bpfsys as bs
    page = os.sysconf("SC_PAGE_SIZE")
    probes = {
        "lpm_trie": (bs.BPF_MAP_TYPE_LPM_TRIE, 8, 4, 16, bs.BPF_F_NO_PREALLOC),
        "percpu_array": (bs.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 4),
        "lru_hash": (bs.BPF_MAP_TYPE_LRU_HASH, 8, 8, 16),
        "lru_percpu_hash": (bs.BPF_MAP_TYPE_LRU_PERCPU_HASH, 8, 8, 16),
        "mmapable_array": (bs.BPF_MAP_TYPE_ARRAY, 4, 1024, 2, bs.BPF_F_MMAPABLE, _mmap_write),
        "ringbuf": (bs.BPF_MAP_TYPE_RINGBUF, 0, 0, page),
        "map_batch": (bs.BPF_MAP_TYPE_ARRAY, 4, 8, 4, 0, _batch_write),
    }
    missing = []
    for name, args in probes.items():
        why = _probe_map(*args)
        ctx.feature(name, why is None, why or "")
        if why:
            missing.append(f"{name} ({why})")
    if missing:
        return [Check("map_types", FAIL, f"this kernel lacks map types or flags the program uses: "
                      f"{', '.join(missing)}",
                      "a newer kernel (mmap-able arrays 5.5+, batch operations 5.6+, ring buffers 5.8+)")]
    return [Check("map_types", OK, f"every map type and flag the program uses can be created "
                  f"({', '.join(probes)})")]


def check_tries(ctx: Context) -> list[Check]:
    """Per-generation classifier tries of their own size put in the loaded
    program's arrays of tries by the loader's own function."""
    from xdpguard import bpfsys, loader
    if ctx.maps is None:
        ctx.feature("array_of_tries", None, "not tested: the program did not load")
        return [Check("map_of_tries", WARN, "not tested: the program did not load (see bcc)")]
    _tables, _shape, _slots, sources = _sample(ctx)
    sizes = {}
    try:
        for fam in (4, 6):
            entries = sources.trie[fam]
            for gen in (0, 1):
                loader._put_trie(ctx.maps, fam, gen, entries)
                fd = bpfsys.inner_map_fd(ctx.maps[f"lpm{fam}"].fd, gen)
                if fd is None:
                    raise OSError(errno.ENOENT, f"lpm{fam}[{gen}] is empty after the update")
                with bpfsys.closing_fd(fd):
                    sizes[fam] = bpfsys.map_info(fd)["max_entries"]
    except OSError as e:
        ctx.feature("array_of_tries", False, _err(e))
        return [Check("map_of_tries", FAIL, f"the loader cannot put a classifier trie in the program's "
                      f"array of tries: {_err(e)}",
                      "a kernel whose arrays of maps take inner tries of another size than the "
                      "template, with the template's BTF")]
    tmpl = ctx.maps["lpm4_inner"].max_entries
    what = f"tries of {sizes[4]} (IPv4) and {sizes[6]} (IPv6) entries, template {tmpl}"
    ctx.feature("array_of_tries", True, what)
    return [Check("map_of_tries", OK, f"the loader put per-generation classifier tries in the program's "
                  f"arrays of tries ({what})")]


def check_policy_write(ctx: Context) -> list[Check]:
    """The sample policy written into both generations, switched to each:
    apply's first fill, then an in-place re-apply."""
    from xdpguard import loader
    if ctx.maps is None:
        return [Check("policy_write", WARN, "not tested: the program did not load (see bcc)")]
    tables, shape, slots, sources = _sample(ctx)
    try:
        loader.zero_slots(ctx.maps, list(slots.values()))
        for gen in (0, 1):
            loader.write_gen(ctx.maps, tables, gen, shape, slots, sources)
            loader.set_active(ctx.maps, gen)
    except OSError as e:
        return [Check("policy_write", FAIL, f"writing a policy into the program failed: {_err(e)}",
                      "see the kernel features below for what this kernel lacks")]
    ctx.filled = True
    return [Check("policy_write", OK, f"a policy of {tables.nrules} rules was written into both "
                  "generations of the program and switched to, as apply and re-apply do")]


# ---------------------------------------------------------------- running the program

def _live_frames(ctx: Context) -> None:
    from xdpguard import bpfsys
    try:
        err = bpfsys.live_frames_refused()
    except OSError as e:
        ctx.feature("xdp_live_frames", None, f"not tested: {_err(e)}")
        return
    ctx.feature("xdp_live_frames", err is None, "" if err is None else f"refused: {errno.errorcode.get(err, err)}")


def check_test_run(ctx: Context) -> list[Check]:
    """The loaded program's verdicts on the sample policy (BPF_PROG_TEST_RUN,
    as `xdpguard test` runs it); and whether live frames run."""
    from xdpguard import bpfsys, packet
    _live_frames(ctx)
    if not ctx.filled:
        ctx.feature("prog_test_run", None, "not tested: no program with a policy")
        return [Check("test_run", WARN, "not tested: no program with a policy (see above)")]
    wrong = []
    try:
        for src, dst, want in SAMPLE_VERDICTS:
            got, _, _ = bpfsys.prog_test_run(ctx.prog_fd, packet.build(src, dst, "udp", dport=53),
                                             data_out_size=0)
            if got != want:
                wrong.append(f"{src} -> {dst}: {got} instead of {want}")
    except OSError as e:
        ctx.feature("prog_test_run", False, _err(e))
        return [Check("test_run", WARN, f"BPF_PROG_TEST_RUN refused ({_err(e)}): 'xdpguard test' cannot "
                      "run, and the program's verdicts could not be checked here", None)]
    ctx.feature("prog_test_run", True)
    if wrong:
        return [Check("test_run", FAIL, "the program misjudges the sample policy's frames on this kernel "
                      f"(XDP verdicts): {'; '.join(wrong)}",
                      "report it with this output: filtering would be wrong here")]
    return [Check("test_run", OK, f"the program dropped and passed {len(SAMPLE_VERDICTS)} frames as the "
                  "policy says (BPF_PROG_TEST_RUN: 'xdpguard test' works)")]


def check_xdp_generic(ctx: Context) -> list[Check]:
    """Attach the loaded program in generic mode and swap it atomically, as
    apply and a reload do, on the loopback of a namespace made for it."""
    from xdpguard import bpfsys, netns
    if not ctx.filled:
        ctx.feature("xdp_replace", None, "not tested: no program with a policy")
        return [Check("xdp_generic", WARN, "not tested: no program with a policy (see above)")]
    lo = 1   # the loopback is the first device of a new namespace
    step = ["attach"]

    def attach_swap_detach():
        # No clean-up on failure: the namespace, and what is attached in
        # it, goes when the call returns.
        bpfsys.xdp_attach(lo, ctx.prog_fd, bpfsys.XDP_FLAGS_SKB_MODE | bpfsys.XDP_FLAGS_UPDATE_IF_NOEXIST)
        step[0] = "swap"
        bpfsys.xdp_attach(lo, ctx.prog_fd, bpfsys.XDP_FLAGS_SKB_MODE, old_prog_fd=ctx.prog_fd)
        step[0] = "detach"
        bpfsys.xdp_detach(lo, bpfsys.XDP_FLAGS_SKB_MODE, old_prog_fd=ctx.prog_fd)

    try:
        netns.call_in_new_netns(attach_swap_detach)
    except (OSError, netns.NetnsError) as e:
        if step[0] == "swap":
            ctx.feature("xdp_replace", False, _err(e))
            return [Check("xdp_generic", FAIL, f"the program attaches, but cannot be swapped atomically "
                          f"(XDP_FLAGS_REPLACE): {_err(e)}; a reload and rollback would fail",
                          "a kernel with XDP_FLAGS_REPLACE (5.7+)")]
        ctx.feature("xdp_replace", True if step[0] == "detach" else None,
                    "" if step[0] == "detach" else "not tested: attach failed")
        return [Check("xdp_generic", FAIL, f"the program cannot be {step[0]}ed in generic mode "
                      f"(in a network namespace made for the test): {_err(e)}",
                      "the kernel's reason is in the detail: 'xdpguard apply' would fail the same way")]
    ctx.feature("xdp_replace", True)
    return [Check("xdp_generic", OK, "the program attached in generic mode and swapped atomically "
                  "(on the loopback of a network namespace made for the test)")]


# ---------------------------------------------------------------- probes

def check_probes(ctx: Context) -> list[Check]:
    kp = detect.kprobes_available()
    tp = detect.tracepoints_available()          # mounts tracefs when needed
    tfs = detect.tracefs_dir()
    out = []
    if kp:
        targets = sorted({p.target for p in KPROBE_PROGS})
        found = detect.function_ranges(targets)
        absent = [t for t in targets if t not in found]
        ctx.feature("kprobes", True, f"functions not found: {', '.join(absent)}" if absent else "")
        extra = f" (functions not in /proc/kallsyms: {', '.join(absent)})" if absent else ""
        out.append(Check("kprobes", OK, f"kprobes available: the kprobe set of TCP probes is used{extra}"))
    else:
        why = (f"no {detect.KPROBE_PMU} and no kprobe_events in tracefs (kernel built without "
               "CONFIG_KPROBES or CONFIG_KPROBE_EVENTS)")
        ctx.feature("kprobes", False, why)
        alt = "the tracepoint set is used instead" if tp else "and no tracepoints either (below)"
        out.append(Check("kprobes", WARN, f"kprobes unavailable: {why}; {alt}",
                         "none needed (optional: a kernel with CONFIG_KPROBES=y)" if tp
                         else "a kernel with CONFIG_KPROBES=y, or see tracepoints"))
    pmu = os.path.isdir(detect.TRACEPOINT_PMU)
    # What the collector itself would leave out of the tracepoint set here.
    skipped, unusable = {}, None if pmu else f"no {detect.TRACEPOINT_PMU}"
    if pmu:
        try:
            _, skipped = collector.build_cflags("tracepoint")
        except collector.ProbeError as e:
            unusable = str(e)
    raw = detect.raw_tracepoints_available()
    missing = []
    for p in TRACEPOINT_PROGS:
        key = "consume_skb" if p.kind == "raw_tracepoint" else p.target
        why = unusable or skipped.get(key) or ("" if raw or p.kind != "raw_tracepoint" else "no raw tracepoints")
        ctx.feature(_tp_feature(p), not why, why)
        if why:
            missing.append(p.target)
    if tp:
        used = "not used: kprobes are preferred" if kp else "used for the TCP probes"
        extra = f" (optional events missing: {', '.join(missing)})" if missing else ""
        out.append(Check("tracepoints", OK, f"sock:inet_sock_set_state available in {tfs}, {used}{extra}"))
    else:
        if not pmu:
            why, fix = f"no {detect.TRACEPOINT_PMU}", "a kernel with CONFIG_TRACEPOINTS=y and CONFIG_PERF_EVENTS=y"
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
        ctx.feature("memcg_accounting", None, "not tested: bpf(2) unusable")
        return [Check("memlock", WARN, f"{lim}; not tested (bpf(2) unusable)")]
    memcg = _memcg_accounting()
    ctx.feature("memcg_accounting", memcg, "" if memcg is not None else "could not tell")
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


def check_syncookies(ctx: Context) -> list[Check]:
    """The SYN cookie helpers, probed by loading a tiny program that calls
    them (what apply compiles in for syncookies = true)."""
    from xdpguard import syncookies
    if not ctx.bpf_ok:
        ctx.feature("syncookies", None, "not tested: no BPF")
        return []
    why = syncookies.unavailable()
    ctx.feature("syncookies", why is None, why or "")
    if why:
        return [Check("syncookies", WARN, f"syncookies = true cannot run here: {why}; check and apply "
                      "refuse such policies", "Linux 6.0 or newer")]
    return [Check("syncookies", OK, "the SYN cookie helpers load (syncookies = true can run here)")]


# ---------------------------------------------------------------- interface

def _ifindex(ctx: Context) -> int:
    from xdpguard.netns import in_netns
    with in_netns(ctx.netns):
        return socket.if_nametoindex(ctx.iface)


def _test_prog(ctx: Context) -> int:
    """fd of the trivial XDP_PASS program (raises on failure)."""
    from bcc import BPF
    msgs: list[str] = []
    with _stderr_to(msgs):
        b = BPF(text=TEST_PROG_SRC.encode())
    ctx.modules.append(b)
    return b.load_func(TEST_PROG.encode(), BPF.XDP).fd


def check_xdp_native(ctx: Context) -> list[Check]:
    """Attach a trivial program in native mode, only if nothing is attached."""
    from xdpguard import bpfsys
    from xdpguard.netns import in_netns
    iface = ctx.iface
    name = "xdp_native"
    try:
        prog_fd = _test_prog(ctx)
    except Exception as e:   # bcc raises bare Exception
        ctx.feature("native_xdp", None, "not tested: no test program")
        return [Check(name, FAIL, f"{iface}: not tested: bcc cannot load a trivial XDP program: {_err(e)}",
                      "see bcc")]
    ip = _netns_prefix(ctx.netns, "ip")
    with in_netns(ctx.netns):
        ifindex = socket.if_nametoindex(iface)
        q = bpfsys.xdp_query(ifindex)
        if q["drv_prog_id"]:
            ctx.feature("native_xdp", True, f"{iface}: a program is attached in native mode")
            return [Check(name, OK, f"{iface}: a program is attached in native mode: the driver supports it")]
        if q["prog_id"]:
            ctx.feature("native_xdp", None, f"{iface}: not tested: a {q['attach_mode']} program is attached")
            return [Check(name, WARN, f"{iface}: not tested: a program is attached in {q['attach_mode']} "
                          "mode (native and generic XDP cannot coexist on an interface)", None)]
        try:
            bpfsys.xdp_attach(ifindex, prog_fd, bpfsys.XDP_FLAGS_DRV_MODE | bpfsys.XDP_FLAGS_UPDATE_IF_NOEXIST)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.EBUSY):
                ctx.feature("native_xdp", None, f"{iface}: not tested")
                return [Check(name, WARN, f"{iface}: not tested: a program was attached meanwhile", None)]
            ctx.feature("native_xdp", False, f"{iface}: {_err(e)}")
            if e.errno in (errno.EOPNOTSUPP, bpfsys.ENOTSUPP):
                return [Check(name, WARN, f"{iface}: the driver has no native XDP: 'apply' falls back to "
                              "generic mode (works, but after the skb is allocated: much slower)",
                              "a NIC driver with native XDP, or accept generic mode (apply --mode generic)")]
            return [Check(name, WARN, f"{iface}: native attach refused: {_err(e)}",
                          "see the kernel's reason in the detail; apply --mode generic works without "
                          "driver support")]
        ctx.feature("native_xdp", True, iface)
        try:
            bpfsys.xdp_detach(ifindex, bpfsys.XDP_FLAGS_DRV_MODE, old_prog_fd=prog_fd)
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
    if record and record.prog_id == pid:
        pol = record.policy.name or "?"
        return [Check(name, OK, f"{iface}: xdpguard's program is attached (id {pid}, {q['attach_mode']} "
                      f"mode, policy '{pol}')")]
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
    ("headers", check_headers),
    ("bcc", check_bcc),
    ("map_types", check_maps),
    ("map_of_tries", check_tries),
    ("policy_write", check_policy_write),
    ("test_run", check_test_run),
    ("xdp_generic", check_xdp_generic),
    ("probes", check_probes),
    ("syncookies", check_syncookies),
    ("memlock", check_memlock),
]
IFACE_CHECKS = [
    ("xdp_native", check_xdp_native),
    ("xdp_foreign", check_foreign),
]


def run(iface: str | None = None, netns: str | None = None) -> tuple[list[Check], list[dict]]:
    """All checks (the interface ones only with an interface), and the
    kernel features they found, in FEATURES order."""
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
        for b in ctx.modules:
            b.cleanup()
    feats = []
    for f in FEATURES:
        available, detail = ctx.found.get(
            f.name, (None, "not tested: needs --iface" if f.name == "native_xdp" else "not tested"))
        feats.append({"name": f.name, "available": available, "used_for": f.used_for,
                      "without": f.without, "detail": detail})
    return out, feats


def report(checks: list[Check], features: list[dict]) -> dict:
    return {"checks": [asdict(c) for c in checks], "features": features,
            "ok": all(c.status != FAIL for c in checks)}


def cmd_doctor(args) -> int:
    from xdpguard.cliutil import CliError, check_names, emit_json, table
    iface, netns = args.iface, args.netns
    check_names(args)
    if netns and not iface:
        raise CliError("--netns needs --iface")
    if iface:
        # An interface that does not exist is a usage error, as for apply.
        try:
            _ifindex(Context(iface=iface, netns=None if netns in (None, "host") else netns))
        except OSError:
            where = f" in network namespace '{netns}'" if netns and netns != "host" else ""
            raise CliError(f"no interface '{iface}'{where}") from None
    checks, features = run(iface, netns)
    rep = report(checks, features)
    if args.json:
        emit_json(rep)
    else:
        rows = [[c.name, c.status.upper() if c.status != OK else c.status, c.detail] for c in checks]
        print(table(["check", "status", "detail"], rows, right=set()))
        here = {True: "yes", False: "NO", None: "?"}
        rows = [[f["name"], here[f["available"]], f["used_for"], f["without"]] for f in features]
        print("\nkernel features (?: not tested here)\n"
              + table(["feature", "here", "used for", "without it"], rows, right=set()))
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
