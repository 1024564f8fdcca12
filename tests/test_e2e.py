"""End to end: the real CLI on a veth pair between two namespaces, real traffic.

One lab per module (testing/lab.py). Every test starts with xdpguard detached
from the server veth and leaves it detached (fixture ``xg``), so counters
start at zero. xdpguard runs on the server veth: what the client sends is
what the program sees.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest

from testing.lab import CLIENT4, EXTRA4, EXTRA6, SERVER4, SERVER6, CLIENT6, PIN_ROOT, Lab
from testing.timing import scaled, slowdown, wait_until

pytestmark = pytest.mark.e2e

HEAD = '[policy]\nname = "{name}"\ndefault = "{default}"\n'


def rule(name, action, **kw) -> str:
    out = f'\n[[rule]]\nname = "{name}"\naction = "{action}"\n'
    for k, v in kw.items():
        out += f"{k} = {v!r}\n".replace("'", '"')
    return out


def policy(name, *rules, default="allow") -> str:
    return HEAD.format(name=name, default=default) + "".join(rules)


def ping(lab, src, dst=SERVER4, count=5, interval=0.01, wait=1, timeout=None):
    """(transmitted, received) of ping from src in the client namespace."""
    fam = ["-6"] if ":" in dst else []
    cp = lab.run("client", ["ping", *fam, "-n", "-q", "-c", str(count), "-i", str(interval),
                            "-W", str(wait), "-I", src, dst], timeout=timeout)
    return _ping_summary(cp.stdout)


def counters_reaching(lab, want: dict[str, int]) -> dict:
    """The counters once each rule of `want` has seen that many packets (the
    last ones sent may still be on their way), else as they are at the
    deadline."""
    def reached():
        c = lab.counters()
        return c if all(c[k]["packets"] >= n for k, n in want.items()) else None
    return wait_until(reached, scaled(5), interval=0.1) or lab.counters()


def _ping_summary(text):
    for ln in text.splitlines():
        if "packets transmitted" in ln:
            parts = ln.split(",")
            return int(parts[0].split()[0]), int(parts[1].split()[0])
    raise AssertionError(f"no ping summary in: {text!r}")


@pytest.fixture(scope="module")
def lab():
    from conftest import require_kernel, require_tool
    require_kernel()
    for tool in ("nsenter", "ping", "curl", "nginx", "ss"):
        require_tool(tool)
    # SIGTERM (a CI timeout) becomes KeyboardInterrupt: pytest then still
    # runs this teardown and removes the namespaces.
    def _term(*_):
        raise KeyboardInterrupt("SIGTERM")
    previous = signal.signal(signal.SIGTERM, _term)
    try:
        with Lab() as lab:
            yield lab
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def xg(lab):
    """The lab, with xdpguard detached from the server veth before and after."""
    def clean():
        if (PIN_ROOT / lab.server_ns / lab.server_if).exists():
            lab.detach()
    clean()
    yield lab
    clean()
    assert not (PIN_ROOT / lab.server_ns).exists(), "detach left pins behind"
    assert lab.xdp_on() is None, "detach left an XDP program attached"


# ---------------------------------------------------------------- verdicts and counters

def test_deny_drops_allow_passes_counters_exact(xg):
    lab = xg
    denied = EXTRA4[0]
    p = lab.write_policy("verdicts", policy(
        "verdicts",
        rule("ping", "allow", proto="icmp", src=CLIENT4),
        rule("no-ping", "deny", proto="icmp", src=denied),
        rule("ping6", "allow", proto="icmpv6", src=CLIENT6)))
    lab.apply(p)

    assert ping(lab, CLIENT4, count=20) == (20, 20)
    assert ping(lab, denied, count=10) == (10, 0)
    assert ping(lab, CLIENT6, dst=SERVER6, count=10) == (10, 10)

    c = lab.counters()
    assert c["ping"]["packets"] == 20 and c["ping"]["dropped_packets"] == 0
    assert c["ping"]["bytes"] == 20 * 98          # 14 + 20 + 8 + 56: frame length at XDP
    assert c["no-ping"]["packets"] == 10 and c["no-ping"]["dropped_packets"] == 10
    # Echo requests; neighbour solicitations from the client's address may
    # match the icmpv6 rule too.
    assert 10 <= c["ping6"]["packets"] <= 13 and c["ping6"]["dropped_packets"] == 0


# ---------------------------------------------------------------- rate limits

def test_limit_admits_the_rate(xg):
    lab = xg
    p = lab.write_policy("limits", policy(
        "limits",
        rule("per-src", "limit", proto="udp", dport=9000, rate="200/s", burst=20, per="source"),
        rule("per-rule", "limit", proto="udp", dport=9001, rate="300/s", burst=30, per="rule")))
    lab.apply(p)

    # 10x the limit for 3 s; per-rule traffic comes from two sources that
    # share the one bucket.
    out = {}
    runs = {
        "per-src": dict(srcs=[EXTRA4[0]], port=9000, pps=2000),
        "per-rule": dict(srcs=[EXTRA4[1], EXTRA4[2]], port=9001, pps=3000),
    }
    threads = [threading.Thread(target=lambda k=k, a=a: out.__setitem__(
        k, lab.udp_send("client", dst=SERVER4, seconds=3.0, **a))) for k, a in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(30))
    c = counters_reaching(lab, {k: out[k]["sent"] for k in runs})
    report = []
    for name, rate, burst in (("per-src", 200, 20), ("per-rule", 300, 30)):
        sent, dur = out[name]["sent"], out[name]["duration"]
        admitted = c[name]["packets"] - c[name]["dropped_packets"]
        expected = rate * dur + burst
        report.append(f"{name}: sent {sent} in {dur:.3f}s, admitted {admitted}, expected {expected:.1f} "
                      f"({100 * (admitted - expected) / expected:+.2f}%)")
        assert c[name]["packets"] == sent, report[-1]
        assert sent >= 5 * expected, f"sender too slow to test the limit: {report[-1]}"
        assert abs(admitted - expected) <= 0.05 * expected, report[-1]
    print("\n" + "\n".join(report))


# ---------------------------------------------------------------- re-apply without loss

@pytest.mark.parametrize("old", ["none", "unaged"])
def test_pins_without_seen_filter_look_every_source_up(xg, old):
    """Buckets pinned by an xdpguard without the seen-sources filter
    (bpf/xdpguard.h, map seen), or with its first form (one word per 64
    bits, no epochs), have no bits in this one: the program that takes
    them over gets every bit set, so an established source is looked up
    as before, never sent to the new-source budget."""
    import ctypes

    from xdpguard import bpfsys, loader, pins
    from xdpguard.layout import C
    lab = xg
    lim = rule("per-src", "limit", proto="udp", dport=9000, rate="200/s", burst=20, per="source",
               new_sources="4/h", new_sources_burst=1)
    lab.apply(lab.write_policy("seen-0", policy("seen-0", lim)))
    directory = pins.iface_dir(lab.server_ns, lab.server_if)
    sent = lab.udp_send("client", srcs=[EXTRA4[0]], dst=SERVER4, port=9000, pps=100, seconds=0.3)
    assert counters_reaching(lab, {"per-src": sent["sent"]})["per-src"]["packets"] == sent["sent"]
    (directory / "seen").unlink()          # what an older xdpguard pinned
    if old == "unaged":
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, "seen", 4, 8, C.XG_SEEN_WORDS // 2)
        with bpfsys.closing_fd(fd):
            bpfsys.obj_pin(fd, str(directory / "seen"))
    big = [rule(f"big-{j}", "deny", proto="udp", dport=20000 + j, src=f"198.51.100.{j}") for j in range(80)]
    lab.apply(lab.write_policy("seen-big", policy("seen-big", lim, *big)))   # a new program
    with bpfsys.closing_fd(bpfsys.obj_get(str(directory / "seen"))) as fd:
        assert bpfsys.map_info(fd)["max_entries"] == C.XG_SEEN_WORDS
        values = bpfsys.map_lookup_batch(fd, 4, 8, C.XG_SEEN_WORDS)[1]
    assert loader.seen_bits_valid(values, loader.seen_epoch()) == C.XG_SEEN_PAIRS * C.XG_SEEN_BITS
    # The established source keeps its bucket: its rule's budget (one
    # source in 15 minutes) is spent, yet it passes at its rate.
    before = lab.counters()["per-src"]
    again = lab.udp_send("client", srcs=[EXTRA4[0]], dst=SERVER4, port=9000, pps=100, seconds=0.3)
    c = counters_reaching(lab, {"per-src": before["packets"] + again["sent"]})["per-src"]
    assert c["dropped_packets"] == before["dropped_packets"]


def _reapply_policies(lab):
    base = [rule("stream", "allow", proto="udp", dport=9100, src=CLIENT4),
            rule("ping", "allow", proto="icmp", src=CLIENT4)]
    small = []
    for k in range(3):
        extra = [rule(f"extra-{k}-{j}", "deny", proto="tcp", dport=2000 + 10 * k + j,
                      src=f"192.0.2.{k * 10 + j}") for j in range(k + 2)]
        small.append(lab.write_policy(f"reapply-{k}", policy(f"reapply-{k}", *base, *extra)))
    # More rules than one 64-bit vector word holds: a new shape, a reload.
    big = [rule(f"big-{j}", "deny", proto="udp", dport=20000 + j, src=f"198.51.100.{j}")
           for j in range(80)]
    return base, small, lab.write_policy("reapply-big", policy("reapply-big", *base, *big))


def test_reapply_under_traffic_loses_nothing(xg):
    lab = xg
    base, small, big = _reapply_policies(lab)
    first = lab.apply(lab.write_policy("reapply-0", policy("reapply-start", *base)))

    sink = lab.udp_sink("server", port=9100)
    # Both flows must outlast the re-applies, which take as long as the
    # machine makes them; the stream is stopped once they are done.
    stream = lab.udp_send("client", [CLIENT4], SERVER4, 9100, pps=1000, seconds=scaled(60, cap=600),
                          background=True)
    npings = int(min(300 * slowdown(), 3000))
    pinger = lab.popen("client", ["ping", "-n", "-q", "-i", "0.01", "-c", str(npings), "-I", CLIENT4, SERVER4],
                       what="ping")

    def flowing():
        c = lab.counters()
        return c["stream"]["packets"] > 0 and c["ping"]["packets"] > 0
    assert wait_until(flowing, scaled(10), interval=0.1), "the stream and ping did not start"
    ids = []
    t0 = time.monotonic()
    for p in small:                   # in place: same program, new generation
        ids.append(lab.apply(p)["prog_id"])
    t_inplace = time.monotonic() - t0
    ping_out, _ = pinger.popen.communicate(timeout=scaled(20) + npings * 0.01)
    t0 = time.monotonic()
    ids.append(lab.apply(big)["prog_id"])   # reload with XDP_FLAGS_REPLACE
    t_reload = time.monotonic() - t0
    # The reloaded program carries the stream for a while.
    after = lab.counters()["stream"]["packets"]
    assert wait_until(lambda: lab.counters()["stream"]["packets"] >= after + 300, scaled(10), interval=0.1)
    sent = lab.stop_json(stream)
    counters_reaching(lab, {"stream": sent["sent"]})
    got = lab.stop_json(sink)

    assert ids[:3] == [first["prog_id"]] * 3, f"in-place re-apply changed the program: {ids}"
    assert ids[3] != first["prog_id"], "a policy of 82 rules should have forced a reload"
    tx, rx = _ping_summary(ping_out)
    lost_udp = sent["sent"] - got["unique"]
    print(f"\nre-apply: 3 in place in {t_inplace:.2f}s, reload in {t_reload:.2f}s; "
          f"udp sent {sent['sent']} received {got['unique']} lost {lost_udp}, of which the sink's "
          f"socket dropped {got['drops']} (missing seqs {got['missing']}); ping {tx} sent {rx} received")
    assert (tx, rx) == (npings, npings), f"ping lost {tx - rx} during in-place re-apply"
    # A sink that falls behind (a slow machine) overflows its own socket:
    # those packets were delivered, and are the only ones allowed missing.
    assert got["drops"] is not None, "the sink did not find its socket in /proc/net/udp"
    assert lost_udp == got["drops"], f"udp stream lost {lost_udp - got['drops']} beyond socket drops: {got['missing']}"
    c = lab.counters()
    # Counters are kept by rule name across in-place re-apply and reload.
    assert c["stream"]["packets"] == sent["sent"] and c["stream"]["dropped_packets"] == 0
    assert c["ping"]["packets"] == npings


def _trie_ids(lab) -> dict[int, int]:
    """Map id of the IPv6 classifier trie in each generation's slot."""
    from xdpguard import bpfsys
    out = {}
    with bpfsys.closing_fd(bpfsys.obj_get(str(PIN_ROOT / lab.server_ns / lab.server_if / "lpm6"))) as fd:
        for gen in (0, 1):
            inner = bpfsys.inner_map_fd(fd, gen)
            if inner is not None:
                with bpfsys.closing_fd(inner):
                    out[gen] = bpfsys.map_info(inner)["id"]
    return out


