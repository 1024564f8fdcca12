"""Kernel-probe statistics for xdpguard's feedback loop.

``ProbeSet.open()`` attaches per-source / per-service TCP counters (SYNs
reaching a listener, completed handshakes, SYN-ACK retransmissions,
resets): the kprobe set where the kernel has kprobes, else the tracepoint
set. See collector.py for the API and bpf/probes/*.c for what is counted.
"""

from .collector import (COUNTERS, MODES, ProbeError, ProbeSet, build_cflags,
                        load_only, programs)
from .detect import kprobes_available, tracepoints_available

__all__ = [
    "COUNTERS", "MODES", "ProbeError", "ProbeSet", "build_cflags", "load_only",
    "programs", "kprobes_available", "tracepoints_available",
]
