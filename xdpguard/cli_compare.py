"""`show` (the running policy, as nft list ruleset shows a ruleset) and
what `apply` compares: the running policy against the one being applied
(`apply --diff`, and the summary line of every apply).

The running policy's text is the copy history.py keeps, by sha256, of
every policy apply writes a record for: the policy file on disk may have
changed since.
"""
from __future__ import annotations

import sys

from xdpguard.cliutil import EXIT_OK, EXIT_SYSTEM, CliError, applied, check_names, emit_json, rfc3339


def cmd_show(args) -> int:
    from xdpguard import history
    from xdpguard.errors import UsageError
    check_names(args)
    shown, missing = [], 0
    for _d, rec in applied(args):
        try:
            kept = history.read_kept(rec.ns, rec.iface, rec.policy)
        except UsageError as e:
            # One interface without a copy hides no other.
            print(f"error: {e} (network namespace {rec.netns})", file=sys.stderr)
            missing += 1
            continue
        shown.append((rec, kept))
    if args.json:
        emit_json({"interfaces": [
            {"netns": rec.netns, "iface": rec.iface, "policy": rec.policy.name, "sha256": rec.policy.sha256,
             "source": rec.policy.source, "applied_at": rec.policy.applied_at,
             "applied_at_rfc3339": rfc3339(rec.policy.applied_at), "text": kept.text,
             "set_files": {name: str(path) for name, path in kept.sets.items()}}
            for rec, kept in shown]})
    else:
        for i, (rec, kept) in enumerate(shown):
            if i:
                print()
            print(f"# xdpguard: running on {rec.iface} (network namespace {rec.netns})")
            print(f"# policy '{rec.policy.name}' sha256 {rec.policy.sha256}")
            print(f"# source {rec.policy.source}")
            print(f"# applied {rfc3339(rec.policy.applied_at)}")
            for name, path in kept.sets.items():
                print(f"# set file \"{name}\" as applied: {path}")
            sys.stdout.write(kept.text if kept.text.endswith("\n") else kept.text + "\n")
    return EXIT_SYSTEM if missing else EXIT_OK


def compare(netns: str | None, iface: str, policy, strict: bool):
    """(running record or None, PolicyDiff from the running policy to
    `policy`). When the running policy cannot be read (no kept copy, a
    record or copy another version wrote): CliError (exit 1) if strict
    (--diff), else (None, None): apply goes on without a summary."""
    from xdpguard import history, pins, policydiff
    from xdpguard.errors import UsageError
    from xdpguard.pins import PinError
    from xdpguard.policy import PolicyError
    try:
        rec = pins.read_record(pins.iface_dir(netns, iface))
        if rec is None:
            return None, policydiff.diff(None, policy)
        if rec.policy.sha256 == policy.sha256:
            return rec, policydiff.PolicyDiff()
        return rec, policydiff.diff(history.load_kept(netns, iface, rec.policy), policy)
    except (UsageError, PinError, PolicyError) as e:
        if strict:
            raise CliError(f"cannot compare with the running policy: {e}", EXIT_SYSTEM) from None
        return None, None


def print_diff(args, policy, rec, d, guard) -> None:
    """`apply --diff`'s report: what would change, nothing applied."""
    where = f"{args.iface}" + (f" (network namespace {args.netns})" if args.netns else "")
    if args.json:
        emit_json({"iface": args.iface, "netns": args.netns or "host", "policy": policy.name,
                   "sha256": policy.sha256, "running": None if rec is None else
                   {"policy": rec.policy.name, "sha256": rec.policy.sha256, "source": rec.policy.source,
                    "applied_at": rec.policy.applied_at, "applied_at_rfc3339": rfc3339(rec.policy.applied_at)},
                   "applied": False, "changes": d.as_json(),
                   "lockout": guard.problems if guard else []})
        return
    if rec is None:
        print(f"{where}: xdpguard does not run there: every rule of '{policy.name}' is new")
    else:
        print(f"{where}: running '{rec.policy.name}' sha256 {rec.policy.sha256[:16]}... "
              f"applied {rfc3339(rec.policy.applied_at)} from {rec.policy.source}")
    for line in d.lines():
        print(line)
    print(f"{policy.source}: {d.summary()} (nothing applied: --diff)")
    for p in guard.problems if guard else ():
        print(f"warning: lockout guard: {p} (apply refuses it without --force)", file=sys.stderr)