def test_reapply_swaps_whole_tries(xg):
    """A re-apply puts new tries, of the policy's own size, in the inactive
    generation: 3,000 more trie entries go in place (the tries are no part
    of the program's shape), a trie is never reused, and rollback flips
    back to the previous trie whole."""
    lab = xg
    banned = EXTRA6[0]
    hosts = [f"fd00:200::{0x1000 + j:x}" for j in range(3000)] + [banned]
    small = lab.write_policy("tries-small", policy("tries-small", rule("deny-doc", "deny", src="2001:db8::/32")))
    big = lab.write_policy("tries-big", policy(
        "tries-big", rule("deny-many", "deny", src=hosts)))   # /128s: past the source table, in the trie
    first = lab.apply(small)
    assert ping(lab, banned, SERVER6, count=3) == (3, 3)
    ids0 = _trie_ids(lab)
    assert list(ids0) == [0]

    assert lab.apply(big)["prog_id"] == first["prog_id"], "a bigger trie forced a reload"
    assert ping(lab, banned, SERVER6, count=3) == (3, 0)
    assert ping(lab, CLIENT6, SERVER6, count=3) == (3, 3)
    ids1 = _trie_ids(lab)
    assert ids1[0] == ids0[0] and 1 in ids1            # the running policy's trie stays for rollback
    lpm6 = lab.status()[0]["maps"]["lpm6"]
    assert lpm6["entries"] >= 3001 and lpm6["capacity"] >= lpm6["entries"]

    assert lab.apply(small)["prog_id"] == first["prog_id"]
    ids2 = _trie_ids(lab)
    assert ids2[1] == ids1[1] and ids2[0] not in (ids0[0], ids1[1]), "a trie was written over, not replaced"
    assert ping(lab, banned, SERVER6, count=3) == (3, 3)

    lab.xdpguard("rollback", *lab._where("server"))
    assert _trie_ids(lab) == ids2
    assert ping(lab, banned, SERVER6, count=3) == (3, 0)
    assert lab.status()[0]["maps"]["lpm6"]["entries"] == lpm6["entries"]


