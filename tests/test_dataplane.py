"""The real XDP program under BPF_PROG_TEST_RUN (loader.TestRig) against
the fixture rows of tests/dataplane_fixtures.py, katran-style: one generic
tester runs every row through the kernel and the Python reference
(lookup.verdict), and the row, the kernel and the reference must agree, so
a fixture can never encode a C/Python disagreement. Also a truncation
sweep over every length of eight header stacks, and the verifier's budget
at the widest rule vector.

The other data-plane tests, by feature: test_dataplane_bans.py,
test_dataplane_counters.py, test_limiter.py, test_kernel_vs_explain.py.
"""
from __future__ import annotations

import pytest

from dataplane_fixtures import ALLOW_POLICY, ALLOW_ROWS, DENY_POLICY, DENY_ROWS, SWEEP
from conftest import require_kernel
from testrun import outcome, reset_buckets, rig_fixture, run
from xdpguard import bpfsys, lookup, packet
from xdpguard.bpfsys import XDP_DROP

pytestmark = pytest.mark.kernel

allow_rig = rig_fixture(ALLOW_POLICY, "dp-allow.toml")
deny_rig = rig_fixture(DENY_POLICY, "dp-deny.toml")


def check_row(rig, row) -> None:
    """The row's outcome from the kernel (after row.repeat runs) and from
    the reference, which is told whether a limit rule's bucket is spent."""
    reset_buckets(rig)
    want = outcome(row.verdict, row.why)
    got = run(rig, row.frame, row.repeat)
    assert got == want, f"kernel {got}, fixture expects {want}; frame {row.frame.hex()}"
    ref = lookup.verdict(row.frame, rig.tables, over_rate=want.retval == XDP_DROP)
    assert ref == want, f"reference {ref}, fixture expects {want}"


def _params(rows):
    return [pytest.param(r, id=r.desc) for r in rows]


@pytest.mark.parametrize("row", _params(ALLOW_ROWS))
def test_allow_policy_table(allow_rig, row):
    check_row(allow_rig, row)


@pytest.mark.parametrize("row", _params(DENY_ROWS))
def test_deny_policy_table(deny_rig, row):
    check_row(deny_rig, row)


@pytest.mark.parametrize("base,full", [pytest.param(f, w, id=d) for d, f, w in SWEEP])
def test_truncated_at_every_length(allow_rig, base, full):
    """Every prefix of a header stack: the reference says truncated below
    the full header, and the kernel agrees. Under 14 bytes the kernel
    refuses to run the program at all (EINVAL): XDP never sees such a
    frame; packet.parse calls it truncated, as the C bounds check would."""
    hdr = len(base)
    assert packet.parse(base) not in packet.MALFORMED
    for n in range(0, hdr + 1):
        frame = base[:n]
        ref = lookup.verdict(frame, allow_rig.tables)
        if n < hdr:
            assert ref == outcome("drop", "truncated"), f"length {n}: reference says {ref}"
        else:
            assert ref.rule == full or ref.reason == full
        got = run(allow_rig, frame)
        assert got == ref or (got is None and n < 14), f"length {n}: kernel {got} ref {ref}"


@pytest.mark.parametrize("test_build", [False, True], ids=["production", "test build"])
def test_program_verifies_at_the_rule_limit(test_build):
    """The verifier explores every path of the program within its limit of
    1,000,000 instructions at the widest rule vector (64 words: 4,096
    rules), with room to spare: the paths multiply with each branch a
    change adds, and the AND loop repeats them per word (the packet record
    in a per-CPU map keeps them merged; bpf/xdpguard.c xg_general)."""
    require_kernel()
    from xdpguard import loader
    shape = loader.Shape(nwords=64, vec_per_gen=16384,
                         dir4_nodes=4096, dir6_nodes=512)
    b, fn = loader.compile_program(shape, test=test_build)
    try:
        assert bpfsys.prog_info(fn.fd)["verified_insns"] < 500_000
    finally:
        b.cleanup()
