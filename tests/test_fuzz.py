"""Differential fuzzing: the real XDP program (BPF_PROG_TEST_RUN, one frame
per run) against the Python reference (lookup.verdict: parse, bans,
classifier).

Every frame's outcome (verdict, reason, deciding rule) must agree, and the
kernel's counter slot must be that outcome's; any difference
is a bug in one of the two sides (docs/design.md decides which), never
something to whitelist.

XG_FUZZ_FRAMES sets the number of frames (default 20000; `make fuzz` runs
1,000,000); XG_FUZZ_SEED replays a run (the seed is printed on failure).
"""
from __future__ import annotations

import ipaddress
import os
import random
import sys
import time

import pytest

from conftest import require_kernel
from testing.fuzzgen import mutate, random_frame
from testrun import ban_key, make_rig
from xdpguard import bans, bpfsys, lookup, packet
from xdpguard.bpfsys import XDP_DROP, XDP_PASS
from xdpguard.compiler import compile_policy
from xdpguard.layout import MALFORMED_SLOTS, SLOT_REASONS, C
from xdpguard.lookup import Outcome
from xdpguard.packet import build
from xdpguard.policy import load

pytestmark = pytest.mark.kernel

FRAMES = int(os.environ.get("XG_FUZZ_FRAMES", "20000"))
SEED = int(os.environ.get("XG_FUZZ_SEED", "0") or 0) or random.SystemRandom().getrandbits(32)
MAX_REPORTED = 20

# No limit rules: every verdict is a pure function of the frame.
DENY_POLICY = """
[policy]
name = "fuzz-deny"
default = "deny"

[sets]
lan = ["192.0.2.0/24", "2001:db8:1::/48"]
bad = ["203.0.113.0/24", "2001:db8:bad::/48"]

[[rule]]
name = "deny-bad"
src = "@bad"
action = "deny"

[[rule]]
name = "ssh-lan"
src = "@lan"
proto = "tcp"
dport = 22
action = "allow"

[[rule]]
name = "web"
proto = "tcp"
dport = [80, 443, "8000-8999"]
action = "allow"

[[rule]]
name = "syn-high"
proto = "tcp"
dport = "1024-65535"
tcp_flags = "syn"
action = "deny"

[[rule]]
name = "tcp-replies"
proto = "tcp"
sport = [80, 443]
action = "allow"

[[rule]]
name = "dns"
proto = "udp"
dport = 53
action = "allow"

[[rule]]
name = "dns-replies"
proto = "udp"
sport = 53
dport = "1024-65535"
action = "allow"

[[rule]]
name = "ping"
proto = "icmp"
action = "allow"

[[rule]]
name = "icmpv6-lan"
src = "@lan"
proto = "icmpv6"
action = "allow"

[[rule]]
name = "to-host"
dst = ["198.51.100.77", "2001:db8:ffff::1"]
proto = ["tcp", "udp"]
action = "allow"

[[rule]]
name = "from-link-local"
src = ["fe80::/10", "169.254.0.0/16"]
action = "allow"
"""

ALLOW_POLICY = """
[policy]
name = "fuzz-allow"
default = "allow"

[sets]
bad = ["203.0.113.0/24", "2001:db8:bad::/48", "198.51.100.0/28"]

[[rule]]
name = "deny-bad"
src = "@bad"
action = "deny"

[[rule]]
name = "ssh-admin"
src = ["192.0.2.0/28", "2001:db8::/64"]
proto = "tcp"
dport = 22
action = "allow"

[[rule]]
name = "ssh"
proto = "tcp"
dport = 22
action = "deny"

[[rule]]
name = "syn-to-host"
dst = ["198.51.100.77", "2001:db8:1::1"]
proto = "tcp"
tcp_flags = "syn"
action = "deny"

[[rule]]
name = "udp-amp"
proto = "udp"
sport = [19, 53, 123, 1900, 11211]
dport = "1024-65535"
dst = ["198.51.100.0/24", "2001:db8::/32"]
action = "deny"

[[rule]]
name = "udp-low"
proto = "udp"
dport = "0-1023"
action = "deny"

[[rule]]
name = "tcp-frags"
proto = "tcp"
dst = "10.0.0.0/8"
action = "deny"

[[rule]]
name = "icmp-in"
proto = "icmp"
dst = ["198.51.100.1", "192.0.2.200"]
action = "deny"

[[rule]]
name = "icmpv6-nd-guard"
proto = "icmpv6"
src = ["2001:db8:ffff::/48", "ff02::/16"]
action = "deny"

[[rule]]
name = "anything-from"
src = ["172.16.0.0/12", "fd00::/8"]
action = "deny"
"""

