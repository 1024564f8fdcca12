"""Test-only hook: XDPGUARD_TEST_KILLPOINT=<name> makes the process SIGKILL
itself when it reaches the step of that name, so that tests can check
that a kill at every step boundary leaves the pins consistent
(tests/test_crash.py). Unset, it costs one dict lookup per step."""
import os
import signal


def step(name: str) -> None:
    """A step boundary: die here if the test asked for it."""
    if os.environ.get("XDPGUARD_TEST_KILLPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
