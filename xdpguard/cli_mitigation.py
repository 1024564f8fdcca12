"""Commands of the feedback loop: watch, ban, unban, bans, top."""
from __future__ import annotations

import ipaddress
import sys
import time

from xdpguard.cliutil import (CliError, Numbers, applied, check_names, colour, emit_json, human_duration,
                              interruptible, load_policy, netns_of, new_frame, paint, still_applied, table, warn)


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
    now = time.time()
    shared = _share([rec for _d, rec in targets],
                    [("ban", w.net, now + w.ttl if w.ttl else None, w.reason) for w in wanted])
    if args.json:
        fleet = {"fleet": shared} if shared else {}
        if args.from_file:
            emit_json({"banned": [{"prefix": str(w.net), "ttl": w.ttl, "reason": w.reason} for w in wanted],
                       "from": args.from_file, "interfaces": done, **fleet})
        else:
            emit_json({"banned": str(wanted[0].net), "ttl": ttl, "interfaces": done, **fleet})
    elif args.from_file:
        print(f"banned {len(wanted)} prefix{'es' * (len(wanted) != 1)} from {args.from_file} on {', '.join(done)}")
    else:
        print(f"banned {wanted[0].net} for {human_duration(ttl) if ttl else 'ever'} on {', '.join(done)}")
    return 0


def _share(records, events) -> list[str]:
    """Publish (op, prefix, expires, reason) events to the fleet of the
    applied policies that have [fleet]; what it says goes to stderr
    (stdout stays the command's answer)."""
    if not events or not any(rec.fleet for rec in records):
        return []
    from xdpguard import fleet
    lines = fleet.share(records, events)
    for ln in lines:
        print(ln, file=sys.stderr)
    return lines


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
    # Lifted here or not, the fleet lifts it (it may be banned elsewhere).
    gone = [net] if net else sorted({p for ps in lifted.values() for p in ps})
    shared = _share([rec for _d, rec in targets], [("unban", n, None, "") for n in gone])
    if args.json:
        emit_json({"unbanned": str(net) if net else "all", "lifted": lifted,
                   "interfaces": [w for w, p in lifted.items() if p], **({"fleet": shared} if shared else {})})
    elif net is None:
        print("; ".join(f"lifted {len(p)} ban{'s' * (len(p) != 1)} on {w}" for w, p in lifted.items()))
    elif any(lifted.values()):
        print(f"unbanned {net} on {', '.join(w for w, p in lifted.items() if p)}")
    elif not shared:
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
    num = Numbers(args.exact)
    rows = [[f"{e['netns']}/{e['iface']}", e["prefix"], e["reason"], e["source"], e["origin"], _remaining(e),
             e["expires_rfc3339"] or "-", num.count(e["packets"]), num.size(e["bytes"])] for e in out]
    print(table(["iface", "prefix", "reason", "by", "origin", "remaining", "expires", "dropped", "bytes"], rows,
                right={7, 8}))
    return 0


def _remaining(ban: dict) -> str:
    return "never" if ban["remaining_s"] is None else ("expired" if ban["expired"] else human_duration(ban["remaining_s"]))


def cmd_watch(args) -> int:
    from xdpguard.daemon import Watch
    from xdpguard.units import parse_duration
    interruptible()
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
    interruptible()
    check_names(args)
    targets = applied(args)
    d, rec = targets[0]
    m = Mitigation(prefix4=rec.mitigation.prefix4, prefix6=rec.mitigation.prefix6)
    probes = open_probes(m, lambda msg: print(f"note: {msg}", file=sys.stderr))
    sampler = None
    num = Numbers(args.exact)

    def in_force() -> list[dict]:
        with bans.BanMaps(d, rec) as bm:
            return [e for e in bm.entries() if not e["expired"]]
    first = True
    try:
        with still_applied(rec.netns, rec.iface):
            sampler = Sampler(d, rec, probes)
            local = {a for a, _w in bans.own_addresses(rec.ns)}
            prev_stats, prev_bans = stats.read_stats(d, rec), in_force()
        prev_t = time.monotonic()
        sampler.sample()
        while True:
            time.sleep(args.interval)
            with still_applied(rec.netns, rec.iface):
                dt, sources, dests = sampler.sample()
                cur = stats.read_stats(d, rec)
                banned = in_force()
            now = time.monotonic()
            view = _top_view(rec, sources, dests, local, prev_stats, cur, now - prev_t, banned, prev_bans,
                             probes is not None)
            prev_stats, prev_bans, prev_t = cur, banned, now
            if args.json:
                emit_json(view)
            else:
                if not args.once:
                    new_frame(first)
                _print_top(view, num, colour())
                sys.stdout.flush()
            first = False
            if args.once:
                return 0
    finally:
        if sampler:
            sampler.close()
        if probes:
            probes.close()


