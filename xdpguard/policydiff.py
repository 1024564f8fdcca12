"""What changes from one policy to another, rule by rule, set by set and
threshold by threshold (the policy as written, not its maps): what
`apply --diff` prints and apply's one-line summary.

Rules are the same rule when they have the same name (names are unique
in a policy): a renamed rule is one removed and one added. Order matters
(the first match decides): a rule that keeps its name but not its place
among the rules both policies have is reported moved, with the rule it
now follows. A rule's src and dst compare as written ("@blocklist" stays
"@blocklist" when the set's file changes; the set's prefixes are reported
under the set).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from difflib import SequenceMatcher
from itertools import islice

from xdpguard.policy import Mitigation, Policy, Prefix, PrefixSet, Rule
from xdpguard.units import Rate, format_duration

# Rule fields compared (name is the identity, index the order).
RULE_FIELDS = tuple(f.name for f in fields(Rule)
                    if f.name not in ("name", "index", "src", "dst", "src_text", "dst_text")) + ("src", "dst")
MITIGATION_FIELDS = tuple(f.name for f in fields(Mitigation))
POLICY_FIELDS = ("name", "default", "protect", "log_rate", "log_default", "log_bans")
# Prefixes of a set shown by name (the rest counted).
SAMPLE = 10
# Keys compared at a time by _sorted_diff.
_BLOCK = 64


@dataclass
class RuleChange:
    """A rule in both policies whose fields differ: field -> (old, new),
    as policy values."""
    name: str
    fields: dict[str, tuple]


@dataclass
class SetChange:
    """A named set's prefixes: how many came and went, the first SAMPLE of
    each; state "added" / "removed" for a set only one policy has."""
    name: str
    added: int
    removed: int
    added_sample: list[str] = field(default_factory=list)
    removed_sample: list[str] = field(default_factory=list)
    state: str = "changed"


@dataclass
class PolicyDiff:
    """Old -> new. added and moved: (rule, the rule it follows in the new
    policy or None for the first), in the new policy's order."""
    added: list[tuple[str, str | None]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[RuleChange] = field(default_factory=list)
    moved: list[tuple[str, str | None]] = field(default_factory=list)
    sets: list[SetChange] = field(default_factory=list)
    mitigation: dict[str, tuple] = field(default_factory=dict)
    policy: dict[str, tuple] = field(default_factory=dict)
    new_rules: dict[str, Rule] = field(default_factory=dict)    # the added rules themselves

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.moved or self.sets
                    or self.mitigation or self.policy)

    def summary(self) -> str:
        """One line: rules +added -removed ~changed (moved), each set's
        prefixes, the thresholds and policy settings that changed."""
        if not self:
            return "no changes"
        parts = [f"rules +{len(self.added)} -{len(self.removed)} ~{len(self.changed)}"
                 + (f" (moved {len(self.moved)})" if self.moved else "")]
        for s in self.sets:
            state = "" if s.state == "changed" else f" ({s.state})"
            parts.append(f"set '{s.name}'{state} +{s.added} -{s.removed} prefixes")
        if self.mitigation:
            parts.append("mitigation " + _changes(self.mitigation))
        if self.policy:
            parts.append("policy " + _changes(self.policy))
        return "; ".join(parts)

    def lines(self) -> list[str]:
        """The differences, one a line, nft/diff style: + added, - removed,
        ~ changed, > moved."""
        out = [f"~ policy {k}: {text(o, k)} -> {text(n, k)}" for k, (o, n) in self.policy.items()]
        out += [f"- rule '{name}'" for name in self.removed]
        out += [f"+ rule '{name}' {_where(after)}: {describe_rule(self.new_rules[name])}"
                for name, after in self.added]
        for c in self.changed:
            out.append(f"~ rule '{c.name}': " + _changes(c.fields))
        out += [f"> rule '{name}' now {_where(after)}" for name, after in self.moved]
        for s in self.sets:
            head = f"set '{s.name}'" + ("" if s.state == "changed" else f" ({s.state})")
            out.append(f"~ {head}: +{s.added} -{s.removed} prefixes")
            for sign, sample, n in (("+", s.added_sample, s.added), ("-", s.removed_sample, s.removed)):
                out += [f"    {sign} {p}" for p in sample]
                if n > len(sample):
                    out.append(f"    {sign} ... and {n - len(sample)} more")
        out += [f"~ mitigation {k}: {text(o, k)} -> {text(n, k)}" for k, (o, n) in self.mitigation.items()]
        return out

    def as_json(self) -> dict:
        return {"summary": self.summary(),
                "rules_added": [{"rule": n, "after": a} for n, a in self.added],
                "rules_removed": self.removed,
                "rules_changed": [{"rule": c.name, "fields": _json(c.fields)} for c in self.changed],
                "rules_moved": [{"rule": n, "after": a} for n, a in self.moved],
                "sets": [{"set": s.name, "state": s.state, "added": s.added, "removed": s.removed,
                          "added_sample": s.added_sample, "removed_sample": s.removed_sample}
                         for s in self.sets],
                "mitigation": _json(self.mitigation), "policy": _json(self.policy)}


