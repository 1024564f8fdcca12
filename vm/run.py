#!/usr/bin/env python3
"""Run xdpguard's tests in Debian guests booted with QEMU (make vm-smoke,
make vm-test). Host side, stdlib only, as root.

    vm/run.py smoke                  Debian 12's 6.1: setup, doctor, demo,
                                     fixtures, e2e, the kprobe feedback loop
    vm/run.py test [--guest NAME]    the whole suite and the systemd
                                     lifecycle (with a reboot) on every guest
                                     of vm/guests.conf, or the named ones
    vm/run.py test --guest bookworm-6.1 --steps systemd
                                     only some steps (after setup): here the
                                     systemd lifecycle with its reboot

Each guest boots a throw-away overlay of its cached image (vm/image.sh), so
no run depends on another. The checkout (the files git knows, as they are
in the working tree) and the blocklists go in on a second disk with the
job (vm/job.py); results come back on it. KVM is used where it boots a
guest, TCG otherwise (decided at run time; XDPGUARD_VM_ACCEL=kvm|tcg
overrides). Writes vm/results/<guest>.json and .md, and prints the table.

Exit status: 0 all steps passed, 1 a step failed or a guest did not finish,
2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDPGUARD_VM_CACHE", "/var/cache/xdpguard-vm"))
BLOCKLISTS = Path(os.environ.get("XDPGUARD_BLOCKLISTS") or REPO.parent / "shared" / "data" / "blocklists")
PY = ".venv/bin/python -m pytest -q -p no:cacheprovider"

# Every step is a shell command run in the guest's /xdpguard, with a bound
# in seconds (under TCG the first bcc compile of a program takes ~1 min).
SETUP = [
    {"name": "setup", "run": "bash scripts/setup.sh", "timeout": 900, "stop_on_failure": True},
    {"name": "doctor", "run": "xdpguard doctor --json | tee /job/results/doctor.json", "timeout": 900},
]
SMOKE = SETUP + [
    {"name": "demo", "run": "make demo", "timeout": 1200},
    {"name": "fixtures", "run": f"{PY} tests/test_dataplane.py -k policy_table", "timeout": 900},
    {"name": "e2e", "run": f"{PY} tests/test_e2e.py -k 'counters_exact or detach_restores'",
     "timeout": 1200},
    {"name": "kprobe-loop", "run": f"{PY} tests/test_probe_set.py tests/test_probes.py "
     "tests/test_mitigation.py -k 'expected_set or e2e_ipv4 or floods_banned'", "timeout": 1800},
]
LIFECYCLE = "bash vm/systemd-lifecycle.sh"
TEST = SETUP + [
    # make test's own command, one line a test, so a guest that runs out of
    # time still shows how far the suite got and what failed on the way.
    {"name": "suite", "run": f"{PY} -v -rfE --durations=25 tests", "timeout": 10800},
    # start, reload and restart: three applies, minutes each under TCG
    {"name": "systemd", "run": f"{LIFECYCLE} before", "timeout": 2400},
    {"name": "reboot", "reboot": True},
    {"name": "systemd-after-reboot", "run": f"{LIFECYCLE} after", "timeout": 1800},
]
JOBS = {"smoke": (["bookworm-6.1"], SMOKE), "test": (None, TEST)}
# A step that only makes sense with the ones after it (the lifecycle's
# second half needs the reboot, the reboot needs the first half).
WITH = {"systemd": ("reboot", "systemd-after-reboot")}


def select(steps: list[dict], wanted: str | None) -> list[dict]:
    """The steps of a job named in `wanted` (comma-separated), in the job's
    order, after the job's first step (setup: the others depend on it)."""
    if not wanted:
        return steps
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    for n in list(names):
        names.update(WITH.get(n, ()))
    unknown = names - {s["name"] for s in steps}
    if unknown:
        raise ValueError(f"no step {', '.join(sorted(unknown))} in this job "
                         f"(its steps: {', '.join(s['name'] for s in steps)})")
    return [s for i, s in enumerate(steps) if i == 0 or s["name"] in names]

def with_tests(steps: list[dict], tests: str) -> list[dict]:
    """The steps with the suite step narrowed to `tests` (pytest arguments).
    The guest runs steps through a shell, so only plain words pass."""
    words = tests.split()
    if not words or any(not re.fullmatch(r"[A-Za-z0-9_./:\[\]=-]+", w) for w in words):
        raise ValueError(f"--tests {tests!r}: expected test files or node ids (letters, digits, _./:[]=-)")
    if not any(s["name"] == "suite" for s in steps):
        raise ValueError("--tests narrows the suite step, which this run does not have")
    return [dict(s, run=f"{PY} -v -rfE --durations=25 {' '.join(map(shlex.quote, words))}") if s["name"] == "suite" else s
            for s in steps]


