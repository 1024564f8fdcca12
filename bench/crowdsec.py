"""CrowdSec bouncers side by side: xdpguard (XDP) and Debian's
crowdsec-firewall-bouncer (nftables), on one Local API, in one run.

    .venv/bin/python -m bench.crowdsec [--decisions 100000] [--adds 5] [--json-out PATH]

Two veth labs (testing/lab.py), one per bouncer: xdpguard on lab X's
server veth, the firewall bouncer inside lab N's server namespace, where
its nftables tables live (never the machine's own: its tables, named
xgcs<tag>, are deleted at the end, and the namespace with them). The LAPI
(testing/engines.py) runs in lab N's server namespace too, on its
loopback; xdpguard's watch is started there, managing lab X through
--netns. Both labs have the same addresses: one decision bans a source in
both. Both bouncers pull every second.

Measured:
  * time from `cscli decisions add --ip X` (its start) to the first packet
    dropped: a UDP stream from X at 1,000 packets/s to a sink on each
    server; the drop begins after the last packet the sink received;
  * time to enforce 100,000 decisions (`cscli decisions import`), from the
    end of the import, polling xdpguard's ban map and the bouncer's nft set;
  * a flood from a banned range (a range decision), the same hping3 flood
    into each lab in turn: what reached the server's socket (should be
    nothing) and how many packets were dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testing.engines import CrowdSecLAPI, Host, LockWatch, blocklist_csv  # noqa: E402
from testing.lab import EXTRA4, SERVER4, SPOOF_NET, Lab, nsenter  # noqa: E402
from xdpguard import bans  # noqa: E402

PPS = 1000
SINK_PORT = 9100
FLOOD_SRC_NET = SPOOF_NET            # 10.200.1.0/24: every address of it is the client's

# A UDP sink that remembers the wall time of the last datagram it got.
_SINK = r"""
import json, signal, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.05)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
n, last = 0, None
while not stop:
    try:
        s.recv(2048)
    except (socket.timeout, InterruptedError):
        continue
    n, last = n + 1, time.time()
print(json.dumps({"received": n, "last": last}), flush=True)
"""

POLICY = """
[policy]
name = "bench-crowdsec"
[[rule]]
name = "all"
action = "allow"
[crowdsec]
lapi = "{lapi}"
key_file = "{key_file}"
interval = "1s"
"""

FW_CONFIG = """\
mode: nftables
pid_dir: {d}/
update_frequency: 1s
daemonize: false
log_mode: file
log_dir: {d}/
log_level: info
api_url: {lapi}/
api_key: {key}
insecure_skip_verify: false
disable_ipv6: false
deny_action: DROP
deny_log: false
supported_decisions_types:
  - ban
blacklists_ipv4: {set4}
blacklists_ipv6: {set6}
nftables:
  ipv4:
    enabled: true
    set-only: false
    table: {table4}
    chain: {table4}-chain
  ipv6:
    enabled: true
    set-only: false
    table: {table6}
    chain: {table6}-chain
prometheus:
  enabled: false
  listen_addr: 127.0.0.1
  listen_port: 60601
