"""Section 4: the control plane, through the real CLI (one process per call).

* first apply: `xdpguard apply` of policy b on a bench veth (compile + load
  + verify + fill + attach + pin), wall time of the process;
* re-apply of a changed policy of the same shape (in place: new generation,
  one flip, no reload), for b, 100k and 1M prefixes;
* apply of 100k prefixes after b, then of 1M after 100k: in place when
  the running program's shape takes the policy, else a new program (the
  "how" column says which);
* `xdpguard stats --json`: median of 10 processes;
* map memory per policy size: memlock of every map of the program (fdinfo);
* compile of 100k prefixes + 1000 rules in pure Python (policy load and
  compile_policy), with peak RSS, in a fresh interpreter.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from bench import policies
from bench.common import REPO, Lab, log, median, print_table, prog_maps_memlock
from xdpguard import bpfsys, loader, pins

_TOOK = re.compile(r" in ([0-9.]+)s")


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "xdpguard"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "xdpguard.cli"]


def _xg(args: list[str], timeout: float = 300) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(_cli() + args, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"xdpguard {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return dt, r


def _apply(lab: Lab, path: Path) -> dict:
    dt, r = _xg(["apply", str(path), "--iface", lab.b, "--netns", lab.ns_b, "--mode", "native"])
    out = r.stdout.strip().splitlines()
    # The loader's "applied ..." line, not the change summary printed after it.
    line = next((ln for ln in reversed(out) if ": policy '" in ln), out[-1] if out else "")
    m = _TOOK.search(line)
    return {"cli_s": dt, "loader_s": float(m.group(1)) if m else None,
            "in_place": "in place" in line, "message": line}


def _memory(lab: Lab) -> dict:
    d = pins.iface_dir(lab.ns_b, lab.b)
    fd = bpfsys.obj_get(str(d / "prog"))
    try:
        maps = prog_maps_memlock(fd)
    finally:
        bpfsys.close_fd(fd)
    return {"total": sum(maps.values()), "maps": maps}


def _py_compile(path: Path, trace: bool) -> dict:
    """Load + compile a policy in a fresh interpreter; peak RSS from getrusage."""
    # Peak RSS from VmHWM (this process image only: getrusage's ru_maxrss
    # keeps the parent's high-water mark across fork + exec).
    code = f"""
import json, sys, time
def hwm():
    for ln in open("/proc/self/status"):
        if ln.startswith(("VmHWM:", "VmRSS:")):
            yield ln.split()[0].rstrip(":"), int(ln.split()[1])
sys.path.insert(0, {str(REPO)!r})
from xdpguard.policy import load
from xdpguard.compiler import compile_policy
trace = {trace!r}
if trace:
    import tracemalloc
    tracemalloc.start()
rss0 = dict(hwm())["VmRSS"]
t0 = time.perf_counter()
p = load({str(path)!r})
t1 = time.perf_counter()
t = compile_policy(p)
t2 = time.perf_counter()
out = {{"load_s": t1 - t0, "compile_s": t2 - t1, "rules": len(p.rules),
        "lpm4_entries": len(t.lpm[4]), "rss_start_kb": rss0,
        "rss_peak_kb": dict(hwm())["VmHWM"]}}
if trace:
    out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"compile subprocess failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _churned(path: Path, every: int = 100) -> Path:
    """The policy at `path` with one prefix in `every` of its blocklist set
    replaced by another address (a blocklist refresh): a re-apply that
    must re-read the set and rebuild the source table."""
    text = path.read_text()
    setname = re.search(r'bl = \{ file = "([^"]+)" \}', text).group(1)
    lines = (path.parent / setname).read_text().split()
    for i in range(0, len(lines), every):
        lines[i] = f"100.{64 + (i >> 16) % 64}.{(i >> 8) & 255}.{i & 255}"
    new = path.parent / ("churn-" + setname)
    new.write_text("\n".join(lines) + "\n")
    out = path.with_name("churn-" + path.name)
    out.write_text(text.replace(f'"{setname}"', f'"{new.name}"').replace('name = "bench-', 'name = "churn-', 1))
    return out


