"""vm/run.py's choice of what a guest runs (host side, no guest booted)."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("vm_run", Path(__file__).resolve().parent.parent / "vm" / "run.py")
vm_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vm_run)


def names(steps):
    return [s["name"] for s in steps]


def test_systemd_brings_the_reboot_and_the_check_after_it():
    assert names(vm_run.select(vm_run.TEST, "systemd")) == ["setup", "systemd", "reboot", "systemd-after-reboot"]


def test_unknown_step_is_refused():
    with pytest.raises(ValueError, match="no step nope"):
        vm_run.select(vm_run.TEST, "nope")


def test_tests_narrow_the_suite_step_only():
    steps = vm_run.with_tests(vm_run.select(vm_run.TEST, "suite"), "tests/test_bench.py tests/test_probes.py::test_x[tracepoint]")
    suite = next(s for s in steps if s["name"] == "suite")
    assert suite["run"].endswith("tests/test_bench.py 'tests/test_probes.py::test_x[tracepoint]'")
    assert names(steps) == ["setup", "suite"]
    # the job's own list is left as it was for the next guest
    assert next(s for s in vm_run.TEST if s["name"] == "suite")["run"].endswith(" tests")


@pytest.mark.parametrize("bad", ["", "tests/x.py; reboot", "$(id)", "a|b"])
def test_tests_take_no_shell_syntax(bad):
    with pytest.raises(ValueError, match="expected test files or node ids"):
        vm_run.with_tests(vm_run.TEST, bad)


def test_tests_need_the_suite_step():
    with pytest.raises(ValueError, match="does not have"):
        vm_run.with_tests(vm_run.SMOKE, "tests/test_bench.py")