"""


def log(msg: str) -> None:
    print(f"bench.crowdsec: {msg}", file=sys.stderr, flush=True)


class FirewallBouncer:
    """crowdsec-firewall-bouncer in a namespace, on tables of its own."""

    def __init__(self, directory: Path, netns: str, lapi: str, key: str):
        self.dir, self.netns = directory, netns
        tag = secrets.token_hex(3)
        self.table4, self.table6 = f"xgcs{tag}", f"xgcs6{tag}"
        self.set4, self.set6 = f"xgcs-{tag}", f"xgcs6-{tag}"
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "bouncer.yaml"
        self.conf.write_text(FW_CONFIG.format(d=directory, lapi=lapi, key=key, set4=self.set4, set6=self.set6,
                                              table4=self.table4, table6=self.table6))
        os.chmod(self.conf, 0o600)
        exe = shutil.which("crowdsec-firewall-bouncer") or "/usr/bin/crowdsec-firewall-bouncer"
        self.p = subprocess.Popen(nsenter(netns, [exe, "-c", str(self.conf)]), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)

    def nft(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(nsenter(self.netns, ["nft", *args]), capture_output=True, text=True, timeout=120)

    def count(self) -> int:
        """Elements in its IPv4 set (0 while the set is not there)."""
        cp = self.nft("-j", "list", "set", "ip", self.table4, self.set4)
        if cp.returncode != 0:
            return 0
        for obj in json.loads(cp.stdout).get("nftables", []):
            if "set" in obj:
                return len(obj["set"].get("elem", []))
        return 0

    def has(self, addr: str) -> bool:
        """Whether its IPv4 set covers addr."""
        return self.nft("get", "element", "ip", self.table4, self.set4, f"{{ {addr} }}").returncode == 0

    def ready(self) -> bool:
        return self.nft("list", "table", "ip", self.table4).returncode == 0

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        # Its tables, whatever it left: they live in the lab's namespace
        # only, and go with it too.
        for fam, table in (("ip", self.table4), ("ip6", self.table6)):
            self.nft("delete", "table", fam, table)


def _sink(lab: Lab):
    p = lab.popen("server", [sys.executable, "-u", "-c", _SINK, SERVER4, str(SINK_PORT)], what="udp sink")
    if p.popen.stdout.readline().strip() != "ready":
        raise RuntimeError("udp sink did not start")
    return p


def add_to_drop(lapi: CrowdSecLAPI, labs: dict[str, Lab], src: str, ours: set[int],
                deadline: float = 30.0) -> dict:
    """Seconds from the start of `cscli decisions add --ip src` to the first
    packet from src dropped, in each lab; and how long the pin lock was
    another process's until xdpguard's first drop."""
    sinks = {k: _sink(lab) for k, lab in labs.items()}
    senders = {k: lab.udp_send("client", [src], SERVER4, SINK_PORT, PPS, deadline, background=True)
               for k, lab in labs.items()}
    time.sleep(1.0)
    locks = LockWatch(ours)
    t0 = time.time()
    lapi.cscli("decisions", "add", "--ip", src, "--duration", "10m", "--reason", "bench")
    t_cscli = time.time() - t0
    time.sleep(min(deadline - 2, 15.0))
    locks.close()
    for k, lab in labs.items():
        lab.stop(senders[k])
    out = {"cscli_s": t_cscli, "pin_lock_foreign": locks.share()}
    for k, lab in labs.items():
        last = lab.stop_json(sinks[k])["last"]
        out[k] = None if last is None or last >= t0 + min(deadline - 2, 15.0) - 0.5 else \
            max(0.0, last + 1.0 / PPS - t0)
        if k == "xdpguard" and out[k] is not None:
            out["pin_lock_foreign_s"] = locks.foreign_between(t0, t0 + out[k])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=100_000, help="decisions imported at once (default 100000)")
    ap.add_argument("--adds", type=int, default=5, help="add-to-drop measurements (default 5)")
    ap.add_argument("--enforce-timeout", type=float, default=120.0,
                    help="how long to wait for the imported decisions, and then for the flood's range "
                         "decision (default 120 s)")
    ap.add_argument("--flood-packets", type=int, default=300_000, help="packets of each flood (default 300000)")
    ap.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "crowdsec.json")
    args = ap.parse_args(argv)
    for tool in ("crowdsec", "cscli", "crowdsec-firewall-bouncer", "nft", "hping3"):
        if not shutil.which(tool):
            print(f"bench.crowdsec: {tool} is missing (scripts/setup.sh installs it)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="xgbench-crowdsec-"))
    result: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pps": PPS,
                    "load_before": os.getloadavg()}
    fw = host = None
    try:
        with Lab() as labx, Lab() as labn:
            with CrowdSecLAPI(work / "lapi", netns=labn.server_ns) as lapi:
                key_file = work / "xdpguard.key"
                key_file.write_text(lapi.add_bouncer("xdpguard") + "\n")
                fw = FirewallBouncer(work / "fw", labn.server_ns, lapi.url, lapi.add_bouncer("firewall"))
                policy = labx.write_policy("bench", POLICY.format(lapi=lapi.url, key_file=key_file))
                host = Host(labx, "xdpguard", policy, "1s", netns=labn.server_ns)
                host.start()
                host.wait_log("crowdsec: pulling decisions", timeout=600)
                t = time.monotonic()
                while not fw.ready():
                    if time.monotonic() - t > 60 or fw.p.poll() is not None:
                        raise RuntimeError(f"crowdsec-firewall-bouncer did not start; see {work / 'fw'}")
                    time.sleep(0.2)
                labs = {"xdpguard": labx, "nftables": labn}

                adds = []
                for i in range(args.adds):
                    r = add_to_drop(lapi, labs, EXTRA4[i], {os.getpid(), host.p.pid})
                    log(f"add {i + 1}/{args.adds}: {r}")
                    adds.append(r)
                result["add_to_drop"] = adds

                n = args.decisions
                csv = blocklist_csv(work / "decisions.csv", n, "2h")
                with host.banmaps() as bm:
                    base_x = bm.maps[4].count()
                base_n = fw.count()
                t_start = time.time()
                lapi.cscli("decisions", "import", "-i", csv, "--reason", "bulk", timeout=3600)
                t_end = time.time()
                log(f"imported {n} decisions in {t_end - t_start:.1f} s")
                done: dict[str, float | None] = {"xdpguard": None, "nftables": None}
                counts = {"xdpguard": 0, "nftables": 0}
                with host.banmaps() as bm:
                    while time.time() - t_end < args.enforce_timeout and None in done.values():
                        if done["xdpguard"] is None:
                            counts["xdpguard"] = bm.maps[4].count() - base_x
                            if counts["xdpguard"] >= n:
                                done["xdpguard"] = time.time()
                        if done["nftables"] is None:
                            counts["nftables"] = fw.count() - base_n
                            if counts["nftables"] >= n:
                                done["nftables"] = time.time()
                        time.sleep(0.5)
                result["enforce"] = {"decisions": n, "import_s": t_end - t_start, **{
                    k: {"after_import_s": None if t is None else t - t_end,
                        "after_import_start_s": None if t is None else t - t_start,
                        "enforced": counts[k]} for k, t in done.items()}}
                log(f"enforce: {result['enforce']}")

                # The flood once each side enforces the range (the firewall
                # bouncer may still be busy with the imported decisions).
                t0 = time.time()
                lapi.cscli("decisions", "add", "--range", FLOOD_SRC_NET, "--duration", "30m", "--reason", "flood")
                ready: dict[str, float | None] = {"xdpguard": None, "nftables": None}
                with host.banmaps() as bm:
                    while None in ready.values() and time.time() - t0 < args.enforce_timeout:
                        if ready["xdpguard"] is None and bm.in_force(FLOOD_SRC_NET):
                            ready["xdpguard"] = time.time() - t0
                        if ready["nftables"] is None and fw.has("10.200.1.1"):
                            ready["nftables"] = time.time() - t0
                        time.sleep(0.2)
                result["flood"] = {k: {"range_enforced_after_s": ready[k],
                                       **flood(lab, host if k == "xdpguard" else None, args.flood_packets)}
                                   for k, lab in labs.items()}
                log(f"flood: {result['flood']}")
                host.stop()
                fw.stop()
    finally:
        if host:
            host.stop()
        if fw:
            fw.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1))
    print_summary(result)
    print(f"\nresults: {args.json_out}")
    return 0


def flood(lab: Lab, host: Host | None, packets: int) -> dict:
    """hping3 UDP from an address of the banned range, bounded in packets
    and seconds: sent, reached the socket, dropped at XDP (xdpguard)."""
    sink = _sink(lab)
    before = 0
    if host:
        with host.banmaps() as bm:
            e = bm.lookup(FLOOD_SRC_NET)
            before = e.packets if e else 0
    t0 = time.monotonic()
    cp = lab.run("client", ["timeout", "30", "hping3", "-q", "-2", "-p", str(SINK_PORT), "-i", "u1",
                            "-c", str(packets), "-a", "10.200.1.1", SERVER4], timeout=60)
    took = time.monotonic() - t0
    res = lab.stop_json(sink)
    sent = packets
    for ln in (cp.stdout + cp.stderr).splitlines():
        if "packets transmitted" in ln:
            sent = int(ln.split()[0])
    out = {"sent": sent, "seconds": took, "reached_socket": res["received"]}
    if host:
        with host.banmaps() as bm:
            e = bm.lookup(FLOOD_SRC_NET)
            out["dropped_at_xdp"] = (e.packets if e else 0) - before
    return out


def print_summary(r: dict) -> None:
    adds = r.get("add_to_drop", [])

    def med(k):
        v = [a[k] for a in adds if a.get(k) is not None]
        return f"{statistics.median(v) * 1000:.0f} ms (max {max(v) * 1000:.0f})" if v else "never"
    lock = [a.get("pin_lock_foreign", 0) for a in adds]
    e = r.get("enforce", {})

    def enf(k):
        d = e.get(k, {})
        t = d.get("after_import_s")
        return f"{t:.1f} s" if t is not None else f"not done ({d.get('enforced')} of {e.get('decisions')})"
    f = r.get("flood", {})
    print("| | xdpguard (XDP) | crowdsec-firewall-bouncer (nftables) |")
    print("|---|---|---|")
    print(f"| `cscli decisions add` to first dropped packet, median of {len(adds)} | {med('xdpguard')} | "
          f"{med('nftables')} |")
    print(f"| {e.get('decisions')} decisions enforced, after the import ended | {enf('xdpguard')} | "
          f"{enf('nftables')} |")
    if f:
        x, n = f.get("xdpguard", {}), f.get("nftables", {})

        def after(d):
            t = d.get("range_enforced_after_s")
            return "never" if t is None else f"{t:.1f} s"
        print(f"| range decision (during the backlog) to enforced | {after(x)} | {after(n)} |")
        print(f"| flood from a banned range: packets that reached the socket | {x.get('reached_socket')} of "
              f"{x.get('sent')} | {n.get('reached_socket')} of {n.get('sent')} |")
    if lock:
        print(f"\npin lock held by other processes during the add measurements: "
              f"{statistics.median(lock) * 100:.0f} % (median)")
        net = [a["xdpguard"] - a.get("pin_lock_foreign_s", 0.0) for a in adds if a.get("xdpguard") is not None]
        if net:
            print(f"xdpguard add to first drop, less the time the pin lock was another process's: "
                  f"median {statistics.median(net) * 1000:.0f} ms (max {max(net) * 1000:.0f})")


if __name__ == "__main__":
    sys.exit(main())