def run(ctx) -> dict:
    quick = ctx.quick
    mat, wd = ctx.material, ctx.workdir
    res: dict = {"memory": {}}
    pb0, nb = policies.write_policy(mat, "b", wd, variant=0)
    pb1, _ = policies.write_policy(mat, "b", wd, variant=1)
    pc0, nc = policies.write_policy(mat, "c", wd, variant=0)
    pc1, _ = policies.write_policy(mat, "c", wd, variant=1)
    big = None if quick else 1_000_000
    if big:
        pd0, nd = policies.write_policy(mat, "d", wd, nprefixes=big, variant=0)
        pd1, _ = policies.write_policy(mat, "d", wd, nprefixes=big, variant=1)

    with Lab(split=False, tag="c") as lab:
        applied = False
        try:
            log("control: first apply (policy b)")
            r = _apply(lab, pb0)
            applied = True
            r["prefixes"] = nb
            r["detail"] = f"CLI process {r['cli_s']:.2f}s, loader {r['loader_s']}s"
            res["first_apply"] = r
            res["memory"]["b"] = dict(_memory(lab), prefixes=nb)
            r = _apply(lab, pb1)
            r["prefixes"] = nb
            res["reapply_b"] = r

            log("control: stats latency")
            times = []
            for _ in range(10):
                dt, out = _xg(["stats", "--iface", lab.b, "--netns", lab.ns_b, "--json"])
                json.loads(out.stdout.splitlines()[0])
                times.append(dt)
            res["stats"] = {"median_s": median(times), "runs_s": times}

            log("control: apply 100k prefixes")
            r = _apply(lab, pc0)
            r["prefixes"] = nc
            res["apply_100k"] = r
            res["memory"]["c"] = dict(_memory(lab), prefixes=nc)
            for key, path in (("reapply_100k", pc1), ("reapply_100k_set", _churned(pc0))):
                r = _apply(lab, path)
                r["prefixes"] = nc
                r["detail"] = (f"CLI process {r['cli_s']:.2f}s, loader in place {r['loader_s']}s"
                               if r["in_place"] else "NOT in place: " + r["message"])
                res[key] = r

            if big:
                log("control: apply 1M prefixes")
                r = _apply(lab, pd0)
                r["prefixes"] = nd
                res["apply_1m"] = r
                res["memory"]["d"] = dict(_memory(lab), prefixes=nd)
                r = _apply(lab, pd1)
                r["prefixes"] = nd
                res["reapply_1m"] = r
        finally:
            if applied:
                try:
                    _xg(["detach", "--iface", lab.b, "--netns", lab.ns_b])
                except Exception as e:  # noqa: BLE001
                    log(f"control: detach: {e}")
                    try:
                        loader.detach(lab.b, netns=lab.ns_b, log=lambda m: None)
                    except Exception as e2:  # noqa: BLE001
                        log(f"control: loader.detach: {e2}")

    log("control: pure-Python compile of 100k prefixes + 1000 rules")
    res["py_compile_100k"] = _py_compile(pc0, trace=False)
    if not quick:
        res["py_compile_100k"]["tracemalloc_peak_bytes"] = _py_compile(pc0, trace=True)["tracemalloc_peak_bytes"]

    # ---- tables
    rows = []
    for key, label in (("first_apply", "first apply, b (6k prefixes, 100 rules)"),
                       ("reapply_b", "re-apply changed b"),
                       ("apply_100k", "apply 100k prefixes + 1000 rules, after b"),
                       ("reapply_100k", "re-apply 100k, rules changed"),
                       ("reapply_100k_set", "re-apply 100k, 1 % of the set changed"),
                       ("apply_1m", "apply 1M prefixes + 1000 rules, after 100k"),
                       ("reapply_1m", "re-apply changed 1M")):
        r = res.get(key)
        if r:
            rows.append([label, f"{r['cli_s']:.2f}", "-" if r["loader_s"] is None else f"{r['loader_s']:.2f}",
                         "in place" if r["in_place"] else "load+attach"])
    st = res["stats"]
    rows.append(["xdpguard stats --json (median of 10)", f"{st['median_s']:.3f}", "-", ""])
    pc = res["py_compile_100k"]
    rows.append(["policy load, 100k + 1000 rules (Python)", f"{pc['load_s']:.2f}", "-", ""])
    rows.append(["compile_policy, 100k + 1000 rules (Python)", f"{pc['compile_s']:.2f}", "-",
                 f"peak RSS {pc['rss_peak_kb'] / 1024:.0f} MiB (at start {pc['rss_start_kb'] / 1024:.0f})"])
    print_table("control plane (seconds; CLI = whole process, loader = its own timing)",
                ["operation", "CLI s", "loader s", "how"], rows)

    mrows = []
    for key, m in res["memory"].items():
        top = sorted(m["maps"].items(), key=lambda kv: -kv[1])[:4]
        mrows.append([key, f"{m['prefixes']:,}", f"{m['total'] / 2**20:.1f}",
                      ", ".join(f"{n} {v / 2**20:.1f}" for n, v in top)])
    print_table("map memory (memlock, MiB) per policy size", ["policy", "v4 prefixes", "total", "largest maps"], mrows)
    return res
