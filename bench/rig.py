"""The xdpguard program loaded unattached for BPF_PROG_TEST_RUN, in either build.

``loader.TestRig`` loads the XG_TEST build, which records the deciding rule
in a debug map (one more array update per packet). The production build is
what `apply` attaches; this rig loads either one and fills the maps exactly
as TestRig does (same ``write_gen`` / ``set_active``), without the debug map.
"""
from __future__ import annotations

import ctypes
import ipaddress
import time

from bench.common import REPO  # noqa: F401  (puts the repo on sys.path)
from xdpguard import bans, bpfsys, loader, plan
from xdpguard.compiler import Tables


class BenchRig(loader.TestRig):
    __test__ = False

    def __init__(self, tables: Tables, test: bool = False, shape: loader.Shape | None = None,
                 source: str | None = None, cflags: tuple = ()):
        """source: a variant of bpf/xdpguard.c (bench/analysis.py), compiled
        like loader.compile_program does, with extra cflags."""
        self.test = test
        self.shape = shape or loader.Shape.for_tables(tables)
        t0 = time.monotonic()
        if source is None:
            self.b, self.fn = loader.compile_program(self.shape, test=test)
        else:
            from bcc import BPF
            from xdpguard import layout
            flags = [f"-I{layout.bpf_dir()}", "-w"] + self.shape.cflags() + list(cflags)
            if test:
                flags.append("-DXG_TEST=1")
            self.b = BPF(text=source, cflags=flags)
            self.fn = self.b.load_func(loader.PROG_NAME.encode(), BPF.XDP)
        self.compile_s = time.monotonic() - t0
        self.maps = loader.bcc_maps(self.b, self.shape.map_names(test=test))
        t0 = time.monotonic()
        # First fill: generation 0 of empty maps (what TestRig.load does,
        # with this rig's own program).
        self.slots, fresh = loader.assign_slots(tables, None)
        loader.zero_slots(self.maps, fresh)
        loader.write_gen(self.maps, tables, 0, self.shape, self.slots,
                         plan.build(tables, self.shape.dir_nodes, self.slots))
        loader.set_active(self.maps, 0)
        self.gen = 0
        self.tables = tables
        self.by_slot = {s: n for n, s in self.slots.items()}
        self.fill_s = time.monotonic() - t0

    @property
    def fd(self) -> int:
        return self.fn.fd

    def ban(self, addr: str) -> None:
        """Insert a permanent ban for one address (as `xdpguard ban` would)."""
        a = ipaddress.ip_address(addr)
        m = self.maps["ban4" if a.version == 4 else "ban6"]
        k = m.Key()
        k.prefixlen = a.max_prefixlen
        ctypes.memmove(ctypes.addressof(k) + type(k).addr.offset, a.packed, len(a.packed))
        bans.insert(m, self.maps["banstate"], a.version, k, m.Leaf())

    def verdict(self, frame: bytes) -> int:
        return bpfsys.prog_test_run(self.fn.fd, frame, repeat=1, data_out_size=0)[0]

    def ns_per_packet(self, frame: bytes, repeat: int) -> int:
        """The kernel's average duration per repeat (ns)."""
        return bpfsys.prog_test_run(self.fn.fd, frame, repeat=repeat, data_out_size=0)[1]
