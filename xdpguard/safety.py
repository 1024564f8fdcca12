"""Safe operations: the lockout guard and the `apply --confirm` timer.

The guard evaluates a policy, before it is attached, for the endpoints that
must keep access: the client of the current SSH session, the default
gateways (ICMP to the host's own addresses: path MTU and errors), and the
policy's `protect` entries (to each of the host's own addresses). What it
cannot check (the addresses unreadable, SSH_CONNECTION garbled, no address
of a protect entry's family) it says, for apply to warn: it never narrows
silently. The timer is a detached process, so that a dead SSH session (the
very case --confirm exists for) still rolls back.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from xdpguard import pins
from xdpguard.compiler import Tables
from xdpguard.layout import C
from xdpguard.lookup import decide
from xdpguard.policy import Policy


@dataclass
class Endpoint:
    what: str            # for the message
    src: str
    dst: str | None
    l4: int
    sport: int | None = None
    dport: int | None = None


def _int(addr: str) -> tuple[int, int]:
    a = ipaddress.ip_address(addr)
    return a.version, int(a)


@dataclass
class Guard:
    """The lockout guard's answer: what the policy would drop, and what it
    could not check (each a sentence for the operator)."""
    problems: list[str]
    unchecked: list[str]


def _ssh_endpoints(env, unchecked: list[str]) -> list[Endpoint]:
    text = env.get("SSH_CONNECTION")
    if text is None:
        return []
    try:
        cip, cport, sip, sport = text.split()
        _int(cip), _int(sip)
        cport, sport = int(cport), int(sport)
    except ValueError:
        unchecked.append(f"SSH_CONNECTION {text[:80]!r} is not 'client port server port': "
                         f"the SSH session was not checked")
        return []
    return [Endpoint(f"{what} from {cip} to {sip}:{sport} (SSH_CONNECTION)", cip, sip, l4, cport, sport)
            for l4, what in ((C.XG_L4_TCP_SYN, "new SSH connections"), (C.XG_L4_TCP, "the SSH session"))]


def endpoints(policy: Policy, netns: str | None, env=os.environ,
              unchecked: list[str] | None = None, protect_only: bool = False) -> list[Endpoint]:
    """Packets that must keep passing for the operator to keep access;
    what cannot be checked is said in `unchecked`. protect_only: the
    policy's protect entries alone (`check`: the SSH session and the
    gateways are this machine's, not necessarily the target's)."""
    from xdpguard.bans import own_addresses
    from xdpguard.errors import NetnsError
    unchecked = [] if unchecked is None else unchecked
    out = [] if protect_only else _ssh_endpoints(env, unchecked)
    where = f"network namespace '{netns}'" if netns else "this host"
    try:
        addrs = own_addresses(netns)
    except (OSError, NetnsError) as e:
        addrs = []
        unchecked.append(f"cannot read the addresses and default gateways of {where} ({e}): "
                         f"ICMP from the gateways was not checked"
                         + (", protect entries only without a destination" if policy.protect else ""))
    own = [a for a, why in addrs if why.startswith("an address") and not ipaddress.ip_address(a).is_loopback]
    for gw in (a for a, why in addrs if "gateway" in why and not protect_only):
        # ICMP from the gateway carries path-MTU and unreachable errors.
        dst = next((a for a in own if (":" in a) == (":" in gw)), None)
        out.append(Endpoint(f"ICMP from the default gateway {gw}", gw, dst,
                            C.XG_L4_ICMP if ":" not in gw else C.XG_L4_ICMPV6))
    for prefix, port in policy.protect:
        addr = str(prefix).split("/")[0]
        dsts = [a for a in own if (":" in a) == (prefix.family == 6)]
        if not dsts and addrs:
            unchecked.append(f"protect {prefix}{f' port {port}' if port is not None else ''}: {where} has "
                             f"no IPv{prefix.family} address; checked without a destination address")
        for dst in dsts or [None]:
            if port is None:
                out.append(Endpoint(f"ICMP from protected {prefix}", addr, dst,
                                    C.XG_L4_ICMP if prefix.family == 4 else C.XG_L4_ICMPV6))
            else:
                for l4 in (C.XG_L4_TCP_SYN, C.XG_L4_TCP):
                    out.append(Endpoint(f"protected {prefix} to {dst or 'this host'} port {port}",
                                        addr, dst, l4, 40000, port))
    return out


def lockouts(policy: Policy, tables: Tables, netns: str | None, env=os.environ,
             protect_only: bool = False) -> Guard:
    """Every must-pass endpoint the policy would drop, and what could not
    be checked (protect_only: see endpoints)."""
    guard = Guard([], [])
    for e in endpoints(policy, netns, env, guard.unchecked, protect_only):
        fam, src = _int(e.src)
        if e.dst is not None and _int(e.dst)[0] == fam:
            dst = _int(e.dst)[1]
        else:
            dst = 0
        d = decide(tables, fam, src, dst, e.l4, e.sport, e.dport)
        if d.verdict == "drop":
            who = f"rule '{d.rule}' (rule {d.index + 1})" if d.rule else f"the default ({policy.default})"
            problem = f"{who} would drop {e.what}"
            if problem not in guard.problems:          # a SYN and the connection's packets
                guard.problems.append(problem)
    return guard


# ---------------------------------------------------------------- confirm

def start_timer(iface: str, netns: str | None, token: float, deadline: float) -> None:
    """A detached process that rolls back at the deadline unless confirmed."""
    cmd = [sys.executable, "-m", "xdpguard.safety", iface, netns or "host", repr(token), repr(deadline)]
    subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def pending(record: pins.Record | None, token: float) -> bool:
    return record is not None and record.policy.applied_at == token and record.confirm is not None


def timer_main(iface: str, netns: str, token: float, deadline: float) -> int:
    from xdpguard import loader
    ns = None if netns == "host" else netns
    directory = pins.iface_dir(ns, iface)
    while time.time() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.time())))
        if not pending(pins.read_record(directory), token):
            return 0          # confirmed, or replaced by another apply
    record = pins.read_record(directory)
    if not pending(record, token):
        return 0
    if record.history or record.previous:
        loader.rollback(iface, ns, log=lambda m: None, expect_token=token)
    else:
        loader.detach(iface, ns, log=lambda m: None)
    return 0


if __name__ == "__main__":
    sys.exit(timer_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
