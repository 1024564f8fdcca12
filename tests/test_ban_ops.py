"""Manual bans during an incident (issue 16, items 6 and 7): a ban acts on
one interface unless --all says more, and says where it acted; host bits
are warned about; `ban --from-file`, `unban --all`, and `bans --json` as an
export that `ban --from-file` reads back.

The real CLI in a lab (testing/lab.py) guarded on both ends, in two
namespaces, with pings from banned and unbanned addresses; and a veth pair
guarded on both ends in one namespace, for --all. No test here runs a ban
without --iface or --netns: other labs on the machine are not ours.
"""
from __future__ import annotations

import json
import time

import pytest

from testing.lab import CLIENT4, EXTRA4, EXTRA6, SERVER4, SERVER6, Lab, VethPair, json_docs

pytestmark = pytest.mark.e2e

POLICY = '[policy]\nname = "bans"\n[[rule]]\nname = "ping"\nproto = ["icmp", "icmpv6"]\naction = "allow"\n'


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        pol = lab.write_policy("bans", POLICY)
        lab.apply(pol)
        lab.apply(pol, side="client")
        yield lab


def _srv(lab):
    return ["--iface", lab.server_if, "--netns", lab.server_ns]


def _cli(lab):
    return ["--iface", lab.client_if, "--netns", lab.client_ns]


def _bans(lab, where) -> dict:
    return {b["prefix"]: b for b in json.loads(lab.xdpguard("bans", *where, "--json").stdout)["bans"]}


def _passes(lab, src) -> bool:
    six = ":" in src
    cp = lab.run("client", ["ping", "-6" if six else "-4", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1",
                            "-I", src, SERVER6 if six else SERVER4], timeout=30)
    return cp.returncode == 0


def test_ban_acts_on_one_interface_unless_all(lab):
    src = EXTRA4[0]
    # Without --iface or --netns both lab interfaces (and any other here)
    # are selected: refused, nothing banned.
    cp = lab.xdpguard("ban", src, check=False)
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert f"{lab.server_ns}/{lab.server_if}" in cp.stderr and f"{lab.client_ns}/{lab.client_if}" in cp.stderr
    assert "--all" in cp.stderr and "Traceback" not in cp.stderr
    assert _bans(lab, _srv(lab)) == {} and _bans(lab, _cli(lab)) == {}
    assert _passes(lab, src)

    # --netns alone selects the one interface there; the output names it.
    cp = lab.xdpguard("ban", src, "--ttl", "1h", "--netns", lab.server_ns)
    assert cp.stdout.strip() == f"banned {src}/32 for 1h0m on {lab.server_ns}/{lab.server_if}"
    assert set(_bans(lab, _srv(lab))) == {f"{src}/32"} and _bans(lab, _cli(lab)) == {}
    assert not _passes(lab, src) and _passes(lab, CLIENT4)

    cp = lab.xdpguard("unban", src, check=False)
    assert cp.returncode == 2 and "--all" in cp.stderr
    assert not _passes(lab, src)
    cp = lab.xdpguard("unban", src, *_srv(lab), "--json")
    assert json.loads(cp.stdout)["interfaces"] == [f"{lab.server_ns}/{lab.server_if}"]
    assert _passes(lab, src)


def test_host_bits_are_warned(lab):
    cp = lab.xdpguard("ban", "192.0.2.77/24", *_srv(lab))
    assert "warning: '192.0.2.77/24' has host bits set; banning 192.0.2.0/24" in cp.stderr
    assert "192.0.2.0/24" in _bans(lab, _srv(lab))
    cp = lab.xdpguard("unban", "192.0.2.77/24", *_srv(lab))
    assert "has host bits set" in cp.stderr and _bans(lab, _srv(lab)) == {}