# Sources / destinations the rules name: half the fuzzed addresses come from here.
ADDRESSES = ("192.0.2.0/24", "2001:db8:1::/48", "203.0.113.0/24", "2001:db8:bad::/48", "198.51.100.77",
             "2001:db8:ffff::1", "fe80::/64", "169.254.1.0/24", "192.0.2.0/28", "2001:db8::/64",
             "198.51.100.0/24", "2001:db8:1::1", "10.0.0.0/8", "172.16.0.0/12", "fd00::/8",
             "2001:db8:ffff::/48", "10.9.0.0/16", "2001:db8:9::/48", "10.8.0.0/16")

# Bans: active, never expiring, expired (ignored), nested (longest match wins).
BANS = [("10.9.0.0/16", 0), ("2001:db8:9::/48", 0), ("10.8.0.0/16", -1), ("2001:db8:bad:1::/64", 0),
        ("10.9.9.0/24", -1)]


class Fuzzer:
    def __init__(self):
        require_kernel()
        from xdpguard.loader import Shape
        self.tables = {}
        for name, text in (("deny", DENY_POLICY), ("allow", ALLOW_POLICY)):
            self.tables[name] = compile_policy(load(f"fuzz-{name}.toml", text=text))
        self.rig = make_rig(self.tables["deny"], Shape(nwords=1, vec_per_gen=256))
        self.fd = self.rig.fn.fd
        # Bans, and their reference: (network, expires_ns).
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.bans = []
        for cidr, exp in BANS:
            net = ipaddress.ip_network(cidr)
            m = self.rig.maps["ban4" if net.version == 4 else "ban6"]
            v = m.Leaf()
            v.expires_ns = now - 1_000_000_000 if exp < 0 else exp
            bans.insert(m, self.rig.maps["banstate"], net.version, ban_key(m, net), v)
            self.bans.append((net, v.expires_ns))
        self.policy = None
        self.linear = self._linear_size()

    def _linear_size(self) -> int:
        """Bytes of a long frame the program sees. BPF_PROG_TEST_RUN puts
        what does not fit in one page (after headroom and skb_shared_info:
        3520 bytes on x86-64) into fragments, and a program without
        xdp.frags sees only data..data_end, the linear part. (Attached to a
        NIC, such a program never gets a frame that large: drivers refuse an
        MTU above one page without frags.) The reference is given the same
        bytes."""
        frame = build("192.0.2.1", "198.51.100.77", "udp", dport=53, payload=bytes(8000))
        before = self.rig.counter(C.XG_SLOT_DEFAULT)["bytes"] + sum(
            self.rig.counter(s)["bytes"] for s in self.rig.slots.values())
        self.kernel(frame)
        after = self.rig.counter(C.XG_SLOT_DEFAULT)["bytes"] + sum(
            self.rig.counter(s)["bytes"] for s in self.rig.slots.values())
        linear = after - before
        assert 1514 < linear < len(frame)
        return linear

    def use(self, name):
        self.rig.load(self.tables[name])
        self.policy = name

    def kernel(self, frame: bytes) -> Outcome:
        """The outcome of one frame through the real program; a slot other
        than the outcome's own makes the reason "slot N"."""
        res = self.rig.run(frame)
        if res.slot != res.counter_slot(self.rig.slots):
            return Outcome(res.retval, f"slot {res.slot}", res.rule)
        return res

    def reference(self, frame: bytes) -> Outcome:
        return lookup.verdict(frame[:self.linear], self.rig.tables, self.bans)

    @staticmethod
    def describe(res: Outcome) -> str:
        v = {XDP_DROP: "drop", XDP_PASS: "pass"}.get(res.retval, res.retval)
        return f"{v} ({res.reason})" + (f" '{res.rule}'" if res.rule else "")


def _valid_frame(rng) -> bytes:
    """A well-formed frame with addresses the policies name (mutated later)."""
    fam = rng.choice((4, 6))
    pool = [a for a in ADDRESSES if (":" in a) == (fam == 6)]

    def host():
        net = ipaddress.ip_network(rng.choice(pool))
        return net.network_address + rng.randrange(min(net.num_addresses, 1 << 16))
    proto = rng.choice(("tcp", "tcp", "udp", "udp", "icmp", "icmpv6", "gre"))
    kw = {}
    if proto in ("tcp", "udp"):
        ports = (0, 19, 22, 53, 80, 123, 443, 1023, 1024, 1900, 8000, 8999, 9000, 11211, 40000, 65535)
        kw["sport"], kw["dport"] = rng.choice(ports), rng.choice(ports)
    if proto == "tcp":
        kw["tcp_flags"] = rng.choice(("syn", "ack", "syn,ack", "rst", None))
    if proto == "icmpv6":
        kw["icmp_type"] = rng.choice((128, 129, 133, 134, 135, 136, 137, 1))
    if rng.random() < 0.3:
        kw["vlans"] = rng.choice(((1,), (1, 2), (1, 2, 3)))
    if rng.random() < 0.2:
        kw["fragment"] = (rng.choice((0, 0, 1, 100, 8191)), rng.random() < 0.5)
    if fam == 6 and rng.random() < 0.3:
        kw["ipv6_exthdrs"] = [rng.choice((("hop",), ("dst",), ("rt",), ("dst", 1))) for _ in range(rng.randrange(1, 8))]
    if fam == 4 and rng.random() < 0.2:
        kw["ipv4_options"] = bytes(4 * rng.randrange(1, 11))
    try:
        return build(host(), host(), proto, **kw)
    except ValueError:
        return build("192.0.2.1", "198.51.100.77", "tcp", dport=22)


