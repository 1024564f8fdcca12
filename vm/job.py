"""The guest side of vm/run.py: runs the steps of /job/job.json in order,
one result line each in /job/results/steps.jsonl, then powers the guest off.

Runs in the guest at boot (xg-vm-job.service), with the guest's own python3
(stdlib only). A step {"reboot": true} reboots the guest; the job is run
again at the next boot and goes on after that step (/job/state.json).
The first boot copies the checkout from /job/src over /xdpguard, keeping
the venv the image was built with.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

JOB = "/job"
RESULTS = f"{JOB}/results"
STATE = f"{JOB}/state.json"
SRC = "/xdpguard"


def _console(msg: str) -> None:
    # The console is the serial port the host logs: progress a person can follow.
    print(f"xg-vm-job: {msg}", flush=True)


def _save(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _error_of(log: str) -> str:
    """The lines of a failed step's log that say why, for the table."""
    try:
        with open(log, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if re.search(r"(FAILED|Error|error:|failed|Traceback|^E )", ln)]
    return " | ".join((keep or lines)[-6:])[-1500:]


def _record(row: dict) -> None:
    with open(f"{RESULTS}/steps.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _prepare() -> None:
    subprocess.run(["rsync", "-a", "--delete", "--exclude=/.venv", f"{JOB}/src/", f"{SRC}/"], check=True)


def main() -> int:
    job = json.load(open(f"{JOB}/job.json"))
    os.makedirs(RESULTS, exist_ok=True)
    state = json.load(open(STATE)) if os.path.exists(STATE) else {"next": 0, "boots": 0}
    state["boots"] += 1
    _save(STATE, state)
    if state["boots"] > job.get("max_boots", 3):
        _record({"step": "boot", "result": "fail", "seconds": 0,
                 "error": f"booted {state['boots']} times: the guest rebooted unexpectedly"})
        state["next"] = len(job["steps"])
    if state["next"] == 0 and state["boots"] == 1:
        _prepare()
    env = dict(os.environ, **job.get("env", {}))
    env["PATH"] = f"{SRC}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    steps = job["steps"]
    while state["next"] < len(steps):
        step = steps[state["next"]]
        state["next"] += 1
        _save(STATE, state)
        if step.get("reboot"):
            _record({"step": step["name"], "result": "pass", "seconds": 0, "error": ""})
            _console(f"step {step['name']}: rebooting")
            os.sync()
            subprocess.run(["systemctl", "reboot"])
            return 0
        _console(f"step {step['name']}: {step['run']}")
        log = f"{RESULTS}/{step['name']}.log"
        t0 = time.monotonic()
        with open(log, "w") as out:
            p = subprocess.Popen(["bash", "-o", "pipefail", "-c", step["run"]], cwd=SRC, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=step.get("timeout", 600))
                result = "pass" if rc == 0 else "fail"
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                result = "timeout"
        secs = round(time.monotonic() - t0, 1)
        _record({"step": step["name"], "result": result, "seconds": secs,
                 "error": "" if result == "pass" else _error_of(log)})
        _console(f"step {step['name']}: {result} in {secs} s")
        if result != "pass" and step.get("stop_on_failure"):
            break
    _save(STATE, dict(state, done=True))
    os.sync()
    _console("done, powering off")
    subprocess.run(["systemctl", "poweroff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
