"""xdpguard command line.

Exit status: 0 success; 1 system failure (kernel, BPF, missing tools);
2 invalid policy or usage (nothing running was changed); 3 `apply --confirm`
was not confirmed in time and the previous policy was restored.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from xdpguard.output import emit_json, table

EXIT_OK, EXIT_SYSTEM, EXIT_USAGE, EXIT_NOT_CONFIRMED = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


def _policy(path):
    from xdpguard.policy import load
    return load(path)


def _warn(policy) -> None:
    for w in policy.warnings:
        print(f"warning: {w}", file=sys.stderr)


def _ns(args):
    return None if args.netns in (None, "host") else args.netns


def _check_names(args) -> None:
    from xdpguard.netns import check_name
    try:
        if getattr(args, "iface", None):
            check_name(args.iface, "iface")
        if getattr(args, "netns", None):
            check_name(args.netns, "netns")
    except ValueError as e:
        raise CliError(str(e))


# ---------------------------------------------------------------- check / explain

def cmd_check(args) -> int:
    from xdpguard.compiler import compile_policy, find_unreachable
    policy = _policy(args.policy)
    tables = compile_policy(policy)
    warnings = policy.warnings + find_unreachable(policy)
    s = tables.summary()
    v4 = sum(1 for p in _all_prefixes(policy) if p.family == 4)
    v6 = sum(1 for p in _all_prefixes(policy) if p.family == 6)
    summary = {"policy": policy.name, "default": policy.default, "rules": len(policy.rules),
               "sets": len(policy.sets), "prefixes_v4": v4, "prefixes_v6": v6,
               "maps": {"lpm4": s["lpm4_entries"], "lpm6": s["lpm6_entries"], "vecs": s["vectors"],
                        "rules": s["rules"], "port_classes": s["port_classes"]},
               "vector_words": s["vector_words"],
               "mitigation": policy.mitigation.enabled,
               "valid": True, "warnings": warnings}
    if args.json:
        emit_json(summary)
        return EXIT_OK
    print(f"{args.policy}: valid policy '{policy.name}' (default {policy.default})")
    print(f"  rules {len(policy.rules)}, sets {len(policy.sets)}, prefixes v4 {v4}, v6 {v6}")
    print(f"  map entries: lpm4 {s['lpm4_entries']}, lpm6 {s['lpm6_entries']}, "
          f"vectors {s['vectors']} x {s['vector_words']} words, rules {s['rules']}, "
          f"port classes {s['port_classes']}")
    for w in warnings:
        print(f"warning: {w}")
    return EXIT_OK


def _all_prefixes(policy):
    seen = set()
    for r in policy.rules:
        for ps in (r.src, r.dst):
            for p in ps or ():
                seen.add(p)
    return seen


def _packet_fields(args) -> dict:
    d = {"src": args.src}
    for k in ("dst", "proto", "sport", "dport", "icmp_type"):
        v = getattr(args, k, None)
        if v is not None:
            d[k] = v
    if getattr(args, "tcp_flags", None):
        d["tcp_flags"] = args.tcp_flags
    if getattr(args, "vlan", None):
        d["vlan"] = args.vlan
    return d


def _parse_fields(d: dict, where: str):
    from xdpguard import packet
    try:
        frame = packet.from_fields(d)
    except ValueError as e:
        raise CliError(f"{where}: {e}")
    return frame, packet.parse(frame)


def cmd_explain(args) -> int:
    from xdpguard.compiler import compile_policy
    from xdpguard.lookup import decide
    policy = _policy(args.policy)
    tables = compile_policy(policy)
    _frame, pkt = _parse_fields(_packet_fields(args), "packet")
    dec = decide(tables, pkt.family, int(pkt.src), int(pkt.dst), pkt.l4, pkt.sport, pkt.dport)
    if args.json:
        emit_json(dec.as_json())
    else:
        who = f"rule '{dec.rule}' (rule {dec.index + 1})" if dec.rule else "no rule matched: policy default"
        print(f"{_describe(pkt)}: {who}: {dec.action} -> {dec.verdict}")
    return EXIT_OK


def _describe(pkt) -> str:
    from xdpguard.layout import C
    names = {C.XG_L4_TCP: "tcp", C.XG_L4_TCP_SYN: "tcp syn", C.XG_L4_UDP: "udp", C.XG_L4_ICMP: "icmp",
             C.XG_L4_ICMPV6: "icmpv6", C.XG_L4_ND: "icmpv6 nd", C.XG_L4_OTHER: f"proto {pkt.proto}"}
    ports = f" {pkt.sport} -> {pkt.dport}" if pkt.sport is not None else ""
    return f"{pkt.src} -> {pkt.dst} {names[pkt.l4]}{ports}"


# ---------------------------------------------------------------- test (real kernel)

def cmd_test(args) -> int:
    from xdpguard.compiler import compile_policy
    from xdpguard.layout import C
    from xdpguard.loader import TestRig
    from xdpguard.lookup import Decision
    policy = _policy(args.policy)
    tables = compile_policy(policy)
    if args.packets:
        try:
            with open(args.packets) as f:
                lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
        except OSError as e:
            raise CliError(f"{args.packets}: {e.strerror}")
        items = []
        for n, ln in lines:
            try:
                d = json.loads(ln)
            except json.JSONDecodeError as e:
                raise CliError(f"{args.packets}:{n}: not JSON: {e}")
            if not isinstance(d, dict):
                raise CliError(f"{args.packets}:{n}: expected a JSON object")
            count = d.pop("count", 1)
            if not isinstance(count, int) or count < 1 or count > 10_000_000:
                raise CliError(f"{args.packets}:{n}: count must be an integer 1..10000000")
            items.append((_parse_fields(d, f"{args.packets}:{n}")[0], count))
    else:
        if not args.src:
            raise CliError("test needs --src ADDR or --packets FILE")
        items = [(_parse_fields(_packet_fields(args), "packet")[0], args.count)]

    rig = TestRig(tables)
    names = {0: "allow", 1: "deny", 2: "limit"}
    try:
        for frame, count in items:
            before = None
            res = rig.run(frame, repeat=count) if count == 1 else None
            if count > 1:
                slot_probe = rig.run(frame)       # find the slot, then measure the rest
                before = rig.counter(slot_probe["slot"]) if slot_probe["slot"] != 0xFFFFFFFF else None
                res = rig.run(frame, repeat=count - 1)
                res["first"] = slot_probe
            out = _test_result(rig, tables, res, names, C, Decision)
            if count > 1:
                after = rig.counter(res["slot"]) if res["slot"] != 0xFFFFFFFF else None
                first_dropped = res["first"]["retval"] == 1
                if before and after:
                    out["passed"] = (after["packets"] - after["dropped_packets"]) - (before["packets"] - before["dropped_packets"]) + (0 if first_dropped else 1)
                    out["dropped"] = after["dropped_packets"] - before["dropped_packets"] + (1 if first_dropped else 0)
            if args.json:
                emit_json(out)
            else:
                extra = f" (passed {out['passed']}, dropped {out['dropped']} of {count})" if "passed" in out else ""
                print(f"{out['rule'] or '-'}: {out['action']} -> {out['verdict']} [kernel: {out['result']}]{extra}")
    finally:
        rig.close()
    return EXIT_OK


def _test_result(rig, tables, res, names, C, Decision) -> dict:
    result = "drop" if res["retval"] == 1 else "pass"
    slot = res["slot"]
    if slot == 0xFFFFFFFF:
        return {"rule": None, "action": "allow", "verdict": "pass", "result": result, "reason": "non-ip"}
    if res["rule"] is not None:
        rec = tables.rules[res["rule"]]
        verdict = {0: "pass", 1: "drop", 2: "limit"}[rec.action]
        return {"rule": rec.name, "action": names[rec.action], "verdict": verdict, "result": result}
    if slot == C.XG_SLOT_MALFORMED:
        return {"rule": None, "action": "deny", "verdict": "drop", "result": result, "reason": "malformed"}
    if slot == C.XG_SLOT_BAN:
        return {"rule": None, "action": "deny", "verdict": "drop", "result": result, "reason": "ban"}
    if slot == C.XG_SLOT_ND:
        return {"rule": None, "action": "allow", "verdict": "pass", "result": result, "reason": "nd"}
    act = names[tables.default_action]
    return {"rule": None, "action": act, "verdict": "pass" if act == "allow" else "drop", "result": result}


# ---------------------------------------------------------------- apply / detach

def cmd_apply(args) -> int:
    from xdpguard import loader, safety
    from xdpguard.compiler import compile_policy
    _check_names(args)
    policy = _policy(args.policy)
    _warn(policy)
    tables = compile_policy(policy)
    if not args.dry_run:
        problems = safety.lockouts(policy, tables, _ns(args))
        if problems and not args.force:
            raise CliError("refusing to apply (lockout guard): " + "; ".join(problems)
                           + ". Fix the policy or use --force.")
        for p in problems:
            print(f"warning: --force: {p}", file=sys.stderr)
    log = (lambda m: None) if args.json else print
    rec = loader.apply(policy, tables, args.iface, netns=_ns(args), mode=args.mode,
                       dry_run=args.dry_run, force=args.force, log=log)
    outcome = None
    if args.confirm and not args.dry_run:
        outcome = _await_confirm(args, rec, log)
    if args.json:
        emit_json({"iface": args.iface, "netns": args.netns or "host", "policy": policy.name,
                   "sha256": policy.sha256, "dry_run": args.dry_run,
                   "mode": rec.get("mode"), "prog_id": rec.get("prog_id"),
                   **({"confirm": outcome} if outcome else {})})
    return EXIT_NOT_CONFIRMED if outcome == "rolled_back" else EXIT_OK


def _await_confirm(args, rec, log) -> str:
    """Arm the rollback timer, then wait for `xdpguard confirm` (or not)."""
    from xdpguard import pins, safety
    directory = pins.iface_dir(_ns(args), args.iface)
    token = rec["policy"]["applied_at"]
    deadline = time.time() + args.confirm
    with pins.locked():
        rec = pins.read_record(directory)
        rec["confirm"] = {"deadline": deadline}
        pins.update_record(directory, rec)
    safety.start_timer(args.iface, _ns(args), token, deadline)
    log(f"{args.iface}: waiting {args.confirm:g}s for 'xdpguard confirm --iface {args.iface}"
        f"{' --netns ' + args.netns if args.netns else ''}'; otherwise the previous policy comes back")
    while time.time() < deadline + 3:
        cur = pins.read_record(directory)
        if cur and cur["policy"]["applied_at"] == token and "confirm" not in cur:
            log(f"{args.iface}: confirmed")
            return "confirmed"
        if not cur or cur["policy"]["applied_at"] != token:
            what = f"policy '{cur['policy']['name']}' restored" if cur else "detached (no previous policy)"
            log(f"{args.iface}: not confirmed in time: {what}")
            return "rolled_back"
        time.sleep(0.2)
    raise CliError(f"{args.iface}: the rollback timer did not act; check 'xdpguard status'", EXIT_SYSTEM)


def cmd_detach(args) -> int:
    from xdpguard import loader
    _check_names(args)
    loader.detach(args.iface, netns=_ns(args), log=(lambda m: None) if args.json else print)
    if args.json:
        emit_json({"iface": args.iface, "netns": args.netns or "host", "detached": True})
    return EXIT_OK


# ---------------------------------------------------------------- status / stats

def cmd_status(args) -> int:
    from xdpguard import pins, stats
    rows = []
    for _ns_name, _ifc, d in stats.select(args.netns, getattr(args, "iface", None)):
        rec = pins.read_record(d)
        rows.append(stats.read_status(d, rec))
    if args.json:
        emit_json({"schema_version": stats.SCHEMA_VERSION, "interfaces": rows})
        return EXIT_OK
    if not rows:
        print("xdpguard is not applied on any interface")
        return EXIT_OK
    for s in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["applied_at"]))
        state = "attached" if s["attached"] else "NOT ATTACHED (pins only)"
        print(f"{s['netns']}/{s['iface']}: {state}, {s['mode']} mode, program id {s['prog_id']}")
        print(f"  policy '{s['policy']}' sha256 {s['sha256'][:16]}... applied {when} from {s['source']}")
        if s.get("confirm_deadline"):
            left = s["confirm_deadline"] - time.time()
            print(f"  PENDING CONFIRMATION: rolls back in {max(0, left):.0f}s unless 'xdpguard confirm' runs")
        if s.get("probes"):
            print(f"  probes: {s['probes']}")
        mrows = [[n, "-" if m["entries"] is None else m["entries"], m["capacity"]] for n, m in s["maps"].items()]
        print("  " + table(["map", "entries", "capacity"], mrows, right={1, 2}).replace("\n", "\n  "))
    return EXIT_OK


def _stats_rows(snap, prev=None, dt=None):
    rows = []
    prev_by = {r["rule"]: r for r in prev["rules"]} if prev else {}
    # Fixed slots that only drop: (row name, key of the stats snapshot).
    drops = (("(bans)", "bans"), ("(malformed)", "malformed"), ("(new-source overflow)", "new_source_overflow"))
    for r in snap["rules"] + [{"rule": name, "action": "deny", "packets": snap[key]["packets"],
                               "bytes": snap[key]["bytes"], "dropped_packets": snap[key]["packets"],
                               "dropped_bytes": snap[key]["bytes"]} for name, key in drops]:
        row = [r["rule"], r["action"], r["packets"], r["bytes"], r["dropped_packets"], r["dropped_bytes"]]
        if prev is not None:
            p = prev_by.get(r["rule"]) or {}
            for name, key in drops:
                if r["rule"] == name:
                    p = {"packets": prev[key]["packets"], "dropped_packets": prev[key]["packets"]}
            row += [round((r["packets"] - p.get("packets", 0)) / dt), round((r["dropped_packets"] - p.get("dropped_packets", 0)) / dt)]
        rows.append(row)
    return rows


def cmd_stats(args) -> int:
    from xdpguard import pins, stats
    _check_names(args)
    targets = stats.select(args.netns, args.iface)
    if not targets:
        where = f" on {args.iface}" if args.iface else ""
        raise CliError(f"xdpguard is not applied{where} (see 'xdpguard status')")
    records = {d: pins.read_record(d) for _n, _i, d in targets}
    prev = {}
    t_prev = None
    while True:
        now = time.monotonic()
        snaps = {d: stats.read_stats(d, records[d]) for d in records}
        if args.json:
            for d, s in snaps.items():
                if t_prev is not None:
                    dt = now - t_prev
                    pmap = {r["rule"]: r for r in prev[d]["rules"]}
                    for r in s["rules"]:
                        p = pmap.get(r["rule"], {})
                        r["pps"] = (r["packets"] - p.get("packets", 0)) / dt
                        r["dropped_pps"] = (r["dropped_packets"] - p.get("dropped_packets", 0)) / dt
                emit_json(s)
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            for d, s in snaps.items():
                print(f"{s['netns']}/{s['iface']}: policy '{s['policy']}'")
                hdr = ["rule", "action", "packets", "bytes", "dropped", "dropped_bytes"]
                if t_prev is not None:
                    hdr += ["pps", "drop_pps"]
                    rows = _stats_rows(s, prev[d], now - t_prev)
                else:
                    rows = _stats_rows(s)
                print(table(hdr, rows, right=set(range(2, len(hdr)))))
            sys.stdout.flush()
        if not args.watch:
            return EXIT_OK
        prev, t_prev = snaps, now
        time.sleep(args.watch)


# ---------------------------------------------------------------- parser

EPILOGS = {
    "check": """examples:
  xdpguard check policies/shared-web-host.toml
  xdpguard check policy.toml --json""",
    "explain": """examples:
  xdpguard explain policy.toml --src 203.0.113.9 --proto tcp --dport 22
  xdpguard explain policy.toml --src 2001:db8::1 --proto udp --sport 53 --dport 4444 --json""",
    "apply": """examples:
  xdpguard apply policy.toml --iface eth1
  xdpguard apply policy.toml --iface veth0 --netns lab --mode generic
  xdpguard apply policy.toml --iface eth1 --dry-run
  xdpguard apply policy.toml --iface eth0 --confirm 60   # then: xdpguard confirm --iface eth0""",
    "detach": """examples:
  xdpguard detach --iface eth1
  xdpguard detach --iface veth0 --netns lab""",
    "status": """examples:
  xdpguard status
  xdpguard status --json""",
    "stats": """examples:
  xdpguard stats
  xdpguard stats --iface eth1 --watch 1
  xdpguard stats --iface veth0 --netns lab --json""",
    "test": """examples:
  xdpguard test policy.toml --src 192.0.2.9 --proto tcp --dport 22 --tcp-flags syn
  xdpguard test policy.toml --src 198.51.100.1 --dport 80 --count 1000 --json
  xdpguard test policy.toml --packets packets.jsonl --json
packet lines: {"src": "10.0.0.1", "dst": "10.0.0.2", "proto": "tcp", "sport": 1234,
               "dport": 80, "tcp_flags": "syn", "vlan": [100], "count": 1}""",
}