def test_from_file_export_and_unban_all(lab, tmp_path):
    f = tmp_path / "incident.txt"
    f.write_text(f"""# incident 42: from the abuse desk
{EXTRA4[1]}
   {EXTRA4[2]}/32 1h scanner from the abuse report
{EXTRA6[0]} 0 by hand, permanent, ticket #7

192.0.2.77/24 30m
""")
    cp = lab.xdpguard("ban", "--from-file", f, "--ttl", "2h", "--reason", "incident 42", *_srv(lab))
    assert cp.stdout.strip() == f"banned 4 prefixes from {f} on {lab.server_ns}/{lab.server_if}"
    assert f"warning: {f}:6: '192.0.2.77/24' has host bits set; banning 192.0.2.0/24" in cp.stderr
    got = _bans(lab, _srv(lab))
    want = {f"{EXTRA4[1]}/32": ("incident 42", 7200), f"{EXTRA4[2]}/32": ("scanner from the abuse report", 3600),
            f"{EXTRA6[0]}/128": ("by hand, permanent, ticket #7", None), "192.0.2.0/24": ("incident 42", 1800)}
    assert set(got) == set(want)
    for prefix, (reason, ttl) in want.items():
        b = got[prefix]
        assert b["reason"] == reason and b["source"] == "manual"
        if ttl is None:
            assert b["remaining_s"] is None and b["expires"] is None
        else:
            assert ttl - 120 < b["remaining_s"] <= ttl
            assert abs(b["expires"] - (time.time() + b["remaining_s"])) < 60
    assert not _passes(lab, EXTRA4[2]) and not _passes(lab, EXTRA6[0]) and _passes(lab, CLIENT4)

    # A bad line, or a protected address anywhere, and nothing is banned.
    for bad, needle in ((f"{EXTRA4[3]}\nnot-an-address 1h\n", f"{f}:2: 'not-an-address' is not an address"),
                        (f"{EXTRA4[3]}\n{EXTRA4[4]} 5x\n", f"{f}:2: "),
                        (f"{EXTRA4[3]}\n{SERVER4}\n", "address of this host")):
        f.write_text(bad)
        cp = lab.xdpguard("ban", "--from-file", f, *_srv(lab), check=False)
        assert cp.returncode == 2 and needle in cp.stderr, cp.stderr
        assert set(_bans(lab, _srv(lab))) == set(want)

    # bans --json is an export: saved, every ban lifted (unban --all, on the
    # interface named only), and put back from the export.
    export = tmp_path / "bans.json"
    export.write_text(lab.xdpguard("bans", *_srv(lab), "--json").stdout)
    lab.xdpguard("ban", "192.0.2.9", *_cli(lab))
    cp = lab.xdpguard("unban", "--all", *_srv(lab))
    assert cp.stdout.strip() == f"lifted 4 bans on {lab.server_ns}/{lab.server_if}"
    assert _bans(lab, _srv(lab)) == {} and set(_bans(lab, _cli(lab))) == {"192.0.2.9/32"}
    assert _passes(lab, EXTRA4[2]) and _passes(lab, EXTRA6[0])
    lab.xdpguard("ban", "--from-file", export, *_srv(lab))
    back = _bans(lab, _srv(lab))
    assert {p: b["reason"] for p, b in back.items()} == {p: r for p, (r, _t) in want.items()}
    for p, b in back.items():
        if got[p]["remaining_s"] is None:
            assert b["remaining_s"] is None
        else:
            assert abs(b["remaining_s"] - got[p]["remaining_s"]) < 120
    assert not _passes(lab, EXTRA4[2])
    cp = lab.xdpguard("unban", "--all", *_srv(lab), "--json")
    assert sorted(json_docs(cp.stdout)[0]["lifted"][f"{lab.server_ns}/{lab.server_if}"]) == sorted(want)
    cp = lab.xdpguard("unban", *_srv(lab), check=False)
    assert cp.returncode == 2 and "--all" in cp.stderr
    lab.xdpguard("unban", "--all", *_cli(lab))


def test_all_acts_on_every_selected_interface(tmp_path):
    """Two guarded interfaces in one namespace: --netns selects both, so a
    ban needs --all, and then names both."""
    import shutil
    import subprocess

    from testing.lab import PIN_ROOT, REPO, xdpguard_cmd
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)

    def xg(*argv, check=True):
        cp = subprocess.run([*xdpguard_cmd(), *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                            timeout=600)
        assert not check or cp.returncode == 0, cp.stdout + cp.stderr
        return cp
    with VethPair("xgba", split=False) as v:
        try:
            for ifc in (v.a, v.b):
                xg("apply", pol, "--iface", ifc, "--netns", v.ns_a)
            names = [f"{v.ns_a}/{v.a}", f"{v.ns_a}/{v.b}"]
            cp = xg("ban", "192.0.2.1", "--netns", v.ns_a, check=False)
            assert cp.returncode == 2 and all(n in cp.stderr for n in names), cp.stderr
            cp = xg("ban", "192.0.2.1", "--netns", v.ns_a, "--all")
            assert cp.stdout.strip() == f"banned 192.0.2.1/32 for 10m0s on {', '.join(names)}"
            xg("ban", "192.0.2.2", "--iface", v.b, "--netns", v.ns_a)
            cp = xg("unban", "--all", "--netns", v.ns_a, "--json")
            assert json.loads(cp.stdout)["lifted"] == {names[0]: ["192.0.2.1/32"],
                                                       names[1]: ["192.0.2.1/32", "192.0.2.2/32"]}
            assert json.loads(xg("bans", "--netns", v.ns_a, "--json").stdout)["bans"] == []
        finally:
            for ifc in (v.a, v.b):
                xg("detach", "--iface", ifc, "--netns", v.ns_a, check=False)
            shutil.rmtree(PIN_ROOT / v.ns_a, ignore_errors=True)