# ---------------------------------------------------------------- detach

def test_detach_restores_traffic(xg):
    lab = xg
    lab.apply(lab.write_policy("deny-all-icmp", policy(
        "deny-icmp", rule("no-icmp", "deny", proto="icmp"))))
    assert lab.xdp_on() is not None
    assert ping(lab, CLIENT4, count=3) == (3, 0)
    cp = lab.detach()
    assert "detached" in cp.stdout
    assert lab.xdp_on() is None
    assert not (PIN_ROOT / lab.server_ns).exists()
    assert lab.status() == []
    assert ping(lab, CLIENT4, count=3) == (3, 3)


# ---------------------------------------------------------------- attach modes

@pytest.mark.parametrize("mode,shown", [("native", "xdp"), ("generic", "xdpgeneric")])
def test_modes(xg, mode, shown):
    lab = xg
    denied = EXTRA4[3]
    doc = lab.apply(lab.write_policy(f"mode-{mode}", policy(
        f"mode-{mode}",
        rule("ping", "allow", proto="icmp", src=CLIENT4),
        rule("no-ping", "deny", proto="icmp", src=denied))), mode=mode)
    assert doc["mode"] == mode
    st = lab.status()
    assert len(st) == 1 and st[0]["mode"] == mode and st[0]["attached"] is True
    assert st[0]["prog_id"] == doc["prog_id"]
    assert lab.xdp_on() == shown
    assert ping(lab, CLIENT4, count=10) == (10, 10)
    assert ping(lab, denied, count=10) == (10, 0)
    c = lab.counters()
    assert c["ping"]["packets"] == 10 and c["ping"]["dropped_packets"] == 0
    assert c["no-ping"]["packets"] == 10 and c["no-ping"]["dropped_packets"] == 10


