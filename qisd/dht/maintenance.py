"""Periodic upkeep of a node: refresh, republish, hand-off, expiry, state, listens.

- Refresh (paper 2.3): a lookup of a random id in every bucket with no lookup for
  ``refresh_interval``.
- Hand-off (paper 2.5): a newly seen node gets the packets and values it should
  hold, from the node that is currently closest to each key; one worker drains a
  bounded queue of newcomers in batches (one pass over the held keys per batch)
  with ``handoff_concurrency`` transfers at a time, so a burst of joins cannot
  start unbounded work.
- Republish (paper 2.5), every ``republish_interval`` (the first at a random
  phase, each period drawn within +-10% of it, so the holders of a key do not fire
  together): the nodes that are among a key's ``replicas`` closest (as far as
  they know) re-place its entries, except those another holder stored here within
  the interval (its republish reached the key's replica set; see
  :mod:`qisd.dht.recent`). So a key's holders republish about once per interval
  between them, not once each (measured: scripts/bench_republish.py). Every
  holder in the replica set takes part, not only the closest: a placement that
  skipped a busy or slow node leaves the closest without some packets, and if the
  other holders then leave, only another holder can bring those packets back to
  ``replicas`` copies (measured: scripts/fault_churn.py). Stock values older than
  the interval are ``set`` again, as the stock server does.
- Origin republish, every ``origin_republish_interval`` (the first one
  republish interval after start): this node re-places the packets it put as
  their origin (kept in the store, so across restarts: :mod:`qisd.dht.own`), one
  placement per key for all of them.
  It restores entries no replica holder has (placed while the closest nodes were
  down, then held only by nodes farther out).
- Expiry of packets, values, listen registrations and subscriptions; the routing
  table saved; listen registrations renewed before they lapse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio
from kademlia.node import Node

from qisd.dht import state
from qisd.dht.values import StockValue
from qisd.logs import get_logger
from qisd.store import StoreError

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

log = get_logger(__name__)
NOTIFY_WORKERS = 4
#: Newcomers handled together in one pass over the held keys.
HANDOFF_BATCH = 64
#: Seconds a hand-off waits for more newcomers to join its batch.
HANDOFF_DELAY = 0.5
#: Each republish period is the interval times a factor drawn within 1 +- this.
REPUBLISH_JITTER = 0.1


async def run(
    node: DHTNode, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    cfg = node.config
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handoff_worker, node)
        for _ in range(NOTIFY_WORKERS):
            nursery.start_soon(node.packets.notify_worker)
        nursery.start_soon(every, node, cfg.refresh_interval / 4, refresh)
        # The first republish at a random phase: nodes started together (a site's
        # reboot, a test swarm) must not fire together, or no holder's republish
        # reaches the others before they run their own. Never sooner than one
        # interval: a node that just joined is busy with hand-offs and puts
        # (measured: scripts/fault_churn.py lost entries when it came at 0.5-1x).
        nursery.start_soon(
            partial(
                every, node, cfg.republish_interval, republish, REPUBLISH_JITTER,
                first=cfg.republish_interval * node.rng.uniform(1.0, 1.5),
            )
        )
        # The first origin republish comes at most one republish interval after start,
        # so a daemon restarted more often than the origin interval still runs it (its
        # list of own packets is read back from the store at start).
        nursery.start_soon(
            partial(
                every, node, cfg.origin_republish_interval, republish_own, REPUBLISH_JITTER,
                first=min(cfg.republish_interval, cfg.origin_republish_interval),
            )
        )
        nursery.start_soon(every, node, cfg.expire_interval, expire)
        nursery.start_soon(every, node, cfg.save_interval, state.save)
        nursery.start_soon(every, node, cfg.listen_ttl_max / 2, renew_listens)
        task_status.started()


async def every(
    node: DHTNode,
    interval: float,
    job: Callable[[DHTNode], Awaitable[None]],
    jitter: float = 0.0,
    *,
    first: float | None = None,
) -> None:
    """``job(node)`` every ``interval`` seconds (the first after ``first``), each
    wait drawn within ``1 +- jitter`` of its nominal length."""
    wait = interval if first is None else first
    while True:
        await trio.sleep(wait * node.rng.uniform(1 - jitter, 1 + jitter) if jitter else wait)
        wait = interval
        try:
            await job(node)
        except Exception:  # upkeep must go on; the log says what broke
            node.counters.task_errors += 1  # (qisd_dht_task_errors_total)
            log.exception("dht upkeep failed", job=getattr(job, "__name__", repr(job)))


async def refresh(node: DHTNode) -> None:
    ids = node.table.refresh_ids(node.rng, node.config.refresh_interval)

    async def one(rid: bytes) -> None:
        await node.lookup_nodes(rid)

    await node.packets.each_key(ids, one)


def hand_off_targets(
    node: DHTNode, key: bytes, newcomers: Collection[bytes], width: int
) -> list[Node]:
    """Stock ``welcome_if_new`` rule, for a batch: the newcomers now among the
    ``width`` closest to ``key``, provided this node is closer to it than every
    contact it knew before them (so exactly one node hands each key over)."""
    target = Node(key)
    # Cheap test first: most keys have an older contact closer than this node.
    if node.table.any_closer(target, node.me.distance_to(target), exclude=newcomers):
        return []
    return [n for n in node.table.find_neighbors(target, k=width) if n.id in newcomers]


async def hand_off(node: DHTNode, contacts: Sequence[Node]) -> None:
    """Give newly seen contacts the packets and values they should now hold."""
    newcomers = {c.id for c in contacts}
    packets: dict[bytes, list[bytes]] = {}  # newcomer id -> keys
    by_id: dict[bytes, Node] = {}
    store = node.store
    now_ms = node.wall_ms()
    if store is not None:
        held = node.packets.held
        keys = list(held) if held is not None else await node.in_thread(store.keys, now_ms)
        for key in keys:
            for target in hand_off_targets(node, key, newcomers, node.replicas):
                packets.setdefault(target.id, []).append(key)
                by_id[target.id] = target
    values: dict[bytes, list[tuple[bytes, StockValue]]] = {}
    for key, value in list(node.values.items(trio.current_time())):
        for target in hand_off_targets(node, key, newcomers, node.config.ksize):
            values.setdefault(target.id, []).append((key, value))
            by_id[target.id] = target

    async def transfer(contact: Node) -> None:
        if store is not None:
            for key in packets.get(contact.id, []):
                items = await node.in_thread(store.key_items, key, node.wall_ms())
                if not items:
                    continue
                answer = await node.packets.store_remote(contact, key, [p.encoded for p in items])
                if answer is None:
                    break  # gone, or a stock node: it takes no packets
                node.counters.handoffs += 1
        for key, value in values.get(contact.id, []):
            ok, _ = await node.call(contact, "store", [node.me.id, key, value], evict=False)
            if not ok:
                return

    limiter = trio.CapacityLimiter(node.config.handoff_concurrency)

    async def limited(contact: Node) -> None:
        async with limiter:
            await transfer(contact)

    async with trio.open_nursery() as nursery:
        for contact in by_id.values():
            nursery.start_soon(limited, contact)


async def handoff_worker(node: DHTNode) -> None:
    """Drain the newcomer queue in batches: one pass over the held keys per batch."""
    async for contact in node.handoff_recv:
        # Newcomers come in bursts (a lookup names many): let a burst gather so
        # one pass over the held keys serves all of it.
        await trio.sleep(HANDOFF_DELAY)
        batch = [contact]
        while len(batch) < HANDOFF_BATCH:
            try:
                batch.append(node.handoff_recv.receive_nowait())
            except trio.WouldBlock:
                break
        try:
            await hand_off(node, batch)
        except Exception:
            node.counters.task_errors += 1
            log.exception("dht hand-off failed", contacts=len(batch))


async def republish_own(node: DHTNode) -> None:
    """Re-place this node's own live packets: one placement per key for all of them."""
    ops = node.packets
    own = ops.own.live(node.wall_ms())

    async def put_own(key: bytes) -> None:
        node.counters.republished += len(own[key])
        await ops.place(key, own[key])

    await ops.each_key(list(own), put_own)


