"""xdpguard command line: every command is a row of COMMANDS (name,
handler, help, arguments); the handlers of the feedback loop, of safe
operation and of show / apply --diff live in cli_mitigation, cli_safety and
cli_compare, what they share in cliutil.

Exit status: 0 success; 1 system failure (kernel, BPF, missing tools; test:
a packet missed its expect; show, apply --diff: no copy of the running policy);
2 invalid policy or usage (nothing running was changed); 3 `apply --confirm`
was not confirmed in time and the previous policy was restored.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from xdpguard import cli_compare, cli_mitigation, cli_safety
from xdpguard.cliutil import (EXIT_NOT_CONFIRMED, EXIT_OK, EXIT_SYSTEM, EXIT_USAGE, CliError, Numbers,
                              applied, check_names, colour, duration_type, emit_json, host_port, int_type,
                              interruptible, load_policy, netns_of, new_frame, paint, rfc3339, still_applied, table, warn)

# `test`: packets a line of --packets or --count may send (BPF_PROG_TEST_RUN
# repeats in the kernel: a bound keeps one call short).
MAX_COUNT = 10_000_000
# `test`: a packet did not get its expect (1 as diff(1) and cmp(1) say "differs").
EXIT_MISMATCH = 1
# Refresh intervals of `stats --watch` and `top`: below this they only burn CPU.
LEAST_REFRESH = 0.1


# ---------------------------------------------------------------- check / explain

def cmd_check(args) -> int:
    from xdpguard.compiler import compile_policy, find_unreachable
    from xdpguard.loader import describe_memory, policy_map_memory
    from xdpguard.policy import PolicyError, PrefixSet
    try:
        policy = load_policy(args.policy)
        tables = compile_policy(policy)
    except PolicyError as e:
        if not args.json:
            raise
        error = e.as_dict()
        error["file"] = error["file"] or str(args.policy)
        emit_json({"valid": False, "errors": [error]})
        return EXIT_USAGE
    warnings = policy.warnings + find_unreachable(policy)
    if policy.protect:
        # apply's lockout guard, for the protect entries only, to this
        # host's addresses: apply refuses what is warned of here.
        from xdpguard import safety
        guard = safety.lockouts(policy, tables, None, protect_only=True)
        warnings += [f"{policy.source}: [policy] protect: {p} (apply refuses it without --force)"
                     for p in guard.problems]
    if tables.syncookies:
        # The kernel decides (a probe program); loading one needs root.
        if os.geteuid() == 0:
            from xdpguard import syncookies
            syncookies.require()
        else:
            warnings.append(f"{policy.source}: syncookies: the kernel's support was not probed (needs root)")
    s = tables.summary()
    mem = policy_map_memory(tables)
    listed = PrefixSet.union(ps for r in policy.rules for ps in (r.src, r.dst) if ps is not None)
    v4, v6 = len(listed.keys(4)), len(listed.keys(6))
    summary = {"policy": policy.name, "default": policy.default, "rules": len(policy.rules),
               "sets": len(policy.sets), "prefixes_v4": v4, "prefixes_v6": v6,
               "maps": {"lpm4": s["lpm4_entries"], "lpm6": s["lpm6_entries"], "vecs": s["vectors"],
                        "rules": s["rules"], "port_classes": s["port_classes"]},
               "vector_words": s["vector_words"],
               "map_memory_bytes": sum(mem.values()), "map_memory": mem,
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
    print(f"  {describe_memory(mem)}")
    for w in warnings:
        print(f"warning: {w}")
    return EXIT_OK


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
    policy = load_policy(args.policy)
    tables = compile_policy(policy)
    _frame, pkt = _parse_fields(_packet_fields(args), "packet")
    dec = decide(tables, pkt.family, int(pkt.src), int(pkt.dst), pkt.l4, pkt.sport, pkt.dport)
    limit = _limit_of(policy.rules[dec.index]) if dec.index is not None and dec.action == "limit" else None
    if args.json:
        emit_json({**dec.as_json(), **({"limit": limit} if limit else {})})
    else:
        who = (f"rule '{dec.rule}' (rule {dec.index + 1})" if dec.rule
               else "rule 'default' (no rule matched: the policy default)" if dec.default
               else "no rule matched: IPv6 neighbour discovery passes")
        print(f"{_describe(pkt)}: {who}: {dec.action}{_describe_limit(limit) if limit else ''} -> {dec.verdict}")
    return EXIT_OK


def _limit_of(rule) -> dict:
    """A limit rule's rate, burst and scope as explain shows them (rates as
    written, and per second; bursts in the rate's unit)."""
    out = {"rate": rule.rate.text, "rate_per_second": rule.rate.per_second, "unit": rule.rate.unit,
           "burst": rule.burst, "per": rule.per}
    if rule.per == "source":
        out.update(prefix4=rule.prefix4, prefix6=rule.prefix6)
        if rule.new_sources is not None:
            out.update(new_sources=rule.new_sources.text, new_sources_burst=rule.new_sources_burst)
        if rule.rate_total is not None:
            out.update(rate_total=rule.rate_total.text, burst_total=rule.burst_total)
    return out


