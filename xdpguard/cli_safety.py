"""Commands for safe operation: confirm, rollback, log."""
from __future__ import annotations

import sys
import time

from xdpguard.cliutil import CliError, check_names, emit_json, netns_of


def cmd_confirm(args) -> int:
    from dataclasses import replace
    from xdpguard import pins
    check_names(args)
    nothing = CliError(f"{args.iface}: nothing waits for confirmation")

    def confirmed(rec):
        if rec.confirm is None:
            raise nothing
        return replace(rec, confirm=None)
    try:
        rec = pins.modify_record(pins.iface_dir(netns_of(args), args.iface), confirmed)
    except pins.NotPinned:
        raise nothing from None
    if args.json:
        emit_json({"iface": args.iface, "confirmed": True, "policy": rec.policy.name})
    else:
        print(f"{args.iface}: policy '{rec.policy.name}' confirmed")
    return 0


def cmd_rollback(args) -> int:
    from xdpguard import loader
    check_names(args)
    back = loader.rollback(args.iface, netns_of(args), log=(lambda m: None) if args.json else print)
    if args.json:
        emit_json({"iface": args.iface, "policy": back.policy.name, "rolled_back": True})
    return 0


def cmd_log(args) -> int:
    import signal
    from xdpguard import pins, stats
    from xdpguard.droplog import DropLog
    stop: list[int] = []
    if args.follow:
        # Before anything is read, and whatever the parent left ignored: a
        # signal ends the loop at its next turn, never inside a drain.
        # SIGINT 130; a service manager's SIGTERM like the end of the output, 0.
        signal.signal(signal.SIGINT, lambda *_: stop.append(130))
        signal.signal(signal.SIGTERM, lambda *_: stop.append(0))
    check_names(args)
    targets = stats.select(args.netns, args.iface)
    if not targets:
        raise CliError("xdpguard is not applied here (see 'xdpguard status')")
    ns, ifc, d = targets[0]
    log = DropLog(d, pins.read_record(d))

    def show(events):
        for e in events:
            if args.json:
                emit_json(e)
            else:
                ports = f" {e['sport']} -> {e['dport']}" if e["sport"] is not None else ""
                vlan = f" vlan {e['vlan']}" if e["vlan"] else ""
                print(f"{e['time']} {e['rule']} {e['verdict']} {e['src']} -> {e['dst']} "
                      f"{e['proto']}{ports} len {e['length']}{vlan}")

    def suppressed(n, since):
        if not n:
            return
        if args.json:
            emit_json({"suppressed": n, "since": since})
        else:
            print(f"({n} events suppressed by the log rate limit since {since})")

    try:
        log.drain()
        show(log.recent(args.last))
        if not args.follow:
            suppressed(log.suppressed(), "apply")
            return 0
        if args.json:
            # Where the journal's past ends and following begins; a reader
            # (a test, a shipper) knows the signals are handled from here.
            emit_json({"following": True, "netns": ns, "iface": ifc})
        last_supp = log.suppressed()
        last_t = time.monotonic()
        while not stop:
            sys.stdout.flush()
            time.sleep(0.2)
            log.drain()
            show(log.follow())
            if time.monotonic() - last_t >= 1.0:
                supp = log.suppressed()
                suppressed(supp - last_supp, "the last line")
                last_supp, last_t = supp, time.monotonic()
        sys.stdout.flush()
        return stop[0]
    except KeyboardInterrupt:
        return 130
    finally:
        log.close()
