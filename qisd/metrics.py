"""Prometheus metrics: a collector over the layers' ``statistics()`` snapshots, and
:func:`scrape`, the exposition (served over HTTP by :mod:`qisd.metrics_http`).

Nothing is computed at scrape time beyond copying: each family is read from a
snapshot the layer keeps (DHT counters and histograms, store totals, control
requests, synthesis worker) or from a counter updated where the event happened.
Names follow Prometheus conventions (``qisd_`` prefix, base units, ``_total`` for
counters, ``_seconds`` histograms) and carry no per-peer labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from qisd import __version__
from qisd.storage import StoreError

if TYPE_CHECKING:
    from qisd.daemon.service import NodeService
    from qisd.dht.stats import Histogram
    from qisd.store import StoreStats

log = structlog.get_logger("qisd.metrics")


def _histogram(name: str, doc: str, h: Histogram, labels: dict[str, str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    fam = family or HistogramMetricFamily(name, doc, labels=list(labels or {}))
    buckets = [(_bound(b), float(c)) for b, c in zip(h.bounds, h.buckets, strict=True)]
    buckets.append(("+Inf", float(h.count)))
    fam.add_metric(list((labels or {}).values()), buckets, h.sum)
    return fam


def _bound(b: float) -> str:
    return repr(float(b))


class QisdCollector:
    """Reads the service's layers on each scrape.

    The store's totals come from ``store_stats``, read off the trio thread for each
    scrape by :func:`scrape` (counting a large store's keys is a table scan: on the
    event loop it would stall the node for the scrape's length); None (unreadable)
    leaves the store's gauges out."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.store_stats: StoreStats | None = None

    def describe(self) -> list[Metric]:
        return []  # families are dynamic; an empty describe skips the registry's checks

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        info = InfoMetricFamily("qisd_build", "qisd version and swarm")
        info.add_metric([], {"version": __version__, "swarm": svc.manifest.swarm_id.hex()[:16]})
        yield info
        yield from self._dht()
        yield from self._store()
        yield from self._packets()
        yield from self._control()
        yield from self._synthesis()

    def _dht(self) -> Iterator[Metric]:
        st = self.service.node.statistics()
        rpcs = CounterMetricFamily(
            "qisd_rpc", "DHT RPCs by method, direction and result",
            labels=["method", "direction", "result"],
        )
        for (method, direction, result), n in sorted(st.rpcs.items()):
            rpcs.add_metric([method, direction, result], n)
        yield rpcs
        dropped = CounterMetricFamily(
            "qisd_datagrams_dropped", "Inbound datagrams dropped, by reason", labels=["reason"]
        )
        for reason, n in sorted(st.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield CounterMetricFamily("qisd_network_received_bytes", "UDP bytes received",
                                  value=st.bytes_in)
        yield CounterMetricFamily("qisd_network_sent_bytes", "UDP bytes sent", value=st.bytes_out)
        yield CounterMetricFamily("qisd_rpc_resent",
                                  "DHT requests sent again while unanswered (dht.rpc_retries)",
                                  value=st.resent)
        lat = HistogramMetricFamily("qisd_rpc_duration_seconds",
                                    "Outbound RPC round-trip time", labels=["method"])
        for method, h in sorted(st.rpc_latency.items()):
            _histogram("", "", h, {"method": method}, family=lat)
        yield lat
        yield _histogram("qisd_lookup_duration_seconds", "Iterative lookup time",
                         st.lookup_latency)
        yield _histogram("qisd_lookup_hops", "Rounds per iterative lookup", st.lookup_hops)
        yield _histogram("qisd_lookup_rpcs", "RPCs sent per iterative lookup", st.lookup_rpcs)
        yield GaugeMetricFamily("qisd_peers", "Contacts in the routing table", value=st.peers)
        yield GaugeMetricFamily("qisd_routing_buckets", "Non-empty k-buckets", value=st.buckets)
        yield GaugeMetricFamily("qisd_listen_registrations",
                                "Peers' listen registrations held here", value=st.listeners)
        yield CounterMetricFamily("qisd_handoffs", "Hand-offs to newly seen closer nodes",
                                  value=st.handoffs)
        yield CounterMetricFamily(
            "qisd_dht_task_errors", "Background DHT tasks that failed (logged, survived)",
            value=st.task_errors,
        )
        rep = CounterMetricFamily(
            "qisd_republish_entries",
            "(key, packet) entries handled by republish, by action: placed (re-placed; "
            "own packets once per key), skipped (another holder of the key stored it here "
            "within the interval)",
            labels=["action"],
        )
        rep.add_metric(["placed"], st.republished)
        rep.add_metric(["skipped"], st.republish_skipped)
        yield rep
        last = self.service.last_bootstrap
        yield GaugeMetricFamily(
            "qisd_bootstrap_last_success_timestamp_seconds",
            "Unix time of the last successful bootstrap (0: never)", value=last or 0.0,
        )

    def _store(self) -> Iterator[Metric]:
        st = self.store_stats
        if st is None:
            return  # the store could not be read: the rest is still served
        yield GaugeMetricFamily("qisd_stored_packets", "Packets in the store", value=st.packets)
        yield GaugeMetricFamily("qisd_stored_bytes", "Encoded bytes of stored packets",
                                value=st.bytes)
        yield GaugeMetricFamily("qisd_stored_keys", "Keys holding packets", value=st.keys)

    def _packets(self) -> Iterator[Metric]:
        svc = self.service
        st = svc.node.statistics()
        yield CounterMetricFamily("qisd_packets_emitted", "Packets emitted by this node",
                                  value=svc.emitted)
        yield CounterMetricFamily("qisd_queries", "Queries answered for local clients",
                                  value=svc.queries)
        yield CounterMetricFamily(
            "qisd_watch_missed_packets", "Packets a slow watch client missed (its buffer "
            "was full; it is told with its next event)", value=svc.watches.dropped,
        )
        yield CounterMetricFamily(
            "qisd_packets_delivered", "Packets delivered (accepted as responsible node or "
            "pushed for a listen)", value=st.deliveries,
        )
        yield CounterMetricFamily("qisd_packets_accepted",
                                  "Inbound packets accepted (stored here or delivered)",
                                  value=st.packets_accepted)
        rejected = CounterMetricFamily("qisd_packets_rejected",
                                       "Inbound packets refused (not stored, delivered or "
                                       "relayed), by reason", labels=["reason"])
        for reason, n in sorted(st.packets_rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        refused = CounterMetricFamily("qisd_peers_refused",
                                      "Peers refused entry to the routing table (closed "
                                      "swarms), by reason", labels=["reason"])
        for reason, n in sorted(st.peers_refused.items()):
            refused.add_metric([reason], n)
        yield refused
        caught = CounterMetricFamily("qisd_query_peers_dropped",
                                     "Peers whose reports a query dropped (no usable answer, "
                                     "withheld, bad packet, overstated similarity), by reason",
                                     labels=["reason"])
        for reason, n in sorted(st.query_peers_dropped.items()):
            caught.add_metric([reason], n)
        yield caught

    def _control(self) -> Iterator[Metric]:
        stats = self.service.control_statistics()
        fam = CounterMetricFamily("qisd_control_requests",
                                  "Control socket requests by method and result",
                                  labels=["method", "result"])
        for (method, result), n in sorted(stats.items()):
            fam.add_metric([method, result], n)
        yield fam

    def _synthesis(self) -> Iterator[Metric]:
        svc = self.service
        st: dict[str, Any] = svc.synthesis_statistics()
        yield CounterMetricFamily("qisd_packets_synthesised",
                                  "Synthesis packets emitted by this node",
                                  value=st.get("drafts_published", 0))
        yield GaugeMetricFamily("qisd_synthesis_backlog",
                                "Deliveries waiting for the synthesis worker",
                                value=st.get("backlog", 0))
        yield CounterMetricFamily("qisd_synthesis_fell_behind",
                                  "Deliveries the worker missed (caught up from the store)",
                                  value=svc.synthesis_behind)
        yield CounterMetricFamily("qisd_synthesis_store_reads_failed",
                                  "Reads of the store by the synthesis worker that failed"
                                  " (re-reads are tried again at its next pass; a failed"
                                  " read of its own syntheses at start is not)",
                                  value=st.get("catch_up_failures", 0))


def make_registry(service: NodeService) -> tuple[CollectorRegistry, QisdCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = QisdCollector(service)
    registry.register(collector)
    return registry, collector


async def scrape(registry: CollectorRegistry, collector: QisdCollector) -> bytes:
    """The exposition: the store's totals read in a worker thread (SQLite), the rest
    on the trio thread, as the snapshots read trio-owned counters."""
    try:
        collector.store_stats = await trio.to_thread.run_sync(
            collector.service.store.statistics
        )
    except StoreError as exc:
        log.warning("metrics without the store's totals: it cannot be read",
                    code=exc.code, error=str(exc))
        collector.store_stats = None
    return bytes(generate_latest(registry))