def _describe_limit(limit: dict) -> str:
    unit = "bytes" if limit["unit"] == "bytes" else "packets"
    text = f" {limit['rate']} burst {limit['burst']} {unit}"
    if limit["per"] == "rule":
        return text + " (one bucket for the rule)"
    text += f" per source (/{limit['prefix4']}, IPv6 /{limit['prefix6']})"
    if "new_sources" in limit:
        text += f", new sources {limit['new_sources']} burst {limit['new_sources_burst']}"
    if "rate_total" in limit:
        text += f", total {limit['rate_total']} burst {limit['burst_total']} {unit}"
    return text


def _describe(pkt) -> str:
    from xdpguard.layout import C
    names = {C.XG_L4_TCP: "tcp", C.XG_L4_TCP_SYN: "tcp syn", C.XG_L4_UDP: "udp", C.XG_L4_ICMP: "icmp",
             C.XG_L4_ICMPV6: "icmpv6", C.XG_L4_ND: "icmpv6 nd", C.XG_L4_OTHER: f"proto {pkt.proto}"}
    ports = f" {pkt.sport} -> {pkt.dport}" if pkt.sport is not None else ""
    return f"{pkt.src} -> {pkt.dst} {names[pkt.l4]}{ports}"


# ---------------------------------------------------------------- test (real kernel)

def cmd_test(args) -> int:
    from xdpguard.bpfsys import XDP_DROP
    from xdpguard.compiler import compile_policy
    from xdpguard.layout import C
    from xdpguard.loader import TestRig
    policy = load_policy(args.policy)
    tables = compile_policy(policy)
    if args.packets:
        items = _read_packets(args.packets, {r.name for r in policy.rules})
    else:
        if not args.src:
            raise CliError("test needs --src ADDR or --packets FILE")
        fields = _packet_fields(args)
        items = [("packet", fields, _parse_fields(fields, "packet")[0], args.count, None)]

    rig = TestRig(tables)
    mismatches = 0
    try:
        for where, fields, frame, count, expect in items:
            res = rig.run(frame)
            if count > 1:
                # The first run finds the slot; its counter measures the rest.
                first_dropped = res.retval == XDP_DROP
                slot = res.counter_slot(rig.slots)
                before = rig.counter(slot) if slot != C.XG_NO_SLOT else None
                res = rig.run(frame, repeat=count - 1)
            out = {"packet": fields, **res.as_json(tables)}
            if count > 1 and before:
                after = rig.counter(slot)
                dropped = after["dropped_packets"] - before["dropped_packets"]
                out["passed"] = after["packets"] - before["packets"] - dropped + (not first_dropped)
                out["dropped"] = dropped + first_dropped
            missed = _missed(expect, out)
            if expect is not None:
                out["expect"], out["ok"] = expect, not missed
                mismatches += bool(missed)
            if args.json:
                emit_json(out)
            else:
                extra = f" (passed {out['passed']}, dropped {out['dropped']} of {count})" if "passed" in out else ""
                rule = out["rule"] or f"({out.get('cause') or out.get('reason')})"
                verdict = f"{rule}: {out['action']} -> {out['verdict']} [kernel: {out['result']}]{extra}"
                mark = f"  MISMATCH: expected {', '.join(missed)}" if missed else "  ok" if expect else ""
                print(f"{where} {json.dumps(fields)}: {verdict}{mark}")
    finally:
        rig.close()
    if mismatches:
        print(f"error: {mismatches} of {len(items)} packets did not get their expect", file=sys.stderr)
        return EXIT_MISMATCH
    return EXIT_OK


VERDICTS = ("pass", "drop", "limit")