# What the guests can be asked to check of themselves: Debian's kernels
# have kprobes, so the probe set must be the kprobe one there.
GUEST_ENV = {"CI": "true", "XDPGUARD_BLOCKLISTS": "/job/blocklists", "XDPGUARD_EXPECT_PROBES": "kprobe"}


def log(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


def guests() -> list[str]:
    names = []
    for line in (REPO / "vm" / "guests.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            names.append(line.split()[0])
    return names


def image(name: str) -> Path:
    """The cached image of a guest, built first if needed."""
    r = subprocess.run(["bash", str(REPO / "vm" / "image.sh"), name], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the image of {name} failed (exit {r.returncode})")
    return Path(r.stdout.strip().splitlines()[-1])


def _qemu(accel: str, kernel: Path, initrd: Path, append: str, drives: list[str], console: Path,
          mem: int = 4096) -> list[str]:
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-m", str(mem), "-smp", "2",
           "-display", "none", "-monitor", "none", "-nic", "none", "-serial", f"file:{console}",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        cmd += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    for d in drives:
        cmd += ["-drive", d]
    return cmd


def _kvm_kind() -> str:
    """What /dev/kvm is backed by, for the log: hardware virtualization
    (vmx/svm) or PVM (kvm_pvm: a paravirtual hypervisor that runs only
    kernels built as PVM guests, CONFIG_PVM_GUEST; Debian's are not)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        flags = []
    hw = "vmx" in flags or "svm" in flags
    pvm = Path("/sys/module/kvm_pvm").is_dir()
    if pvm and not hw:
        return "PVM (kvm_pvm, no vmx/svm): it boots only PVM-guest kernels"
    return "hardware (vmx/svm)" if hw else "unknown (no vmx/svm)"


def choose_accel(img: Path, kernel: str) -> str:
    """KVM where it boots this guest's kernel here, TCG otherwise. On some
    hosts /dev/kvm exists but a guest hangs at boot (this development VM's
    KVM is PVM: Debian's kernels stop after the real-mode setup): the
    kernel is booted without a root disk and must reach its panic within
    60 s. The verdict is kept per host kernel and guest kernel; it decides
    speed, not results."""
    want = os.environ.get("XDPGUARD_VM_ACCEL", "auto")
    if want in ("kvm", "tcg"):
        return want
    if want != "auto":
        raise SystemExit(f"vm: XDPGUARD_VM_ACCEL must be kvm, tcg or auto, not {want!r}")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    memo = CACHE / f"accel-{os.uname().release}-{kernel}"
    if memo.exists():
        return memo.read_text().strip()
    with tempfile.TemporaryDirectory() as d:
        console = Path(d) / "console"
        cmd = _qemu("kvm", img / "vmlinuz", img / "initrd.img",
                    "console=ttyS0 panic=-1 root=/dev/nonexistent rootdelay=0 break=top", [], console, 512)
        p = subprocess.Popen(cmd + ["-no-reboot"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        verdict = "tcg"
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace") if console.exists() else ""
            if "Run /init" in text or "Freeing unused kernel" in text or "Kernel panic" in text:
                verdict = "kvm"
                break
            if p.poll() is not None:
                break
            time.sleep(1)
        p.kill()
        p.wait()
    memo.write_text(verdict + "\n")
    log(f"accelerator: {verdict} (KVM, {_kvm_kind()}, {'boots' if verdict == 'kvm' else 'does not boot'} "
        f"kernel {kernel} here)")
    return verdict


def _tree(dest: Path) -> None:
    """The checkout as git knows it (tracked and untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                           stdout=subprocess.PIPE, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = REPO / os.fsdecode(f)
        if src.is_file() or src.is_symlink():
            (dest / os.fsdecode(f)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(f), follow_symlinks=False)


def run_guest(name: str, steps: list[dict], out: Path, deadline_s: int) -> dict:
    t0 = time.monotonic()
    img = image(name)
    meta = json.loads((img / "image.json").read_text())
    accel = choose_accel(img, meta["kernel"])
    work = Path(tempfile.mkdtemp(prefix=f"run-{name}.", dir=CACHE))
    rows: list[dict] = [{"step": "image", "result": "pass", "seconds": round(time.monotonic() - t0, 1),
                         "error": ""}]
    try:
        jobdir = work / "job"
        (jobdir / "src").mkdir(parents=True)
        (jobdir / "results").mkdir()
        _tree(jobdir / "src")
        if BLOCKLISTS.is_dir():
            shutil.copytree(BLOCKLISTS, jobdir / "blocklists")
        else:
            # A worktree's ../shared is not the checkout's: say so before an hour is spent.
            log(f"{name}: no blocklists at {BLOCKLISTS} (set XDPGUARD_BLOCKLISTS); "
                "the tests that read them fail in the guest (CI=true)")
        shutil.copy2(REPO / "vm" / "job.py", jobdir / "job.py")
        # Under emulation every deadline of the tests stretches by one
        # factor (testing/timing.py), not by a noisy measurement in the guest.
        env = dict(GUEST_ENV, **({"XDPGUARD_TEST_SLOWDOWN": "10"} if accel == "tcg" else {}))
        (jobdir / "job.json").write_text(json.dumps({"steps": steps, "env": env}))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "xgjob", "-d", str(jobdir), str(work / "job.img"), "4G"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img / "root.img"),
                        str(work / "root.qcow2")], check=True)
        console = out / f"{name}.console.log"
        cmd = _qemu(accel, img / "vmlinuz", img / "initrd.img",
                    "root=/dev/vda rw console=ttyS0 panic=-1 net.ifnames=0 systemd.show_status=auto",
                    [f"file={work / 'root.qcow2'},if=virtio,format=qcow2,cache=unsafe",
                     f"file={work / 'job.img'},if=virtio,format=raw,cache=unsafe"], console)
        log(f"{name}: booting ({accel}, kernel {meta['kernel']}); console: {console}")
        tb = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=deadline_s)
            if p.returncode != 0:
                rows.append({"step": "qemu", "result": "fail", "seconds": 0, "error": err.strip()[-500:]})
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            rows.append({"step": "guest", "result": "timeout", "seconds": deadline_s,
                         "error": f"the guest did not finish in {deadline_s} s (console: {console})"})
        except BaseException:
            # Stopped from outside (SIGTERM, ^C): no guest left running behind us.
            p.kill()
            p.wait()
            raise
        boot_s = round(time.monotonic() - tb, 1)
        res = work / "results"
        subprocess.run(["debugfs", "-R", f"rdump /results {work}", str(work / "job.img")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = (res / "steps.jsonl").read_text().splitlines() if (res / "steps.jsonl").exists() else []
        done = [json.loads(x) for x in lines]
        rows[1:1] = done
        ran = {r["step"] for r in done}
        for s in steps:
            if s["name"] not in ran:
                rows.append({"step": s["name"], "result": "not run", "seconds": 0, "error": ""})
        logs = out / f"{name}.logs"
        shutil.rmtree(logs, ignore_errors=True)
        if res.is_dir():
            shutil.copytree(res, logs)
        return {"guest": name, "image": meta, "accel": accel, "guest_seconds": boot_s,
                "seconds": round(time.monotonic() - t0, 1), "date": time.strftime("%Y-%m-%d"),
                "ok": all(r["result"] == "pass" for r in rows), "steps": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    m = r["image"]
    head = (f"### {r['guest']}: Debian {m['suite']}, kernel {m['kernel']}, bcc {m['bcc']}, "
            f"Python {m['python']} ({r['accel']}, {r['date']})\n\n")
    rows = ["| step | result | seconds | error |", "|---|---|---|---|"]
    for s in r["steps"]:
        err = s["error"].replace("|", "\\|").replace("\n", " ")[:300]
        rows.append(f"| {s['step']} | {s['result']} | {s['seconds']} | {err} |")
    return head + "\n".join(rows) + f"\n\nheaders: {m['headers']}; total {r['seconds']} s\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=sorted(JOBS))
    ap.add_argument("--guest", action="append", help="a guest of vm/guests.conf (repeatable)")
    ap.add_argument("--steps", help="only these steps of the job, comma-separated (setup always runs "
                    "first; systemd brings the reboot and systemd-after-reboot), e.g. --steps systemd")
    ap.add_argument("--timeout", type=int, default=None, help="seconds a guest may run (default: per job)")
    ap.add_argument("--tests", help="the suite step runs only these pytest arguments (files, node ids; "
                    "space-separated, no shell syntax), e.g. --tests tests/test_bench.py: a part of "
                    "the suite where the whole takes hours under TCG")
    ap.add_argument("--out", type=Path, default=REPO / "vm" / "results")
    a = ap.parse_args(argv)
    # SIGTERM unwinds like ^C, so the guest is killed and its overlay removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("vm/run.py: run as root (debootstrap, chroot, QEMU)", file=sys.stderr)
        return 2
    default, steps = JOBS[a.job]
    try:
        steps = select(steps, a.steps)
    except ValueError as e:
        print(f"vm/run.py: {e}", file=sys.stderr)
        return 2
    if a.tests is not None:
        try:
            steps = with_tests(steps, a.tests)
        except ValueError as e:
            print(f"vm/run.py: {e}", file=sys.stderr)
            return 2
    names = a.guest or default or guests()
    unknown = set(names) - set(guests())
    if unknown:
        print(f"vm/run.py: no guest {', '.join(sorted(unknown))} in vm/guests.conf", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    budget = a.timeout or sum(s.get("timeout", 0) for s in steps) + 600
    ok = True
    for name in names:
        try:
            r = run_guest(name, steps, a.out, budget)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"vm/run.py: {name}: {e}", file=sys.stderr)
            ok = False
            continue
        (a.out / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        md = markdown(r)
        (a.out / f"{name}.md").write_text(md)
        print(md)
        ok &= r["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
