"""Commands of the feedback loop: watch, ban, unban, bans, top."""
from __future__ import annotations

import ipaddress
import sys
import time

from xdpguard.cliutil import (CliError, applied, check_names, emit_json, human_bytes, human_duration,
                              load_policy, netns_of, table, warn)


def _scope(args) -> list:
    """(pin directory, record) of the interfaces a ban or unban acts on:
    those --iface / --netns select; more than one only with --all, so
    that no ban reaches another tenant's namespace by default."""
    from xdpguard import stats
    # Counted by their pins, before any record is read: another
    # interface's unreadable record is no reason to fail here.
    selected = stats.select(args.netns, args.iface)
    if len(selected) > 1 and not args.all:
        names = ", ".join(f"{ns}/{ifc}" for ns, ifc, _d in selected)
        raise CliError(f"xdpguard runs on {len(selected)} interfaces here ({names}): name one with "
                       f"--iface IF [--netns NS], or act on all of them with --all")
    return applied(args)


def _where(targets) -> list[str]:
    return [f"{r.netns}/{r.iface}" for _d, r in targets]


def cmd_ban(args) -> int:
    from xdpguard import bans, pins

    def say(msg):
        print(f"warning: {msg}", file=sys.stderr)
    check_names(args)
    try:
        ttl = bans.parse_ttl(args.ttl)
        if args.from_file:
            if args.target:
                raise CliError("give an address or --from-file, not both")
            wanted = bans.read_ban_file(args.from_file, ttl, args.reason or "manual", say)
        elif args.target:
            wanted = [bans.Wanted(bans.parse_target(args.target, say), ttl, args.reason or "manual")]
        else:
            raise CliError("ban needs ADDR[/LEN] or --from-file FILE")
    except bans.BanError as e:
        raise CliError(str(e))
    with pins.locked():
        targets = _scope(args)
        # Every prefix on every interface is checked before any is banned:
        # a refusal changes nothing.
        for d, rec in targets:
            protected = bans.protected_networks(rec)
            for w in wanted:
                why = bans.covering(w.net, protected)
                if why:
                    raise CliError(f"{rec.netns}/{rec.iface}: refusing to ban {w.net}: it {why}")
            limit = rec.mitigation.max_bans
            if limit is not None:
                # The policy's max_bans holds for manual bans too (watch's
                # and restore's count the same entries); a re-ban is no new one.
                with bans.BanMaps(d, rec) as bm:
                    held = {e["prefix"] for e in bm.entries() if not e["expired"]}
                new = {str(w.net) for w in wanted} - held
                if new and len(held) + len(new) > limit:
                    raise CliError(f"{rec.netns}/{rec.iface}: max_bans ({limit}) reached"
                                   + (f" ({len(held)} held, {len(new)} new)" if len(new) > 1 else "")
                                   + "; unban one first, or raise max_bans in the policy")
        for d, rec in targets:
            with bans.BanMaps(d, rec) as bm:
                bm.add_many(wanted)
    done = _where(targets)
    if args.json:
        if args.from_file:
            emit_json({"banned": [{"prefix": str(w.net), "ttl": w.ttl, "reason": w.reason} for w in wanted],
                       "from": args.from_file, "interfaces": done})
        else:
            emit_json({"banned": str(wanted[0].net), "ttl": ttl, "interfaces": done})
    elif args.from_file:
        print(f"banned {len(wanted)} prefix{'es' * (len(wanted) != 1)} from {args.from_file} on {', '.join(done)}")
    else:
        print(f"banned {wanted[0].net} for {human_duration(ttl) if ttl else 'ever'} on {', '.join(done)}")
    return 0


def cmd_unban(args) -> int:
    from xdpguard import bans, pins
    check_names(args)
    if not args.target and not args.all:
        raise CliError("unban needs ADDR[/LEN], or --all to lift every ban")
    try:
        net = bans.parse_target(args.target, lambda m: print(f"warning: {m}", file=sys.stderr)) \
            if args.target else None
    except bans.BanError as e:
        raise CliError(str(e))
    lifted = {}
    with pins.locked():
        targets = _scope(args)
        for d, rec in targets:
            with bans.BanMaps(d, rec) as bm:
                nets = [net] if net else [ipaddress.ip_network(e["prefix"]) for e in bm.entries()]
                lifted[f"{rec.netns}/{rec.iface}"] = bm.remove_many(nets)
    if args.json:
        emit_json({"unbanned": str(net) if net else "all", "lifted": lifted,
                   "interfaces": [w for w, p in lifted.items() if p]})
    elif net is None:
        print("; ".join(f"lifted {len(p)} ban{'s' * (len(p) != 1)} on {w}" for w, p in lifted.items()))
    elif any(lifted.values()):
        print(f"unbanned {net} on {', '.join(w for w, p in lifted.items() if p)}")
    else:
        raise CliError(f"{net} is not banned on {', '.join(lifted)} (see 'xdpguard bans')")
    return 0


def cmd_bans(args) -> int:
    from xdpguard import bans
    check_names(args)
    out = []
    for d, rec in applied(args):
        with bans.BanMaps(d, rec) as bm:
            for e in bm.entries():
                out.append({"netns": rec.netns, "iface": rec.iface, **e})
    if args.json:
        emit_json({"schema_version": 1, "bans": out})
        return 0
    if not out:
        print("no bans")
        return 0
    rows = [[f"{e['netns']}/{e['iface']}", e["prefix"], e["reason"], e["source"],
             "never" if e["remaining_s"] is None else ("expired" if e["expired"] else human_duration(e["remaining_s"])),
             e["packets"], e["bytes"]] for e in out]
    print(table(["iface", "prefix", "reason", "by", "remaining", "dropped", "bytes"], rows, right={5, 6}))
    return 0


