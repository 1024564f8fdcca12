"""The pin record's type descriptions decode to bcc's own ctypes layouts."""
import ctypes

import pytest

pytestmark = pytest.mark.kernel


def _layout(t):
    if hasattr(t, "_fields_"):
        return [(f[0], ctypes.sizeof(f[1]), getattr(t, f[0]).offset) for f in t._fields_]
    return ctypes.sizeof(t)


def test_decode_type_matches_bcc():
    from bcc import BPF
    from xdpguard import loader, pins
    from xdpguard.layout import PERSISTENT_MAPS, POLICY_MAPS
    shape = loader.Shape(nwords=2, vec_per_gen=256)
    b, _fn = loader.compile_program(shape, test=True)
    try:
        names = POLICY_MAPS + PERSISTENT_MAPS + ("logfmt",)
        types = loader.bcc_types(b, names)
        for n in names:
            for part in ("key", "leaf"):
                mine = pins.decode_type(types[n][part])
                theirs = BPF._decode_table_type(types[n][part])
                assert ctypes.sizeof(mine) == ctypes.sizeof(theirs), (n, part)
                assert _layout(mine) == _layout(theirs), (n, part)
    finally:
        b.cleanup()
