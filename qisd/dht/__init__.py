"""qisd's routing layer: a trio Kademlia node on the stock ``kademlia`` wire.

Pure (no trio, no sockets):

- ``wire``        rpcudp framing, bounded msgpack, argument validators
- ``deferred``    what a handler returns besides an answer (``Deferred``, ``NO_REPLY``)
- ``ratelimit``   token buckets per source and in total, whom a request counts against
- ``routing``     stock k-buckets that return decisions (ping head, reject) instead of I/O
- ``traverse``    state of one iterative lookup (shortlist, termination, hops)
- ``values``      bounded stock values, listen registrations, peer memory
- ``paging``      datagram-sized packet batches and replies, packet verification
- ``nearest``     XOR-nearest contacts from as few k-buckets as possible
- ``hello``       the closed-swarm proof of key possession (challenge and answer)
- ``fairness``    a fair share of the storage handler slots per source
- ``stats``       counters and the frozen ``DHTStatistics`` snapshot
- ``config``      ``DHTConfig``
- ``api``         ``PutReport``, ``Delivery`` and the store/identity protocols

I/O (trio):

- ``udp``         ``DatagramEndpoint`` and the real UDP socket (IPv4 or IPv6)
- ``transport``   receive loop, RPC calls, limits on top of an endpoint
- ``calls``       many requests in flight for one task (lookups, fan-out stores)
- ``peerkind``    which contacts answer qisd's own RPCs
- ``admission``   who may enter the routing table (closed swarms: ``hello`` first)
- ``stock``       stock ``kademlia`` ``set``/``get`` on a qisd node
- ``memnet``      in-memory datagram network for simulations
- ``lookup``      the iterative lookup driver (alpha requests in a nursery)
- ``node``        ``DHTNode`` and ``open_node``: contacts, lookups, stock get/set
- ``rpc``         inbound RPC handlers
- ``packets``     packet placement, search and listen (client side)
- ``inbound``     packets arriving: verify, store, deliver, notify
- ``ingest``      group commit: many inbound requests verified and stored per thread hop
- ``maintenance`` refresh, republish, hand-off, expiry, state saving
- ``state``       routing table file
- ``simulate``    many real nodes over ``memnet`` (lookup cost vs swarm size)
"""

from qisd.dht.api import Delivery, KeyPlacement, PutReport
from qisd.dht.config import DHTConfig
from qisd.dht.node import DHTNode, open_node
from qisd.dht.stats import DHTStatistics, Histogram

__all__ = [
    "DHTConfig",
    "DHTNode",
    "DHTStatistics",
    "Delivery",
    "Histogram",
    "KeyPlacement",
    "PutReport",
    "open_node",
]
