"""policydiff: the differences of two policies, against oracles
(hypothesis-generated policy files): a policy against itself differs in
nothing; the reported rule changes turn the old rule list into the new
one; set counts are the set differences; old -> new mirrors new -> old."""
from __future__ import annotations

import copy

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xdpguard import policydiff
from xdpguard.policy import load

NAMES = ["a", "b", "c", "d", "e", "f"]
ADDRS = ["@s1", "@s2", "10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]
PREFIXES = ["203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/25", "10.1.0.0/16", "2001:db8:bad::/48",
            "2001:db8::1", "0.0.0.0/0"]
RATES = ["10/s", "600/m", "20/s", "1Mbit/s"]


@st.composite
def rule_text(draw, name: str) -> str:
    action = draw(st.sampled_from(["allow", "deny", "limit"]))
    lines = ["[[rule]]", f'name = "{name}"', f'action = "{action}"']
    if draw(st.booleans()):
        src = draw(st.lists(st.sampled_from(ADDRS), min_size=1, max_size=3, unique=True))
        lines.append("src = [" + ", ".join(f'"{s}"' for s in src) + "]")
    if draw(st.booleans()):
        lines.append(f'proto = "{draw(st.sampled_from(["tcp", "udp"]))}"')
        if draw(st.booleans()):
            lines.append(f"dport = {draw(st.sampled_from([22, 53, 80, 443]))}")
    if action == "limit":
        lines.append(f'rate = "{draw(st.sampled_from(RATES))}"')
        if draw(st.booleans()):
            lines.append('per = "rule"')
    if draw(st.booleans()):
        lines.append("log = true")
    return "\n".join(lines) + "\n"


@st.composite
def policy_text(draw) -> str:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True))
    head = [f'[policy]\ndefault = "{draw(st.sampled_from(["allow", "deny"]))}"\n']
    for s in ("s1", "s2"):
        items = draw(st.lists(st.sampled_from(PREFIXES), max_size=5, unique=True))
        head.append(f"[sets]\n" if s == "s1" else "")
        head.append(f"{s} = [" + ", ".join(f'"{p}"' for p in items) + "]\n")
    mit = ""
    if draw(st.booleans()):
        mit = (f"[mitigation]\nenabled = {draw(st.sampled_from(['true', 'false']))}\n"
               f'syn_rate = "{draw(st.sampled_from(["100/s", "200/s", "6000/m"]))}"\n'
               f'ban = "{draw(st.sampled_from(["10m", "600s", "1h"]))}"\n')
    return "".join(head) + "".join(draw(rule_text(n)) for n in names) + mit


def read(text: str):
    return load("gen.toml", text=text)


def patch(rules, d: policydiff.PolicyDiff):
    """The old rule list with the reported changes applied: removed rules
    out, changed fields set, added and moved rules put after the rule
    each follows (once that one is in place)."""
    pool = {r.name: copy.copy(r) for r in rules}
    pool.update(d.new_rules)
    for c in d.changed:
        for k, (_old, new) in c.fields.items():
            if k in ("src", "dst"):
                # as written; "any" clears the compiled set too
                setattr(pool[c.name], f"{k}_text", new)
                if new is None:
                    setattr(pool[c.name], k, None)
            else:
                setattr(pool[c.name], k, new)
    moved = dict(d.moved)
    out = [pool[r.name] for r in rules if r.name not in d.removed and r.name not in moved]
    pending = dict(d.added) | moved
    while pending:
        names = [r.name for r in out]
        ready = [n for n, after in pending.items() if after is None or after in names]
        assert ready, pending
        for n in ready:
            after = pending.pop(n)
            out.insert(0 if after is None else [r.name for r in out].index(after) + 1, pool[n])
    return out


def values(rules):
    """Rules as the diff compares them (a rate by its value)."""
    return [(r.name, {k: policydiff.comparable(v) for k, v in policydiff.rule_values(r).items()}) for r in rules]


def keys(prefixes):
    return {str(p) for p in prefixes}


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(policy_text())
def test_diff_of_itself_is_empty(text):
    a = read(text)
    d = policydiff.diff(a, read(text))
    assert not d and d.summary() == "no changes" and d.lines() == []


@SETTINGS
@given(policy_text(), policy_text())
@example("[policy]\ndefault = \"allow\"\n" + "".join(f'[[rule]]\nname = "{n}"\naction = "deny"\n' for n in "abcd"),
         "[policy]\ndefault = \"allow\"\n" + "".join(f'[[rule]]\nname = "{n}"\naction = "deny"\n' for n in "dcba"))