# Rows in each of top's lists.
TOP_N = 10


def _top_view(rec, sources, dests, local, prev, cur, dt, banned, prev_bans=(), probes=True) -> dict:
    """One frame of `top`. Sources without packets in the interval are
    left out of the lists (a flood that ended before the interval began
    leaves them empty), and so are banned ones: the program drops them
    before it counts them per source; they are under `bans`, each with
    the rate its ban drops now (drop_pps, drop_bps) from the ban's own
    counters (prev_bans: the entries at the start of the interval)."""
    from xdpguard import stats
    n = TOP_N
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
    pbans = {b["prefix"]: b for b in prev_bans}
    shown_bans = []
    for b in banned:
        p = pbans.get(b["prefix"])
        # A ban new in the interval counts from zero; a lifted and re-made one
        # (counters below the last read) too.
        if p is None or b["packets"] < p["packets"]:
            p = {"packets": 0, "bytes": 0}
        shown_bans.append({**b, "drop_pps": round((b["packets"] - p["packets"]) / dt, 1),
                           "drop_bps": round((b["bytes"] - p["bytes"]) / dt, 1)})
    shown_bans.sort(key=lambda b: (-b["drop_pps"], b["prefix"]))
    t_prev, t_cur = stats.totals(prev), stats.totals(cur)

    def per_s(part, f):
        return round((t_cur[part][f] - t_prev[part][f]) / dt, 1)
    # Sums of the rates as measured: each rounded first, 6,000 sources at
    # 0.33 pps would add up to a tenth too little.
    active = [r for r in sources.values() if r.get("pps", 0) > 0]
    all_pps = sum(r["pps"] for r in active)
    top_pps = top("pps")
    listener = None
    if probes:
        here = [x for k, x in dests.items() if is_local(k)]
        listener = {"syn_rate": round(sum(x["syn_rate"] for x in here), 1),
                    "conn_rate": round(sum(x["conn_rate"] for x in here), 1)}
    return {"schema_version": 1, "netns": rec.netns, "iface": rec.iface, "interval": round(dt, 2),
            "mitigation": rec.mitigation.enabled,
            "top_pps": top_pps, "top_syn_rate": top("syn_rate"), "top_conn_rate": top("conn_rate"),
            "top_dests": dst, "bans": shown_bans[:n], "bans_active": len(banned), "rules": rules,
            # What the program counted in the interval: every IP frame (at
            # XDP, before bans and rules), and what the rules decided.
            "xdp": {"pps": per_s("all", "packets"), "bps": per_s("all", "bytes"),
                    "drop_pps": per_s("all", "dropped_packets"),
                    "ban_drop_pps": round(sum(b["drop_pps"] for b in shown_bans), 1)},
            "after_rules": {"pps": per_s("rules", "packets"), "drop_pps": per_s("rules", "dropped_packets")},
            # Per-source counts (after bans, before rules): how many sent,
            # and the share of the top list, which says whether a flood
            # comes from a few sources or from many.
            "sources": {"distinct": len(active), "pps": round(all_pps, 1),
                        "bps": round(sum(r["bps"] for r in active), 1), "top_n": n,
                        "top_share": round(sum(s["pps"] for s in top_pps) / all_pps, 3) if all_pps else None},
            # SYNs and handshakes the kernel's TCP stack saw for this
            # host's addresses (the probes); None without probes.
            "listener": listener}


