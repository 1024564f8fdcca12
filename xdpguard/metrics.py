"""Prometheus metrics for `xdpguard watch --metrics HOST:PORT`.

Values are read from the pinned maps at scrape time, so they are never
staler than the scrape itself.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import CollectorRegistry


class _Collector:
    def __init__(self, watch):
        self.watch = watch

    def collect(self):
        from xdpguard import stats
        # The watch's record: the policy it runs now (reloads change it).
        record, directory = self.watch.record, self.watch.directory
        labels = ["netns", "iface", "rule", "action"]
        where = [record.netns, record.iface]
        snap = stats.read_stats(directory, record)
        fams = {n: CounterMetricFamily(f"xdpguard_rule_{n}", f"{n.replace('_', ' ')} per rule", labels=labels)
                for n in ("packets", "bytes", "dropped_packets", "dropped_bytes")}
        for r in snap["rules"]:
            for n, fam in fams.items():
                fam.add_metric(where + [r["rule"], r["action"]], r[n])
        yield from fams.values()
        banned = CounterMetricFamily("xdpguard_banned_packets", "packets dropped by bans", labels=["netns", "iface"])
        banned.add_metric(where, snap["bans"]["packets"])
        yield banned
        entries = self.watch.banmaps.entries()
        active = GaugeMetricFamily("xdpguard_bans_active", "bans in force", labels=["netns", "iface"])
        active.add_metric(where, sum(1 for e in entries if not e["expired"]))
        yield active
        total = CounterMetricFamily("xdpguard_bans", "bans made by this watch", labels=["netns", "iface"])
        total.add_metric(where, self.watch.bans_total)
        yield total
        info = InfoMetricFamily("xdpguard_probes", "kernel probe set in use", labels=["netns", "iface"])
        info.add_metric(where, {"mode": self.watch.probe_mode})
        yield info
        yield from self._sync(where)
        fill = GaugeMetricFamily("xdpguard_map_entries", "entries in hash and trie maps",
                                 labels=["netns", "iface", "map"])
        cap = GaugeMetricFamily("xdpguard_map_capacity", "capacity of maps", labels=["netns", "iface", "map"])
        gen = stats.active_gen(directory)
        for name in ("ban4", "ban6", "sbuckets", "srcstat", "lpm4", "lpm6"):
            got = stats.map_fill(directory / name, gen)   # lpm*: the running trie
            if got is None:
                continue
            fill.add_metric(where + [name], got[0])
            cap.add_metric(where + [name], got[1])
        yield fill
        yield cap

    def _sync(self, where):
        """[fleet] and [crowdsec]: connected, lag, events by outcome."""
        for name, sync, what in (("fleet", self.watch.fleet, "Redis"), ("crowdsec", self.watch.crowdsec, "the LAPI")):
            if sync is None:
                continue
            st = sync.status()
            up = GaugeMetricFamily(f"xdpguard_{name}_connected", f"1 while {what} answers", labels=["netns", "iface"])
            up.add_metric(where, int(st["connected"]))
            yield up
            events = CounterMetricFamily(f"xdpguard_{name}_events", f"{name} events by outcome",
                                         labels=["netns", "iface", "result"])
            for result, n in sorted(st["counters"].items()):
                events.add_metric(where + [result], n)
            yield events
        if self.watch.fleet is not None and self.watch.fleet.lag is not None:
            lag = GaugeMetricFamily("xdpguard_fleet_lag_seconds", "age of the last fleet event when applied",
                                    labels=["netns", "iface"])
            lag.add_metric(where, self.watch.fleet.lag)
            yield lag


def serve(host: str, port: int, watch):
    """Start the HTTP exporter of a running watch in a thread; returns an
    object with shutdown()."""
    from prometheus_client import start_http_server
    registry = CollectorRegistry()
    registry.register(_Collector(watch))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server