def test_changes_turn_old_rules_into_new(ta, tb):
    a, b = read(ta), read(tb)
    d = policydiff.diff(a, b)
    assert values(patch(a.rules, d)) == values(b.rules)
    # Mirrored: what one way adds the other removes; changes swap sides.
    r = policydiff.diff(b, a)
    assert sorted(n for n, _ in d.added) == sorted(r.removed)
    assert sorted(d.removed) == sorted(n for n, _ in r.added)
    assert {c.name: {k: (n, o) for k, (o, n) in c.fields.items()} for c in d.changed} == \
        {c.name: c.fields for c in r.changed}
    assert bool(d) == bool(r) == (ta != tb and (values(a.rules) != values(b.rules) or bool(d.sets)
                                               or bool(d.mitigation) or bool(d.policy)))


@SETTINGS
@given(policy_text(), policy_text())
def test_set_counts_are_set_differences(ta, tb):
    a, b = read(ta), read(tb)
    d = policydiff.diff(a, b)
    got = {s.name: (s.added, s.removed, set(s.added_sample), set(s.removed_sample)) for s in d.sets}
    for name in ("s1", "s2"):
        add, rem = keys(b.sets[name]) - keys(a.sets[name]), keys(a.sets[name]) - keys(b.sets[name])
        assert got.get(name, (0, 0, set(), set())) == (len(add), len(rem), add, rem)
    # Thresholds: exactly the ones that differ, by value ("600s" is "10m").
    for k in policydiff.MITIGATION_FIELDS:
        same = policydiff.comparable(getattr(a.mitigation, k)) == policydiff.comparable(getattr(b.mitigation, k))
        assert (k in d.mitigation) != same or k == "allow"


def test_nothing_applied_adds_every_rule():
    b = read('[policy]\ndefault = "deny"\n[[rule]]\nname = "x"\naction = "allow"\n'
             '[[rule]]\nname = "y"\naction = "deny"\n')
    d = policydiff.diff(None, b)
    assert d.added == [("x", None), ("y", "x")] and d.summary().startswith("rules +2 -0 ~0")


@SETTINGS
@given(st.sets(st.integers(0, 3000), max_size=600), st.sets(st.integers(0, 3000), max_size=600),
       st.sets(st.integers(0, 3000), max_size=600))
def test_sorted_diff_is_the_set_difference(common, only_old, only_new):
    """Long shared runs (compared a block at a time) around the changes."""
    old, new = sorted(common | only_old), sorted(common | only_new)
    n_add, n_rem, add, rem = policydiff._sorted_diff(old, new)
    assert (n_add, n_rem) == (len(set(new) - set(old)), len(set(old) - set(new)))
    assert add == sorted(set(new) - set(old))[:policydiff.SAMPLE]
    assert rem == sorted(set(old) - set(new))[:policydiff.SAMPLE]


def test_large_set_counted_by_merge():
    from array import array

    from xdpguard.policy import PrefixSet
    old = PrefixSet(array("Q", (i << 16 | 24 for i in range(0, 200_000, 2))))
    new = PrefixSet(array("Q", (i << 16 | 24 for i in range(1, 200_001, 2))))
    ch = policydiff._set_change("big", old, new)
    assert (ch.added, ch.removed) == (100_000, 100_000)
    assert len(ch.added_sample) == len(ch.removed_sample) == policydiff.SAMPLE
    assert policydiff._set_change("big", old, old) is None


def test_lines_and_summary_words():
    a = read('[policy]\ndefault = "deny"\n[sets]\nbad = ["203.0.113.0/24"]\n'
             '[[rule]]\nname = "block"\nsrc = "@bad"\naction = "deny"\n'
             '[[rule]]\nname = "ssh"\nproto = "tcp"\ndport = 22\naction = "limit"\nrate = "10/m"\n'
             '[mitigation]\nsyn_rate = "100/s"\n')
    b = read('[policy]\ndefault = "deny"\n[sets]\nbad = ["203.0.113.0/24", "198.51.100.0/24"]\n'
             '[[rule]]\nname = "ssh"\nproto = "tcp"\ndport = 22\naction = "limit"\nrate = "20/m"\n'
             '[[rule]]\nname = "block"\nsrc = "@bad"\naction = "deny"\n'
             '[[rule]]\nname = "web"\nproto = "tcp"\ndport = 443\naction = "allow"\n'
             '[mitigation]\nsyn_rate = "200/s"\n')
    d = policydiff.diff(a, b)
    assert d.summary() == ("rules +1 -0 ~1 (moved 1); set 'bad' +1 -0 prefixes; "
                           "mitigation syn_rate 100/s -> 200/s")
    assert d.lines() == ["+ rule 'web' after 'block': allow proto [tcp] dport [443]",
                         "~ rule 'ssh': rate 10/m -> 20/m",
                         "> rule 'ssh' now first",
                         "~ set 'bad': +1 -0 prefixes", "    + 198.51.100.0/24",
                         "~ mitigation syn_rate: 100/s -> 200/s"]
    j = d.as_json()
    assert j["rules_changed"] == [{"rule": "ssh", "fields": {"rate": {"old": "10/m", "new": "20/m"}}}]
    assert j["sets"][0]["added"] == 1 and j["mitigation"] == {"syn_rate": {"old": "100/s", "new": "200/s"}}