def _add_packet_args(p, src_required=True) -> None:
    p.add_argument("--src", required=src_required, help="source address")
    p.add_argument("--dst", help="destination address (default 198.51.100.1 / 2001:db8::1)")
    p.add_argument("--proto", help="tcp (default), udp, icmp, icmpv6 or a number")
    p.add_argument("--sport", type=int, help="source port (tcp/udp; default 40000)")
    p.add_argument("--dport", type=int, help="destination port (tcp/udp; default 80)")
    p.add_argument("--tcp-flags", choices=["syn"], help="syn: a new connection (SYN without ACK)")
    p.add_argument("--icmp-type", type=int, help="ICMP / ICMPv6 type")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="xdpguard",
        description="XDP access control and rate limiting for shared hosts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 success, 1 system failure, 2 invalid policy or usage,\n"
               "3 apply --confirm not confirmed (previous policy restored)\n"
               "see 'xdpguard COMMAND --help' for examples")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("check", cmd_check, "validate and compile a policy; print a summary and warnings")
    p.add_argument("policy")

    p = add("explain", cmd_explain, "which rule decides a packet, from the compiled tables")
    p.add_argument("policy")
    _add_packet_args(p)

    p = add("test", cmd_test, "run crafted packets through the real XDP program (BPF_PROG_TEST_RUN)")
    p.add_argument("policy")
    _add_packet_args(p, src_required=False)
    p.add_argument("--vlan", type=int, action="append", help="VLAN id (repeat for QinQ, outer first)")
    p.add_argument("--count", type=int, default=1, help="send the packet this many times")
    p.add_argument("--packets", help="JSON lines file, one packet per line")

    p = add("apply", cmd_apply, "compile a policy and attach it to an interface")
    p.add_argument("policy")
    p.add_argument("--iface", required=True)
    p.add_argument("--netns", help="network namespace name (/run/netns/NAME)")
    p.add_argument("--mode", choices=["auto", "native", "generic"], default="auto")
    p.add_argument("--dry-run", action="store_true", help="compile and load, do not attach")
    p.add_argument("--force", action="store_true",
                   help="replace a foreign XDP program; apply despite the lockout guard")
    p.add_argument("--confirm", type=float, metavar="SECONDS",
                   help="roll back unless 'xdpguard confirm' comes within SECONDS")

    p = add("detach", cmd_detach, "remove xdpguard from an interface (program and pins)")
    p.add_argument("--iface", required=True)
    p.add_argument("--netns")

    p = add("status", cmd_status, "interfaces xdpguard runs on, policy, maps")
    p.add_argument("--netns")

    p = add("stats", cmd_stats, "per-rule packet, byte and drop counters")
    p.add_argument("--iface")
    p.add_argument("--netns")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS with rates")

    for extra in _extensions():
        extra(sub, add)
    return ap


def _extensions():
    """Commands that live in their own modules (daemon, bans, ops)."""
    out = []
    for modname in ("xdpguard.cli_mitigation", "xdpguard.cli_safety", "xdpguard.cli_ops"):
        try:
            mod = __import__(modname, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        out.append(mod.register)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from xdpguard.errors import LoadError, NetnsError, UsageError
    from xdpguard.pins import PinError
    from xdpguard.policy import PolicyError
    try:
        return args.func(args)
    except PolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (UsageError, NetnsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (LoadError, PinError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SYSTEM
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