def frame_stream(rng, n):
    for _ in range(n):
        r = rng.random()
        if r < 0.65:
            yield random_frame(rng, ADDRESSES)
        else:
            f = _valid_frame(rng)
            for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
                f = mutate(rng, f)
            yield f


@pytest.fixture(scope="module")
def fuzzer():
    f = Fuzzer()
    yield f
    f.rig.close()


def test_fuzz_kernel_matches_reference(fuzzer):
    rng = random.Random(SEED)
    mismatches = []
    seen: dict[str, int] = {}
    short = 0
    t0 = time.monotonic()
    runs = 0
    for i, frame in enumerate(frame_stream(rng, FRAMES)):
        if i == 0 or i == FRAMES // 2:
            fuzzer.use("deny" if i == 0 else "allow")
        ref = fuzzer.reference(frame)
        if len(frame) < 14:
            # BPF_PROG_TEST_RUN refuses frames under ETH_HLEN (XDP never sees
            # one); the reference must call them truncated.
            short += 1
            if ref != Outcome(XDP_DROP, "truncated"):
                mismatches.append((frame, "not run (< 14 bytes)", fuzzer.describe(ref)))
            continue
        got = fuzzer.kernel(frame)
        runs += 1
        key = f"{fuzzer.policy}:{fuzzer.describe(ref)}"
        seen[key] = seen.get(key, 0) + 1
        if got != ref:
            mismatches.append((frame, fuzzer.describe(got), fuzzer.describe(ref)))
            if len(mismatches) >= MAX_REPORTED:
                break
    elapsed = time.monotonic() - t0
    rate = (runs + short) / elapsed if elapsed else 0
    print(f"\nfuzz: seed {SEED}, {runs} frames through the kernel (+{short} under 14 bytes) "
          f"in {elapsed:.1f}s: {rate:.0f} frames/s", file=sys.stderr)
    if mismatches:
        msg = [f"{len(mismatches)} mismatches (seed {SEED}, XG_FUZZ_SEED={SEED} replays):"]
        for frame, got, ref in mismatches:
            msg.append(f"  frame {frame.hex()}\n    kernel:    {got}\n    reference: {ref}")
        pytest.fail("\n".join(msg), pytrace=False)

    # The fuzz must not be vacuous: every outcome class and every rule is hit.
    if FRAMES >= 20000:
        for pol, tables in fuzzer.tables.items():
            for r in tables.rules:
                assert any(k.startswith(f"{pol}:") and f"'{r.name}'" in k for k in seen), \
                    f"policy {pol}: rule {r.name} never decided a fuzzed frame"
            for what in ("(non-ip)", "(ban)", "(nd)", "(default)",
                         *(f"({SLOT_REASONS[s]})" for s in MALFORMED_SLOTS)):
                assert any(k.startswith(f"{pol}:") and what in k for k in seen), \
                    f"policy {pol}: no fuzzed frame was {what}"


def test_long_frames_show_their_linear_part(fuzzer):
    """A frame longer than the linear part is judged on the linear part:
    a UDP header beyond it is 'truncated' (malformed), one inside is fine."""
    fuzzer.use("deny")                         # rule 'dns' passes udp :53
    pad = [("hop", 255)]                       # 2048 bytes of options
    inside = build("2001:db8:1::5", "2001:db8::1", "udp", dport=53, ipv6_exthdrs=pad, payload=bytes(6000))
    assert fuzzer.kernel(inside) == fuzzer.reference(inside) == Outcome(XDP_PASS, "rule", "dns")
    beyond = build("2001:db8:1::5", "2001:db8::1", "udp", dport=53, ipv6_exthdrs=pad * 2, payload=bytes(6000))
    assert len(beyond) > fuzzer.linear and packet.parse(beyond) not in packet.MALFORMED
    assert fuzzer.kernel(beyond) == fuzzer.reference(beyond) == Outcome(XDP_DROP, "truncated")


def test_fuzz_frames_under_14_bytes_are_refused(fuzzer):
    """The kernel will not run XDP on less than an Ethernet header; the
    Python parser calls such frames truncated (the C bounds check agrees)."""
    for n in range(14):
        assert packet.parse(bytes(n)) is packet.TRUNCATED
        with pytest.raises(OSError):
            bpfsys.prog_test_run(fuzzer.fd, bytes(n), 1, data_out_size=0)