async def republish(node: DHTNode) -> None:
    """Re-place the entries of the keys this node is a replica holder of, except those
    another holder stored here within the interval, and the stock values older than it."""
    now_ms = node.wall_ms()
    ops = node.packets
    store = node.store
    if store is not None:
        held = await node.in_thread(store.keys, now_ms)
        mine = [k for k in held if _in_replica_set(node, k)]
        interval = node.config.republish_interval
        recent = ops.recent
        recent.forget_older(trio.current_time(), interval)

        async def one(key: bytes) -> None:
            items = await node.in_thread(store.key_items, key, node.wall_ms())
            now = trio.current_time()
            stale = [p for p in items if not recent.fresh(key, p.id, now, interval)]
            node.counters.republish_skipped += len(items) - len(stale)
            if stale:
                node.counters.republished += len(stale)
                await ops.place(key, stale)

        await ops.each_key(mine, one)
    now = trio.current_time()
    for dkey, value in node.values.older_than(node.config.republish_interval, now):
        await node.set_digest(dkey, value)


def _in_replica_set(node: DHTNode, key: bytes) -> bool:
    """Fewer than ``replicas`` answering contacts are closer to ``key`` than this node.

    A contact flagged as failing does not count: paper 4.1 keeps it in its bucket
    while no replacement is waiting (so it can come back), but it holds nothing a
    republish could count on. Counted, the dead nodes of a key's neighbourhood would
    make every live holder think others are closer, and the copies lost with them
    would never be placed again (measured: scripts/fault_churn.py, 30% stopped).
    """
    target = Node(key)
    mine = node.me.distance_to(target)
    table = node.table
    nearest = [n for n in table.find_neighbors(target, k=node.config.ksize)
               if table.failures(n.id) == 0][: node.replicas]
    return sum(1 for n in nearest if n.distance_to(target) < mine) < node.replicas


async def expire(node: DHTNode) -> None:
    now = trio.current_time()
    node.values.expire(now)
    node.listeners.expire(now)
    for key in [k for k, until in node.subscriptions.items() if until <= now]:
        del node.subscriptions[key]
    # What is kept in memory about packets follows them out, not the republish interval.
    now_ms = node.wall_ms()
    node.packets.recent.forget_expired(now_ms)
    node.packets.own.forget_expired(now_ms)
    if node.store is not None:
        try:
            await node.in_thread(node.store.expire, node.wall_ms())
        except StoreError as exc:
            # Full or read-only: expired packets stay on disk (reads skip them) until
            # a later sweep can delete them.
            log.warning("cannot expire packets", code=exc.code, error=str(exc))
        await node.packets.reload_held()


async def renew_listens(node: DHTNode) -> None:
    await node.packets.each_key(list(node.subscriptions), node.packets.register)