def _changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{name(k)} {text(o, k)} -> {text(n, k)}" for k, (o, n) in changes.items())


def _json(changes: dict[str, tuple]) -> dict:
    return {name(k): {"old": text(o, k), "new": text(n, k)} for k, (o, n) in changes.items()}


def _where(after: str | None) -> str:
    return f"after '{after}'" if after is not None else "first"


# Fields by the policy file's keys.
NAMES = {"protos": "proto", "syn_only": "tcp_flags"}
_ANY = ("src", "dst", "protos", "sport", "dport")


def name(key: str) -> str:
    return NAMES.get(key, key)


def text(value, key: str = "") -> str:
    """A policy value as the operator reads it (key: its field's)."""
    if key == "syn_only":
        return "syn" if value else "any"
    if value is None:
        return "any" if key in _ANY else "never" if key == "forget" else "none"
    if isinstance(value, Rate):
        return value.text
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format_duration(value)
    if isinstance(value, PrefixSet):
        return f"{len(value)} prefixes"
    if isinstance(value, (tuple, list, frozenset)):
        items = sorted(value) if isinstance(value, frozenset) else value
        return "[" + ", ".join(f"{v[0]}-{v[1]}" if isinstance(v, tuple) and v[0] != v[1]
                               else str(v[0]) if isinstance(v, tuple) else str(v) for v in items) + "]"
    return str(value)


def comparable(value):
    """What compares: a rate by its value, not how it was written."""
    if isinstance(value, Rate):
        return (value.per_second, value.unit)
    return value


def _addresses(rule: Rule, fld: str):
    written = getattr(rule, f"{fld}_text")
    if written is not None:
        return written
    value = getattr(rule, fld)
    return None if value is None else tuple(sorted(str(p) for p in value))


def rule_values(rule: Rule) -> dict:
    """The compared fields of a rule: src and dst as written."""
    return {f: _addresses(rule, f) if f in ("src", "dst") else getattr(rule, f) for f in RULE_FIELDS}


def describe_rule(rule: Rule) -> str:
    vals = rule_values(rule)
    shown = [f"{name(k)} {text(v, k)}" for k, v in vals.items()
             if k != "action" and v is not None and v is not False and v != _DEFAULTS.get(k)]
    return " ".join([rule.action] + shown)


_DEFAULTS = {"per": "source", "prefix4": 32, "prefix6": 64}