def _print_top(v: dict, num: Numbers | None = None, on: bool = False) -> None:
    num = num or Numbers()
    x, src = v["xdp"], v["sources"]
    print(paint(f"xdpguard top: {v['netns']}/{v['iface']}  every {v['interval']}s  "
                f"{v['bans_active']} ban{'s' * (v['bans_active'] != 1)} in force", "bold", on))
    print(f"at XDP, every frame before bans and rules: {num.rate(x['pps'])} pps, {num.bits(x['bps'])}; "
          f"dropped {num.rate(x['drop_pps'])} pps, by bans {num.rate(x['ban_drop_pps'])} pps")
    if v["mitigation"]:
        pct = None if src["top_share"] is None else 100 * src["top_share"]
        share = "" if pct is None else (
            f"; the top {min(src['top_n'], src['distinct'])} send {pct:.1f}%" if pct < 9.95 else
            f"; the top {min(src['top_n'], src['distinct'])} send {pct:.0f}%")
        print(f"  per source (after bans, before rules): {num.count(src['distinct'])} "
              f"source{'s' * (src['distinct'] != 1)} sent {num.rate(src['pps'])} pps{share}")
    else:
        print("  per source: not counted ([mitigation] enabled = false)")
    a = v["after_rules"]
    print(f"after rules: the rules decided {num.rate(a['pps'])} pps, dropped {num.rate(a['drop_pps'])} pps")
    lst = v["listener"]
    print("reaching the listener (TCP stack): "
          + (f"{num.rate(lst['syn_rate'])} SYN/s, {num.rate(lst['conn_rate'])} handshakes/s" if lst
             else "not measured (no kernel probes)"))
    print()
    print("sources by packet rate; pps, bit/s at XDP (a banned source: what its ban drops); syn/s at XDP or\n"
          "at the listener, whichever is higher; conn/s: handshakes completed at the listener")
    rows = [(s["pps"], [s["source"], num.rate(s["pps"]), num.bits(s["bps"]), num.rate(s["syn_rate"]),
                        num.rate(s["conn_rate"]), ""]) for s in v["top_pps"]]
    # A banned attacker stays in view, with its state and the rate its ban drops.
    rows += [(b["drop_pps"], [b["prefix"], num.rate(b["drop_pps"]), num.bits(b["drop_bps"]), "", "",
                              paint(f"banned, {_remaining(b)} left" if b["remaining_s"] is not None
                                    else "banned, no expiry", "red", on)]) for b in v["bans"]]
    rows.sort(key=lambda r: -r[0])
    print(table(["source", "pps", "bit/s", "syn/s", "conn/s", "state"], [r for _k, r in rows]
                or [["-", "", "", "", "", ""]], right={1, 2, 3, 4}))
    print()
    print(table(["new connections by source", "syn/s", "conn/s", "resets/s"],
                [[s["source"], num.rate(s["syn_rate"]), num.rate(s["conn_rate"]), num.rate(s["resets"])]
                 for s in v["top_syn_rate"]] or [["-", "", "", ""]], right={1, 2, 3}))
    print()
    # The probes key a destination by address and port: on a shared host
    # that serves many sites on one IP:443, one row is all of them.
    print("local destinations at the listener: address:port, one site only where a site has an IP of its own")
    print(table(["local destination", "syn/s", "conn/s", "synack_retrans/s", "resets/s"],
                [[d["dest"], num.rate(d["syn_rate"]), num.rate(d["conn_rate"]), num.rate(d["synack_retrans"]),
                  num.rate(d["resets"])] for d in v["top_dests"]]
                or [["-", "", "", "", ""]], right={1, 2, 3, 4}))
    print()
    print("rules: what each rule decided (after bans), and dropped")
    print(table(["rule", "action", "pps", "drop/s"],
                [[r["rule"], r["action"], num.rate(r["pps"]), num.rate(r["drop_pps"])] for r in v["rules"]],
                right={2, 3}))
    if v["bans"]:
        print()
        print(table(["banned", "reason", "remaining", "drop/s", "dropped"],
                    [[b["prefix"], b["reason"], _remaining(b), num.rate(b["drop_pps"]), num.count(b["packets"])]
                     for b in v["bans"]], right={3, 4}))
