"""Operations commands of the CLI (doctor, ...).

xdpguard/cli.py calls ``register(sub, add)`` (see ``_extensions``).
``add(name, func, help)`` creates a subparser that already has --json and
returns it. Command logic lives in its own module and is imported only
when the command runs, so that ``xdpguard --help`` stays fast.
"""
from __future__ import annotations

DOCTOR_EPILOG = """checks, each through the code apply runs: bpf(2), JIT, BTF, bpffs, the kernel
headers bcc uses, bcc compiling and the kernel loading bpf/xdpguard.c, its map
types, a sample policy written into it (tries of their own size in the arrays
of tries), its verdicts (BPF_PROG_TEST_RUN), a generic attach and atomic swap
in a network namespace of its own, kprobes / tracepoints, RLIMIT_MEMLOCK; then
a table of the kernel features xdpguard uses (--json: "features"). With
--iface also native XDP support (attaches a trivial XDP_PASS program in native
mode, only if nothing is attached, and detaches it) and a foreign XDP program
on the interface.

exit status: 0 everything needed is present (warnings allowed), 1 otherwise,
2 invalid usage (bad name, no such interface)

examples:
  xdpguard doctor
  xdpguard doctor --iface eth1
  xdpguard doctor --iface veth0 --netns lab --json"""


def _doctor(args) -> int:
    from xdpguard.doctor import cmd_doctor
    return cmd_doctor(args)


def register(sub, add) -> None:
    """Add the operations commands to the xdpguard parser."""
    p = add("doctor", _doctor, "check that this machine can run xdpguard, and how to fix what is missing")
    p.epilog = DOCTOR_EPILOG
    p.add_argument("--iface", help="also check native XDP support and foreign programs on this interface")
    p.add_argument("--netns", help="network namespace of --iface (/run/netns/NAME)")