def cmd_watch(args) -> int:
    from xdpguard.daemon import Watch
    from xdpguard.units import parse_duration
    check_names(args)
    policy = load_policy(args.policy)
    warn(policy)
    try:
        interval = parse_duration(args.interval)
    except ValueError as e:
        raise CliError(f"--interval: {e}")
    return Watch(policy, args.iface, netns_of(args), interval, args.json).run(args.metrics)


def cmd_top(args) -> int:
    from xdpguard import bans, stats
    from xdpguard.daemon import Sampler, open_probes
    from xdpguard.policy import Mitigation
    check_names(args)
    targets = applied(args)
    d, rec = targets[0]
    m = Mitigation(prefix4=rec.mitigation.prefix4, prefix6=rec.mitigation.prefix6)
    probes = open_probes(m, lambda msg: print(f"note: {msg}", file=sys.stderr))
    sampler = Sampler(d, rec, probes)
    local = {a for a, _w in bans.own_addresses(rec.ns)}
    prev_stats = stats.read_stats(d, rec)
    prev_t = time.monotonic()
    sampler.sample()
    try:
        while True:
            time.sleep(args.interval)
            dt, sources, dests = sampler.sample()
            cur = stats.read_stats(d, rec)
            now = time.monotonic()
            with bans.BanMaps(d, rec) as bm:
                banned = [e for e in bm.entries() if not e["expired"]]
            view = _top_view(rec, sources, dests, local, prev_stats, cur, now - prev_t, banned)
            prev_stats, prev_t = cur, now
            if args.json:
                emit_json(view)
            else:
                if not args.once:
                    sys.stdout.write("\x1b[H\x1b[2J")
                _print_top(view)
                sys.stdout.flush()
            if args.once:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sampler.close()
        if probes:
            probes.close()


def _top_view(rec, sources, dests, local, prev, cur, dt, banned) -> dict:
    """One frame of `top`. Sources without packets in the interval are
    left out of the lists (a flood that ended before the interval began
    leaves them empty), and so are banned ones: the program drops them
    before it counts them; they are under `bans`."""
    n = 10
    srcs = [{"source": k, **{f: round(v, 1) for f, v in r.items() if f in ("pps", "bps", "syn_rate", "conn_rate", "resets")}}
            for k, r in sources.items()]

    def top(key):
        return sorted((s for s in srcs if s.get(key, 0) > 0), key=lambda s: -s[key])[:n]

    def is_local(dest: str) -> bool:
        addr = dest.rsplit(":", 1)[0].strip("[]")
        return addr in local
    dst = sorted(({"dest": k, **{f: round(v, 1) for f, v in r.items()}} for k, r in dests.items() if is_local(k)),
                 key=lambda x: -(x["syn_rate"] + x["conn_rate"]))[:n]
    pmap = {r["rule"]: r for r in prev["rules"]}
    rules = [{"rule": r["rule"], "action": r["action"],
              "pps": round((r["packets"] - pmap.get(r["rule"], r)["packets"]) / dt, 1),
              "drop_pps": round((r["dropped_packets"] - pmap.get(r["rule"], r)["dropped_packets"]) / dt, 1)}
             for r in cur["rules"]]
    return {"schema_version": 1, "netns": rec.netns, "iface": rec.iface, "interval": round(dt, 2),
            "mitigation": rec.mitigation.enabled,
            "top_pps": top("pps"), "top_syn_rate": top("syn_rate"), "top_conn_rate": top("conn_rate"),
            "top_dests": dst, "bans": banned[:n], "bans_active": len(banned), "rules": rules}


def _print_top(v: dict) -> None:
    print(f"xdpguard top: {v['netns']}/{v['iface']}  interval {v['interval']}s  bans {v['bans_active']}"
          + ("" if v["mitigation"] else "  (per-source XDP counts need [mitigation] enabled = true)"))
    print()
    print(table(["source", "pps", "bytes/s", "syn/s", "conn/s"],
                [[s["source"], s["pps"], human_bytes(s["bps"]), s["syn_rate"], s["conn_rate"]] for s in v["top_pps"]]
                or [["-", "", "", "", ""]], right={1, 2, 3, 4}))
    print()
    print(table(["new connections by source", "syn/s", "conn/s", "resets/s"],
                [[s["source"], s["syn_rate"], s["conn_rate"], s["resets"]] for s in v["top_syn_rate"]]
                or [["-", "", "", ""]], right={1, 2, 3}))
    print()
    print(table(["local destination (site)", "syn/s", "conn/s", "synack_retrans/s", "resets/s"],
                [[d["dest"], d["syn_rate"], d["conn_rate"], d["synack_retrans"], d["resets"]] for d in v["top_dests"]]
                or [["-", "", "", "", ""]], right={1, 2, 3, 4}))
    print()
    print(table(["rule", "action", "pps", "drop/s"], [[r["rule"], r["action"], r["pps"], r["drop_pps"]] for r in v["rules"]],
                right={2, 3}))
    if v["bans"]:
        print()
        print(table(["banned", "reason", "remaining", "dropped"],
                    [[b["prefix"], b["reason"], "never" if b["remaining_s"] is None else human_duration(b["remaining_s"]),
                      b["packets"]] for b in v["bans"]], right={3}))