def _read_packets(path: str, rules: set[str]) -> list[tuple]:
    """The lines of a --packets file: (where, packet fields as written,
    frame, count, expect as {"verdict", "rule"} or None)."""
    try:
        with open(path) as f:
            lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}")
    items = []
    for n, ln in lines:
        where = f"{path}:{n}"
        try:
            d = json.loads(ln)
        except json.JSONDecodeError as e:
            raise CliError(f"{where}: not JSON: {e}")
        if not isinstance(d, dict):
            raise CliError(f"{where}: expected a JSON object")
        fields = dict(d)
        count = d.pop("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
            raise CliError(f"{where}: count must be an integer 1..{MAX_COUNT}")
        expect = _expect(d.pop("expect", None), where, rules) if "expect" in d else None
        items.append((where, fields, _parse_fields(d, where)[0], count, expect))
    return items


def _expect(value, where: str, rules: set[str]) -> dict:
    """A packet's expect: "pass" | "drop" | "limit", or {"verdict": ...,
    "rule": NAME} with either or both; a rule the policy lacks is a typo,
    refused rather than a mismatch on every run."""
    from xdpguard.lookup import DEFAULT
    want = {"verdict": value} if isinstance(value, str) else value
    if not isinstance(want, dict) or not want or set(want) - {"verdict", "rule"}:
        raise CliError(f"{where}: expect {json.dumps(value)} is not valid (expected \"pass\", \"drop\", "
                       f"\"limit\" or {{\"verdict\": ..., \"rule\": NAME}})")
    if "verdict" in want and want["verdict"] not in VERDICTS:
        raise CliError(f"{where}: expect verdict {json.dumps(want['verdict'])} is not valid "
                       f"(expected \"pass\", \"drop\" or \"limit\")")
    if "rule" in want and want["rule"] not in rules | {DEFAULT}:
        raise CliError(f"{where}: expect rule {json.dumps(want['rule'])} is not a rule of the policy "
                       f"(rules: {', '.join(sorted(rules)) or 'none'}, or \"{DEFAULT}\")")
    return want


def _missed(expect: dict | None, out: dict) -> list[str]:
    """What of expect the packet did not get, each as "verdict drop (got pass)"."""
    return [f"{k} {expect[k]} (got {out[k]})" for k in ("verdict", "rule")
            if expect and k in expect and out[k] != expect[k]]


# ---------------------------------------------------------------- apply / detach

def cmd_apply(args) -> int:
    from xdpguard import loader, safety
    from xdpguard.compiler import compile_policy
    check_names(args)
    if args.diff and (args.confirm or args.dry_run):
        raise CliError(f"--diff applies nothing: it takes no {'--confirm' if args.confirm else '--dry-run'}")
    policy = load_policy(args.policy)
    warn(policy)
    # Compared before the compile: the running policy's sets are freed
    # before the maps' memory is taken.
    running, changes = cli_compare.compare(netns_of(args), args.iface, policy, strict=args.diff)
    tables = compile_policy(policy)
    if args.diff:
        guard = safety.lockouts(policy, tables, netns_of(args))
        cli_compare.print_diff(args, policy, running, changes, guard)
        return EXIT_OK
    if not args.dry_run:
        guard = safety.lockouts(policy, tables, netns_of(args))
        for u in guard.unchecked:
            print(f"warning: lockout guard: {u}", file=sys.stderr)
        if guard.problems and not args.force:
            raise CliError("refusing to apply (lockout guard): " + "; ".join(guard.problems)
                           + ". Fix the policy or use --force.")
        for p in guard.problems:
            print(f"warning: --force: {p}", file=sys.stderr)
    log = (lambda m: None) if args.json else print
    mem: dict[str, int] = {}
    started = time.time()
    rec = loader.apply(policy, tables, args.iface, netns=netns_of(args), mode=args.mode,
                       dry_run=args.dry_run, force=args.force, log=log, memory=mem.update)
    # The running record comes back untouched for a policy already running
    # (same sha256): applied before this apply started.
    unchanged = rec is not None and rec.policy.applied_at < started
    if changes is not None:
        log(f"{args.iface}: {'would change (dry run): ' if args.dry_run else ''}{changes.summary()}")
    outcome = None
    if args.confirm and not args.dry_run and not unchanged:
        outcome = _await_confirm(args, rec, log)
    if args.json:
        emit_json({"iface": args.iface, "netns": args.netns or "host", "policy": policy.name,
                   "sha256": policy.sha256, "dry_run": args.dry_run,
                   "mode": rec.mode if rec else None, "prog_id": rec.prog_id if rec else None,
                   "map_memory_bytes": sum(mem.values()), "map_memory": mem, "unchanged": unchanged,
                   "changes": None if changes is None else changes.as_json(),
                   **({"confirm": outcome} if outcome else {})})
    return EXIT_NOT_CONFIRMED if outcome == "rolled_back" else EXIT_OK


def _await_confirm(args, rec, log) -> str:
    """Arm the rollback timer, then wait for `xdpguard confirm` (or not)."""
    from dataclasses import replace
    from xdpguard import pins, safety
    directory = pins.iface_dir(netns_of(args), args.iface)
    token = rec.policy.applied_at
    deadline = time.time() + args.confirm
    pins.modify_record(directory, lambda r: replace(r, confirm=pins.Confirm(deadline)))
    safety.start_timer(args.iface, netns_of(args), token, deadline)
    log(f"{args.iface}: waiting {args.confirm:g}s (until {rfc3339(deadline)}) for "
        f"'xdpguard confirm --iface {args.iface}"
        f"{' --netns ' + args.netns if args.netns else ''}'; otherwise the previous policy comes back")
    while time.time() < deadline + 3:
        cur = pins.read_record(directory)
        if cur and cur.policy.applied_at == token and cur.confirm is None:
            log(f"{args.iface}: confirmed")
            return "confirmed"
        if not cur or cur.policy.applied_at != token:
            what = f"policy '{cur.policy.name}' restored" if cur else "detached (no previous policy)"
            log(f"{args.iface}: not confirmed in time: {what}")
            return "rolled_back"
        time.sleep(0.2)
    raise CliError(f"{args.iface}: the rollback timer did not act; check 'xdpguard status'", EXIT_SYSTEM)


def cmd_detach(args) -> int:
    from xdpguard import loader
    check_names(args)
    loader.detach(args.iface, netns=netns_of(args), log=(lambda m: None) if args.json else print)
    if args.json:
        emit_json({"iface": args.iface, "netns": args.netns or "host", "detached": True})
    return EXIT_OK


# ---------------------------------------------------------------- status / stats

def cmd_status(args) -> int:
    from xdpguard import pins, stats
    rows = []
    for _ns_name, _ifc, d in stats.select(args.netns, getattr(args, "iface", None)):
        try:
            rec = pins.read_record(d)
        except pins.PinError as e:
            # One unreadable record (another version's) hides no other.
            print(f"warning: {e}", file=sys.stderr)
            continue
        rows.append(stats.read_status(d, rec))
    for d in pins.unrecorded():
        print(f"warning: {d}: pins without a record ('meta' removed); 'xdpguard detach' "
              f"removes them, 'xdpguard apply' replaces them", file=sys.stderr)
    if args.json:
        emit_json({"schema_version": stats.SCHEMA_VERSION, "interfaces": rows})
        return EXIT_OK
    if not rows:
        print("xdpguard is not applied on any interface")
        return EXIT_OK
    num = Numbers(args.exact)
    for s in rows:
        state = "attached" if s["attached"] else "NOT ATTACHED (pins only)"
        if s["netns_gone"]:
            state = (f"NETWORK NAMESPACE GONE (pins only; 'xdpguard detach --iface {s['iface']} "
                     f"--netns {s['netns']}' removes them)")
        print(f"{s['netns']}/{s['iface']}: {state}, {s['mode']} mode, program id {s['prog_id']}")
        print(f"  policy '{s['policy']}' sha256 {s['sha256'][:16]}... applied {s['applied_at_rfc3339']} "
              f"from {s['source']}")
        if s.get("confirm_deadline"):
            left = s["confirm_deadline"] - time.time()
            print(f"  PENDING CONFIRMATION: rolls back in {max(0, left):.0f}s "
                  f"(at {s['confirm_deadline_rfc3339']}) unless 'xdpguard confirm' runs")
        if s["history"]:
            print("  history (rollback goes to the first): " + ", ".join(
                f"'{h['policy']}' {h['sha256'][:8]} {h['applied_at_rfc3339']}"
                for h in s["history"]))
        lit = colour()
        pf = s["policy_file"]
        if pf["changed"] is None:
            print(f"  policy file: {paint('cannot be compared', 'yellow', lit)}: {pf['error']}")
        elif pf["changed"]:
            print(f"  policy file: {paint('CHANGED since apply', 'yellow', lit)} (now sha256 {pf['sha256'][:16]}...; "
                  f"'xdpguard apply' runs it)")
        else:
            print("  policy file: unchanged since apply")
        w = s["watch"]
        print(f"  watch: running (PID {w['pid']}), probes {s['probes'] or 'none'}" if w["running"]
              else "  watch: not running")
        sc = s.get("syncookies")
        if sc:
            from xdpguard.syncookies import ports_text as ranges
            changed = ", ".join(f"{k}={v} (was {sc['sysctls_before'].get(k, '?')})" for k, v in sc["sysctls"].items())
            print(f"  syncookies: tcp ports {ranges(sc['ports']) or '-'}; nftables table inet {sc['table']}"
                  f"{'' if sc['table_present'] else ' MISSING'}; {changed}")
            if sc.get("auto_ports"):
                on = [f"{o['port']}" + ("" if o["since"] is None else
                                        f" (SYN {o['syn_rate']}/s over {o['threshold']}/s since "
                                        f"{o['since_rfc3339']})")
                      for o in sc["auto_on"]]
                print(f"  syncookies auto (watch): tcp ports {ranges(sc['auto_ports'])}; on: "
                      + (", ".join(on) or "none"))
        print("  " + table(["in use", "entries", "capacity"], _usage_rows(s["usage"], num),
                           right={1, 2}).replace("\n", "\n  "))
    return EXIT_OK


# status: what a policy and the feedback loop fill, by the names operators use.
USAGE_NAMES = (("rules", "rules"), ("sets_v4", "set prefixes v4"), ("sets_v6", "set prefixes v6"),
               ("bans", "bans (max_bans)"), ("buckets", "rate-limit buckets (per source)"),
               ("sources", "sources counted ([mitigation])"))


def _usage_rows(usage: dict, num: Numbers) -> list[list]:
    rows = []
    for key, name in USAGE_NAMES:
        u = usage.get(key)
        if u is None:
            continue
        rows.append([name, "-" if u["entries"] is None else num.count(u["entries"]),
                     "sized to the policy" if u["capacity"] is None else num.count(u["capacity"])])
    return rows


def _stats_rows(snap, num: Numbers, prev=None, dt=None) -> list[list]:
    """stats' rows: counts (and, between two snapshots, rates) as num shows them."""
    from xdpguard import stats
    rows = []
    prev_by = {r["rule"]: r for r in stats.all_rows(prev)} if prev else {}
    for r in stats.all_rows(snap):
        row = [r["rule"], r["action"], num.count(r["packets"]), num.size(r["bytes"]),
               num.count(r["dropped_packets"]), num.size(r["dropped_bytes"])]
        if prev is not None:
            p = prev_by.get(r["rule"]) or {}
            row += [num.rate((r["packets"] - p.get("packets", 0)) / dt),
                    num.bits((r["bytes"] - p.get("bytes", 0)) / dt),
                    num.rate((r["dropped_packets"] - p.get("dropped_packets", 0)) / dt)]
        rows.append(row)
    return rows


def cmd_stats(args) -> int:
    from xdpguard import stats
    if args.watch:
        interruptible()
    check_names(args)
    records = dict(applied(args))
    num = Numbers(args.exact)
    prev = {}
    t_prev = None
    while True:
        now = time.monotonic()
        snaps = {}
        for d, rec in records.items():
            with still_applied(rec.netns, rec.iface):
                snaps[d] = stats.read_stats(d, rec)
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
                new_frame(t_prev is None)
            for d, s in snaps.items():
                print(paint(f"{s['netns']}/{s['iface']}: policy '{s['policy']}'", "bold", colour()))
                hdr = ["rule", "action", "packets", "bytes", "dropped", "dropped_bytes"]
                if t_prev is not None:
                    hdr += ["pps", "bit/s", "drop/s"]
                    rows = _stats_rows(s, num, prev[d], now - t_prev)
                else:
                    rows = _stats_rows(s, num)
                print(table(hdr, rows, right=set(range(2, len(hdr)))))
            sys.stdout.flush()
        if not args.watch:
            return EXIT_OK
        prev, t_prev = snaps, now
        time.sleep(args.watch)


# ---------------------------------------------------------------- parser

def cmd_doctor(args) -> int:
    from xdpguard.doctor import cmd_doctor    # imported when it runs: --help stays fast
    return cmd_doctor(args)


# `completion`: what TAB offers for an argument's value, by its dest (files
# for policies and packet or ban lists; the names /sys/class/net and
# /run/netns hold, as `ip link` and `ip netns` list them).
COMPLETE_FILES = {"policy", "packets", "from_file"}
COMPLETE_BASH = r'''
_xdpguard_ifaces() { compgen -W "$(ls /sys/class/net 2>/dev/null)" -- "$1"; }
_xdpguard_netns() { compgen -W "host $(ls /run/netns 2>/dev/null)" -- "$1"; }
'''


def cmd_completion(args) -> int:
    """The shell's completion script, made from build_parser's tree: every
    command and flag of COMMANDS, with no second list to keep in step."""
    try:
        import shtab
    except ImportError:
        raise CliError("completion needs the Python package shtab (pip install shtab)", EXIT_SYSTEM)
    parser = build_parser()
    named = {"iface": {"bash": "_xdpguard_ifaces"}, "netns": {"bash": "_xdpguard_netns"}}
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in subs.choices.values():
        for a in p._actions:
            if a.dest in COMPLETE_FILES:
                a.complete = shtab.FILE
            elif a.dest in named:
                a.complete = named[a.dest]
    script = shtab.complete(parser, shell=args.shell, preamble=COMPLETE_BASH)
    if args.json:
        emit_json({"shell": args.shell, "script": script})
    else:
        print(script)
    return EXIT_OK


def arg(*flags, **kw) -> tuple:
    """One argument of a command: add_argument's own parameters."""
    return flags, kw


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    args: tuple = ()


NETNS = arg("--netns")
# Tables show numbers at a glance (10.8k, 570 KiB, 4.6 Mbit/s); --json is always exact.
EXACT = arg("--exact", action="store_true", help="exact integers instead of 10.8k, 570 KiB, 4.6 Mbit/s")
PACKET = (arg("--dst", help="destination address (default 198.51.100.1 / 2001:db8::1)"),
          arg("--proto", help="tcp (default), udp, icmp, icmpv6 or a number"),
          arg("--sport", type=int, help="source port (tcp/udp; default 40000)"),
          arg("--dport", type=int, help="destination port (tcp/udp; default 80)"),
          arg("--tcp-flags", choices=["syn"], help="syn: a new connection (SYN without ACK)"),
          arg("--icmp-type", type=int, help="ICMP / ICMPv6 type"))

# Short forms of long flags, given wherever the long one exists (nft/iptables
# habits); argparse refuses a short flag that a command already uses for
# something else, so a collision fails every command at once, in every test.
SHORT = {"--json": "-j", "--netns": "-n", "--iface": "-i"}

# Where ban and unban act: one interface, unless --all says every one.
BAN_SCOPE = (arg("--iface", help="the interface (needed where xdpguard runs on more than one)"),
             arg("--netns", help="network namespace of --iface"),
             arg("--all", action="store_true", help="every interface --iface/--netns select (default: all)"))

# Every command, in the order of `xdpguard --help`; each also gets --json.
COMMANDS = (
    Command("check", cmd_check, "validate and compile a policy; print a summary and warnings",
            (arg("policy"),)),
    Command("explain", cmd_explain, "which rule decides a packet, from the compiled tables",
            (arg("policy"), arg("--src", required=True, help="source address"), *PACKET)),
    Command("test", cmd_test, "run crafted packets through the real XDP program (BPF_PROG_TEST_RUN)",
            (arg("policy"), arg("--src", required=False, help="source address"), *PACKET,
             arg("--vlan", type=int, action="append", help="VLAN id (repeat for QinQ, outer first)"),
             arg("--count", type=int_type(1, MAX_COUNT), default=1,
                 help=f"send the packet this many times (1..{MAX_COUNT})"),
             arg("--packets", help="JSON lines file, one packet per line"))),
    Command("apply", cmd_apply, "compile a policy and attach it to an interface",
            (arg("policy"), arg("--iface", required=True),
             arg("--netns", help="network namespace name (/run/netns/NAME)"),
             arg("--mode", choices=["auto", "native", "generic"], default="auto"),
             arg("--dry-run", action="store_true", help="compile and load, do not attach"),
             arg("--force", action="store_true",
                 help="replace a foreign XDP program; apply despite the lockout guard"),
             arg("--confirm", type=duration_type(), metavar="DURATION",
                 help="roll back unless 'xdpguard confirm' comes within DURATION (60, 90s, 10m)"),
             arg("--diff", action="store_true",
                 help="compile, print what would change against the running policy, apply nothing"))),
    Command("show", cli_compare.cmd_show,
            "print the running policy as applied (TOML), with its sha256, source and time",
            (arg("--iface", help="one interface (default: each xdpguard runs on)"), NETNS)),
    Command("detach", cmd_detach, "remove xdpguard from an interface (program and pins)",
            (arg("--iface", required=True), NETNS)),
    Command("status", cmd_status, "interfaces xdpguard runs on, policy, watch, what the policy fills",
            (NETNS, EXACT)),
    Command("stats", cmd_stats, "per-rule packet, byte and drop counters",
            (arg("--iface"), NETNS, EXACT,
             arg("--watch", type=duration_type(LEAST_REFRESH), metavar="DURATION",
                 help="refresh every DURATION (1, 500ms, 2s) with rates"))),
    Command("watch", cli_mitigation.cmd_watch, "mitigation daemon: ban sources over the [mitigation] thresholds; "
            "share bans with the [fleet], enforce [crowdsec] decisions",
            (arg("policy"), arg("--iface", required=True), NETNS,
             arg("--interval", default="1s", help="evaluation interval (default 1s)"),
             arg("--metrics", type=host_port, metavar="HOST:PORT", help="serve Prometheus metrics"))),
    Command("ban", cli_mitigation.cmd_ban, "ban an address or prefix at XDP",
            (arg("target", metavar="ADDR[/LEN]", nargs="?"),
             arg("--ttl", default="10m", help="ban duration: 10m, 1h30m, 1w ... (default 10m; 0 = no expiry)"),
             arg("--reason", help="free text shown by 'bans'"),
             arg("--from-file", metavar="FILE",
                 help="ban every line's 'ADDR[/LEN] [TTL [REASON]]' (or a 'bans --json' export)"),
             *BAN_SCOPE)),
    Command("unban", cli_mitigation.cmd_unban, "lift a ban at once",
            (arg("target", metavar="ADDR[/LEN]", nargs="?"), *BAN_SCOPE[:2],
             arg("--all", action="store_true",
                 help="every interface the filters select; without ADDR, every ban there"))),
    Command("bans", cli_mitigation.cmd_bans, "list bans: prefix, reason, remaining time, packets dropped",
            (arg("--iface"), NETNS, EXACT)),
    Command("top", cli_mitigation.cmd_top, "live view: top sources, destinations, bans, rule drop rates",
            (arg("--iface"), NETNS, EXACT, arg("--once", action="store_true", help="one snapshot, then exit"),
             arg("--interval", type=duration_type(LEAST_REFRESH), default=1.0,
                 help="refresh interval (default 1s; 500ms, 2s)"))),
    Command("confirm", cli_safety.cmd_confirm, "confirm a policy applied with --confirm (stops the rollback)",
            (arg("--iface", required=True), NETNS)),
    Command("rollback", cli_safety.cmd_rollback,
            "go back one step in the history of applied policies (again: one step further)",
            (arg("--iface", required=True), NETNS)),
    Command("log", cli_safety.cmd_log, "sampled dropped packets (rules with log = true)",
            (arg("--iface"), NETNS,
             arg("--last", type=int_type(0, 1_000_000), default=100, metavar="N",
                 help="print the last N events first (default 100; 0: none)"),
             arg("--follow", action="store_true", help="then keep printing new events"))),
    Command("doctor", cmd_doctor, "check that this machine can run xdpguard, and how to fix what is missing",
            (arg("--iface", help="also check native XDP support and foreign programs on this interface"),
             arg("--netns", help="network namespace of --iface (/run/netns/NAME)"))),
    Command("completion", cmd_completion, "print a shell completion script (make install installs bash's)",
            (arg("shell", choices=["bash"]),)),
)

EPILOGS = {
    "check": """examples:
  xdpguard check policies/shared-web-host.toml
  xdpguard check policy.toml --json       # invalid: {"valid": false, "errors": [...]}, exit 2
  xdpguard check policy.toml -j""",
    "explain": """examples:
  xdpguard explain policy.toml --src 203.0.113.9 --proto tcp --dport 22
  xdpguard explain policy.toml --src 2001:db8::1 --proto udp --sport 53 --dport 4444 --json""",
    "apply": """examples:
  xdpguard apply policy.toml --iface eth1
  xdpguard apply policy.toml --iface veth0 --netns lab --mode generic
  xdpguard apply policy.toml --iface eth1 --dry-run
  xdpguard apply policy.toml --iface eth0 --confirm 60   # then: xdpguard confirm --iface eth0
  xdpguard apply policy.toml -i veth0 -n lab --confirm 2m30s
  xdpguard apply new.toml --iface eth1 --diff            # what would change; applies nothing
  xdpguard apply new.toml -i veth0 -n lab --diff -j

--diff: exit 0 when the policy compiles (whether or not it differs), 2 when
it is invalid, 1 when the running policy cannot be read. Every apply prints
a one-line summary of the change (--json: "changes").""",
    "show": """examples:
  xdpguard show                          # each interface xdpguard runs on
  xdpguard show --iface eth1
  xdpguard show -i veth0 -n lab --json""",
    "detach": """examples:
  xdpguard detach --iface eth1
  xdpguard detach --iface veth0 --netns lab""",
    "status": """Numbers read at a glance (10.8k, 570 KiB); --exact for integers, --json always exact.

examples:
  xdpguard status
  xdpguard status --exact
  xdpguard status --json
  xdpguard status -n lab -j""",
    "stats": """Numbers read at a glance (10.8k packets, 570 KiB, 4.6 Mbit/s); --exact for
integers, --json always exact. --watch clears the screen only on a terminal.

examples:
  xdpguard stats
  xdpguard stats --exact
  xdpguard stats --iface eth1 --watch 1
  xdpguard stats -i eth1 --watch 500ms
  xdpguard stats --iface veth0 --netns lab --json
  xdpguard stats -i veth0 -n lab -j       # the same, short""",
    "test": """examples:
  xdpguard test policy.toml --src 192.0.2.9 --proto tcp --dport 22 --tcp-flags syn
  xdpguard test policy.toml --src 198.51.100.1 --dport 80 --count 1000 --json
  xdpguard test policy.toml --packets packets.jsonl --json
  xdpguard test new.toml --packets expected.jsonl       # exit 1: a packet missed its expect
packet lines: {"src": "10.0.0.1", "dst": "10.0.0.2", "proto": "tcp", "sport": 1234,
               "dport": 80, "tcp_flags": "syn", "vlan": [100], "count": 1}
  "expect": "pass" | "drop" | "limit", or {"verdict": ..., "rule": NAME or "default"}:
  exit 1 when a packet gets another verdict or rule""",
    "watch": """examples:
  xdpguard watch /etc/xdpguard/eth1.toml --iface eth1
  xdpguard watch policy.toml --iface veth0 --netns lab --interval 0.5s --json
  xdpguard watch policy.toml --iface eth1 --metrics 127.0.0.1:9101
  xdpguard watch fleet-only.toml --iface eth1    # [fleet] without [mitigation]: sync only""",
    "ban": """Where xdpguard runs on more than one interface, name one (--iface, with
--netns for a namespace) or say --all: a ban never reaches another
namespace by default.

--from-file lines: ADDR[/LEN] [TTL [REASON...]]; TTL as --ttl (0: no expiry),
both default to the command line's; '#' starts a comment line:
  203.0.113.7
  198.51.100.0/24 1h scanner from the abuse report
  2001:db8:bad::/48 0 by hand, permanent

examples:
  xdpguard ban 203.0.113.7 --ttl 10m --reason "credential stuffing"
  xdpguard ban 2001:db8:bad::/48 --iface eth1 --ttl 1h30m
  xdpguard ban 198.51.100.0/24 --iface eth0 --netns tenant7 --ttl 0      # no expiry
  xdpguard ban --from-file incident.txt --all
  xdpguard bans --iface eth1 --json > bans.json; xdpguard ban --from-file bans.json --iface eth2""",
    "unban": """examples:
  xdpguard unban 203.0.113.7
  xdpguard unban 2001:db8:bad::/48 --iface eth1
  xdpguard unban --all --iface eth1        # every ban on eth1
  xdpguard unban 203.0.113.7 --all         # on every interface""",
    "bans": """examples:
  xdpguard bans
  xdpguard bans --exact
  xdpguard bans --iface eth1 --json        # an export: 'ban --from-file' reads it
  xdpguard bans -i veth0 -n lab -j""",
    "top": """The header says what each rate counts: at XDP (every frame, before bans and
rules), per source (after bans, before rules), after rules, and reaching the
listener (the kernel's TCP stack). A local destination is address:port: one
hosted site only where each site has its own IP.

examples:
  xdpguard top --iface eth1
  xdpguard top --iface eth1 --once --exact
  xdpguard top --iface veth0 --netns lab --once --json
  xdpguard top -i eth1 --interval 2s""",
    "confirm": """examples:
  xdpguard apply new.toml --iface eth0 --confirm 60   # then, from another shell:
  xdpguard confirm --iface eth0""",
    "rollback": """examples:
  xdpguard rollback --iface eth0
  xdpguard rollback --iface veth0 --netns lab""",
    "log": """examples:
  xdpguard log --iface eth0
  xdpguard log --iface eth0 --follow --json""",
    "doctor": """checks, each through the code apply runs: bpf(2), JIT, BTF, bpffs, the kernel
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
  xdpguard doctor --iface veth0 --netns lab --json""",
    "completion": """examples:
  xdpguard completion bash > /usr/local/share/bash-completion/completions/xdpguard
  source <(xdpguard completion bash)      # this shell only""",
}


class _Version(argparse.Action):
    """--version: computed when asked (importing bcc would slow every command)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(EXIT_OK)


def version_text() -> str:
    """xdpguard's version, the pin layout it reads and writes, bcc's version, the kernel."""
    from importlib import metadata

    from xdpguard.layout import C
    try:
        own = metadata.version("xdpguard")
    except metadata.PackageNotFoundError:
        own = "unknown (not installed)"
    try:
        import bcc
        bcc_version = getattr(bcc, "__version__", "unknown")
    except ImportError:
        bcc_version = "not installed"
    return (f"xdpguard {own}\npin layout {C.XG_LAYOUT_VERSION}\n"
            f"bcc {bcc_version}\nkernel {os.uname().release}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in COMMANDS."""
    ap = argparse.ArgumentParser(
        prog="xdpguard",
        description="XDP access control and rate limiting for shared hosts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 success, 1 system failure, 2 invalid policy or usage,\n"
               "3 apply --confirm not confirmed (previous policy restored)\n"
               "short forms: -j --json, -i --iface, -n --netns; durations and rates:\n"
               "90s, 1h30m, 1w, 10/m, 20kpps, 100Mbit/s (man xdpguard)\n"
               "see 'xdpguard COMMAND --help' for examples, 'xdpguard -V' for versions")
    ap.add_argument("-V", "--version", action=_Version,
                    help="print the versions of xdpguard, its pin layout, bcc and the kernel")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help, epilog=EPILOGS[c.name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=c.run)
        for flags, kw in ((("--json",), {"action": "store_true", "help": "machine-readable output"}),
                          *c.args):
            p.add_argument(*[SHORT[f] for f in flags if f in SHORT], *flags, **kw)
    return ap


def main(argv=None) -> int:
    from xdpguard import progress
    progress.enable(sys.stderr if sys.stderr.isatty() else None)
    from xdpguard.errors import LoadError, NetnsError, UsageError
    from xdpguard.logline import ERROR, journal_stream, syslog_prefix
    from xdpguard.pins import PinError
    from xdpguard.policy import PolicyError

    def error(e) -> None:
        # In the journal (a unit's apply or watch): at error priority.
        print(f"{syslog_prefix(ERROR, journal_stream(sys.stderr))}error: {e}", file=sys.stderr)
    rc = None
    try:
        try:
            args = build_parser().parse_args(argv)     # --help, too, may meet a closed pipe
            rc = args.func(args)
            return rc
        finally:
            # Into a pipe, stdout is block-buffered: a reader that went away
            # shows only at the flush, which must be ours, not Python's at
            # exit (that one prints "Exception ignored" and exits 120).
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`xdpguard status | head -1`): not an error.
        # Python flushes stdout once more at exit: let that go to nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK if rc is None else rc
    except PolicyError as e:
        error(e)
        return EXIT_USAGE
    except (CliError,) as e:
        error(e)
        return e.code
    except (UsageError, NetnsError) as e:
        error(e)
        return EXIT_USAGE
    except (LoadError, PinError, OSError) as e:
        error(e)
        return EXIT_SYSTEM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