# ---------------------------------------------------------------- real TCP service

def _curl(lab, url, host=None, max_time=None):
    """curl from the client. A request that is to time out (exit 28) names
    its max_time; the others get one stretched for this machine."""
    max_time = scaled(2) if max_time is None else max_time
    cmd = ["curl", "-sS", "-g", "--max-time", str(max_time), url]
    if host:
        cmd[1:1] = ["-H", f"Host: {host}"]
    return lab.run("client", cmd, timeout=max_time + scaled(10))


def test_nginx_allow_then_deny(xg):
    lab = xg
    nginx = lab.start_nginx()
    other = lab.tcp_server(port=8080)
    try:
        lab.apply(lab.write_policy("web-allow", policy(
            "web-allow", rule("web", "allow", proto="tcp", dport=80, src="10.200.0.0/24"),
            rule("web6", "allow", proto="tcp", dport=80, src="fd00:200::/64"),
            default="deny")))
        for host in ("a.lab", "b.lab"):
            cp = _curl(lab, f"http://{SERVER4}/", host)
            assert cp.returncode == 0 and cp.stdout == f"vhost {host}\n", cp
        cp = _curl(lab, f"http://[{SERVER6}]/", "b.lab")
        assert cp.returncode == 0 and cp.stdout == "vhost b.lab\n", cp
        assert _curl(lab, f"http://{SERVER4}:8080/", max_time=2).returncode == 28   # default deny
        c = lab.counters()
        assert c["web"]["packets"] >= 2 * 5 and c["web"]["dropped_packets"] == 0
        assert c["web6"]["packets"] >= 5

        lab.apply(lab.write_policy("web-deny", policy(
            "web-deny", rule("no-web", "deny", proto="tcp", dport=80))))
        cp = _curl(lab, f"http://{SERVER4}/", "a.lab", max_time=2)
        assert cp.returncode == 28, f"expected a curl timeout (28): {cp}"
        cp = _curl(lab, f"http://{SERVER4}:8080/")
        assert cp.returncode == 0 and cp.stdout.startswith("hello"), cp
        c = lab.counters()
        assert c["no-web"]["packets"] >= 1 and c["no-web"]["dropped_packets"] == c["no-web"]["packets"]
    finally:
        lab.stop(nginx)
        lab.stop(other)