def _sorted_diff(old, new) -> tuple[int, int, list[int], list[int]]:
    """Counts and first SAMPLE keys of new - old and old - new, both sorted
    without repeats: one merge, no set of millions of keys."""
    if old == new:
        return 0, 0, [], []
    n_add = n_rem = 0
    add, rem = [], []
    i = j = 0
    lo, ln = len(old), len(new)
    step = 0
    while i < lo and j < ln:
        if step == 0:
            # Runs that are the same compare a block at a time (in C): a
            # list of millions with a few changes costs little more than one
            # comparison; a block that differs is merged key by key.
            same = old[i:i + _BLOCK]
            if same == new[j:j + _BLOCK]:
                i += len(same)          # a block at the end is shorter
                j += len(same)
                continue
            step = _BLOCK
        step -= 1
        a, b = old[i], new[j]
        if a == b:
            i += 1
            j += 1
        elif a < b:
            n_rem += 1
            if len(rem) < SAMPLE:
                rem.append(a)
            i += 1
        else:
            n_add += 1
            if len(add) < SAMPLE:
                add.append(b)
            j += 1
    rem += list(islice(old, i, i + SAMPLE - len(rem))) if len(rem) < SAMPLE else []
    add += list(islice(new, j, j + SAMPLE - len(add))) if len(add) < SAMPLE else []
    return n_add + ln - j, n_rem + lo - i, add, rem


def _set_change(name: str, old: PrefixSet, new: PrefixSet) -> SetChange | None:
    ch = SetChange(name, 0, 0)
    for fam in (4, 6):
        n_add, n_rem, add, rem = _sorted_diff(old.keys(fam), new.keys(fam))
        ch.added += n_add
        ch.removed += n_rem
        for keys, sample in ((add, ch.added_sample), (rem, ch.removed_sample)):
            sample += [str(Prefix(fam, k >> 8, k & 0xFF)) for k in keys]
    del ch.added_sample[SAMPLE:], ch.removed_sample[SAMPLE:]
    return ch if ch.added or ch.removed else None


def diff(old: Policy | None, new: Policy) -> PolicyDiff:
    """old -> new (old None: nothing applied, every rule added)."""
    d = PolicyDiff()
    old_rules = {r.name: r for r in old.rules} if old else {}
    new_rules = {r.name: r for r in new.rules}
    d.removed = [n for n in old_rules if n not in new_rules]
    for name, r in new_rules.items():
        if name in old_rules:
            a, b = rule_values(old_rules[name]), rule_values(r)
            changed = {k: (a[k], b[k]) for k in RULE_FIELDS if comparable(a[k]) != comparable(b[k])}
            if changed:
                d.changed.append(RuleChange(name, changed))
    # Order: the rules both have, in the new order; those off the longest
    # common run of the old order moved.
    old_order = [n for n in old_rules if n in new_rules]
    new_order = list(new_rules)
    common = [n for n in new_order if n in old_rules]
    kept = set()
    for blk in SequenceMatcher(None, old_order, common, autojunk=False).get_matching_blocks():
        kept.update(common[blk.b:blk.b + blk.size])
    for i, name in enumerate(new_order):
        after = new_order[i - 1] if i else None
        if name not in old_rules:
            d.added.append((name, after))
            d.new_rules[name] = new_rules[name]
        elif name not in kept:
            d.moved.append((name, after))

    old_sets = old.sets if old else {}
    for name in sorted(set(old_sets) | set(new.sets)):
        o, n = old_sets.get(name), new.sets.get(name)
        ch = _set_change(name, o if o is not None else PrefixSet(), n if n is not None else PrefixSet())
        if o is None or n is None:
            ch = ch or SetChange(name, 0, 0)
            ch.state = "added" if o is None else "removed"
        if ch:
            d.sets.append(ch)

    om, nm = old.mitigation if old else Mitigation(), new.mitigation
    d.mitigation = {k: (_mitigation_value(om, k), _mitigation_value(nm, k)) for k in MITIGATION_FIELDS
                    if comparable(_mitigation_value(om, k)) != comparable(_mitigation_value(nm, k))}
    if old is not None:
        d.policy = {k: (_policy_value(old, k), _policy_value(new, k)) for k in POLICY_FIELDS
                    if _policy_value(old, k) != _policy_value(new, k)}
    return d


def _mitigation_value(m: Mitigation, k: str):
    if k == "allow":
        return m.allow if isinstance(m.allow, PrefixSet) else PrefixSet.of(m.allow)
    return getattr(m, k)


def _policy_value(p: Policy, k: str):
    if k == "protect":
        return tuple(sorted(f"{pre}" + (f" port {port}" if port is not None else "") for pre, port in p.protect))
    return getattr(p, k)
