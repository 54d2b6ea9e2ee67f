"""Counters the DHT keeps and the immutable snapshot it hands to metrics (pure).

Everything is a plain integer or float updated in place on the hot path (no locks:
one trio thread), and :meth:`Counters.snapshot` copies it into a frozen
:class:`DHTStatistics`. Latencies are kept as Prometheus-style cumulative histograms
(fixed bucket bounds, count and sum) so the metrics layer can export them unchanged.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: Bucket upper bounds (seconds) for RPC and lookup latency.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Bucket upper bounds for hops and RPCs per lookup.
COUNT_BOUNDS: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 200)


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative histogram: ``buckets[i]`` observations were <= ``bounds[i]``."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    count: int
    sum: float


class HistogramCounter:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> Histogram:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return Histogram(self.bounds, tuple(cumulative), self.count, self.sum)


@dataclass(frozen=True, slots=True)
class DHTStatistics:
    """What a node has done so far; every field is a copy, safe to keep."""

    node_id: bytes
    address: tuple[str, int]
    peers: int
    buckets: int
    #: (method, "in" | "out", result) -> count; results: ok, timeout, error, dropped.
    rpcs: Mapping[tuple[str, str, str], int]
    #: Inbound datagrams dropped, by reason (malformed, oversized, rate_source, ...).
    dropped: Mapping[str, int]
    bytes_in: int
    bytes_out: int
    datagrams_in: int
    datagrams_out: int
    rpc_latency: Mapping[str, Histogram]
    lookups: int
    lookup_hops: Histogram
    lookup_rpcs: Histogram
    lookup_latency: Histogram
    values: int
    deliveries: int
    deliveries_dropped: int
    listeners: int
    subscriptions: int
    handoffs: int
    #: Inbound packets stored here (``stored``, ``added_key``) or delivered for a
    #: listen; and those refused, by reason (``bad_signature``, ``wrong_swarm``,
    #: ``expired``, ``future``, ``too_large``, ``generation``, ``not_member``,
    #: ``quota``, ``duplicate``, ...). Nothing refused is stored, delivered or relayed.
    packets_accepted: int = 0
    #: Republish: (key, packet) entries re-placed (own packets: once per key), and
    #: those left out because another holder of the key stored them here within the
    #: interval (paper 2.5).
    republished: int = 0
    republish_skipped: int = 0
    #: Background tasks (pings, caching stores, verification) that failed: a bug
    #: or an odd peer, logged and survived.
    task_errors: int = 0
    #: Requests sent again because no answer had come yet (qisd.dht.resend).
    resent: int = 0
    packets_rejected: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: Closed swarms: peers refused entry to the routing table, by reason
    #: (``not_member``, ``id_mismatch``, ``bad_proof``, ``no_answer``).
    peers_refused: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: Peers whose reports a query dropped (see qisd.dht.search), by reason
    #: (``no_answer``, ``withheld``, ``bad_packet``, ``overstated``).
    query_peers_dropped: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({})
    )


#: Store/notify statuses that mean "taken" (new here or new under the key).
ACCEPTED_STATUSES = frozenset({"stored", "added_key", "accepted"})


class Counters:
    """Mutable counters owned by one node."""

    def __init__(self) -> None:
        self.rpcs: Counter[tuple[str, str, str]] = Counter()
        self.dropped: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.resent = 0
        self.rpc_latency: dict[str, HistogramCounter] = {}
        self.lookup_hops = HistogramCounter(COUNT_BOUNDS)
        self.lookup_rpcs = HistogramCounter(COUNT_BOUNDS)
        self.lookup_latency = HistogramCounter(LATENCY_BOUNDS)
        self.deliveries = 0
        self.deliveries_dropped = 0
        self.handoffs = 0
        self.republished = 0
        self.republish_skipped = 0
        self.task_errors = 0
        self.packets_accepted = 0
        self.packets_rejected: Counter[str] = Counter()
        self.peers_refused: Counter[str] = Counter()
        self.query_peers_dropped: Counter[str] = Counter()

    def packet_statuses(self, statuses: Iterable[str]) -> None:
        """Count the per-packet statuses of one inbound request (``rejected:<reason>``,
        ``duplicate`` and ``superseded`` are refusals; the rest acceptances)."""
        for status in statuses:
            if status in ACCEPTED_STATUSES:
                self.packets_accepted += 1
            else:
                self.packets_rejected[status.removeprefix("rejected:")] += 1

    def rpc_done(self, method: str, result: str, seconds: float | None = None) -> None:
        self.rpcs[(method, "out", result)] += 1
        if seconds is not None:
            hist = self.rpc_latency.get(method)
            if hist is None:
                hist = self.rpc_latency[method] = HistogramCounter(LATENCY_BOUNDS)
            hist.observe(seconds)

    def lookup_done(self, hops: int, rpcs: int, seconds: float) -> None:
        self.lookup_hops.observe(hops)
        self.lookup_rpcs.observe(rpcs)
        self.lookup_latency.observe(seconds)

    def snapshot(
        self,
        *,
        node_id: bytes,
        address: tuple[str, int],
        peers: int,
        buckets: int,
        values: int,
        listeners: int,
        subscriptions: int,
    ) -> DHTStatistics:
        return DHTStatistics(
            node_id=node_id,
            address=address,
            peers=peers,
            buckets=buckets,
            rpcs=MappingProxyType(dict(self.rpcs)),
            dropped=MappingProxyType(dict(self.dropped)),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            datagrams_in=self.datagrams_in,
            datagrams_out=self.datagrams_out,
            rpc_latency=MappingProxyType(
                {name: h.snapshot() for name, h in self.rpc_latency.items()}
            ),
            lookups=self.lookup_hops.count,
            lookup_hops=self.lookup_hops.snapshot(),
            lookup_rpcs=self.lookup_rpcs.snapshot(),
            lookup_latency=self.lookup_latency.snapshot(),
            values=values,
            deliveries=self.deliveries,
            deliveries_dropped=self.deliveries_dropped,
            listeners=listeners,
            subscriptions=subscriptions,
            handoffs=self.handoffs,
            republished=self.republished,
            republish_skipped=self.republish_skipped,
            task_errors=self.task_errors,
            resent=self.resent,
            packets_accepted=self.packets_accepted,
            packets_rejected=MappingProxyType(dict(self.packets_rejected)),
            peers_refused=MappingProxyType(dict(self.peers_refused)),
            query_peers_dropped=MappingProxyType(dict(self.query_peers_dropped)),
        )
