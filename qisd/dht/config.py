"""Tuning knobs of a DHT node, one frozen object with checked values (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from qisd.dht.ratelimit import RateLimits
from qisd.dht.routing import SubnetPolicy
from qisd.dht.wire import MAX_REPLY_NODES


@dataclass(frozen=True, kw_only=True)
class DHTConfig:
    #: Kademlia k (bucket size, lookup width) and alpha (parallel requests).
    ksize: int = 20
    alpha: int = 3
    #: Copies of each packet per key; None: the manifest's ``replicas``.
    replicas: int | None = None
    #: Seconds to wait for a reply (stock rpcudp waits 5).
    rpc_timeout: float = 2.0
    #: Times an unanswered request is sent again within ``rpc_timeout``
    #: (qisd.dht.resend); 0: never.
    rpc_retries: int = 1
    #: A peer that failed to answer is not asked again for this long (unless it
    #: contacts us first): other nodes keep naming it in replies until they notice.
    failure_backoff: float = 30.0
    max_outstanding: int = 2048
    #: Concurrent handlers that must await (packet storage); more are dropped.
    max_handlers: int = 64
    limits: RateLimits = field(default_factory=RateLimits)
    subnets: SubnetPolicy = field(default_factory=SubnetPolicy)
    #: Paper 2.3: refresh buckets with no lookup for this long.
    refresh_interval: float = 3600.0
    #: Paper 2.5 republish: held packets and values re-placed this often by the
    #: nodes holding them (entries placed here within the interval excepted), and
    #: this node's own packets by it (the origin), one placement per key.
    republish_interval: float = 3600.0
    origin_republish_interval: float = 3600.0
    expire_interval: float = 60.0
    save_interval: float = 600.0
    #: Stock values (``store``): lifetime, count and total size caps.
    value_ttl: float = 86400.0
    max_values: int = 65536
    max_value_bytes: int = 64 * 1024 * 1024
    #: Hand-off to newly seen nodes: concurrent transfers and queued contacts.
    handoff_concurrency: int = 4
    handoff_queue: int = 256
    #: Deliveries channel size (the synthesis worker reads it).
    delivery_buffer: int = 1024
    #: Listen registrations: longest ttl granted, per-peer and total caps.
    listen_ttl_max: int = 3600
    max_listens_per_peer: int = 64
    max_listens: int = 16384
    #: Notifications queued for listeners before new ones are dropped.
    notify_queue: int = 1024
    #: Lookups run at once by ``put_packet``/``find_packets`` over many keys.
    key_concurrency: int = 8
    #: Worker threads for packet verification and the SQLite store.
    store_threads: int = 2
    #: Pages fetched from one node per ``find_packets`` key.
    max_pages: int = 8
    #: A ``find_packets`` key lookup stops once this many nodes among the key's
    #: ``replicas`` closest known have answered with packets (their answers are
    #: unioned, so one stale or partial replica is covered); see
    #: :meth:`qisd.dht.search.PacketSearch.lookup_ids`.
    find_holders: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if f.name == "rpc_retries":
                if not 0 <= value <= 10:
                    raise ValueError(f"dht config: rpc_retries must be 0..10, got {value}")
            elif value <= 0:
                raise ValueError(f"dht config: {f.name} must be > 0, got {value}")
        if self.alpha > self.ksize:
            raise ValueError("dht config: alpha must not exceed ksize")
        if self.ksize > MAX_REPLY_NODES:
            raise ValueError(
                f"dht config: ksize must be at most {MAX_REPLY_NODES} (the longest node "
                "list peers accept in a reply)"
            )
