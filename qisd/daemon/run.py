"""``qisd run``: compose the services in one trio nursery and supervise them.

Start order (each ``await nursery.start(...)`` returns once that service is bound):
state lock -> identity -> store -> DHT node (UDP bound) -> control socket -> metrics
-> synthesis worker and upkeep tasks -> ``READY=1``. Shutdown (SIGTERM/SIGINT):
``STOPPING=1``, the control socket stops taking requests, in-flight writes get up to
``daemon.grace_period`` seconds to finish, then everything is cancelled, the routing
table saved and the store closed. Exit status 0.
"""

from __future__ import annotations

import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import structlog
import trio

from qisd import __version__
from qisd.config import Config, format_hostport
from qisd.control.server import Drain, serve_control
from qisd.control.stats import ControlStats
from qisd.daemon.errors import EXIT_CONFIG, StartupError
from qisd.daemon.lock import StateDirLock
from qisd.daemon.notify import Notifier
from qisd.daemon.service import NodeService
from qisd.daemon.swarmfile import note_swarm
from qisd.daemon.synth import run_synthesis
from qisd.daemon.watch import WatchHub
from qisd.dht import DHTNode, open_node
from qisd.dht.api import Delivery
from qisd.dht.config import DHTConfig
from qisd.dht.ratelimit import RateLimits
from qisd.dht.routing import SubnetPolicy
from qisd.identity import KEY_FILE_NAME, Identity
from qisd.manifest import DEFAULT_MANIFEST, Manifest, load_manifest
from qisd.metrics_http import serve_metrics
from qisd.store import PacketStore

log = structlog.get_logger("qisd.daemon")

STORE_FILE_NAME = "packets.db"
#: Bootstrap retry backoff: first retry after this many seconds, doubling to the cap.
BOOTSTRAP_BACKOFF = (1.0, 60.0)


def load_swarm_manifest(config: Config) -> Manifest:
    path = config.node.manifest
    return load_manifest(Path(path)) if path else DEFAULT_MANIFEST


def check_membership(manifest: Manifest, identity: Identity, path: str) -> None:
    """A closed swarm's members answer only members and refuse outsiders' packets: a
    node whose key the manifest does not list could do nothing, so it does not start."""
    if not manifest.is_member(identity.public_key):
        raise StartupError(
            f"manifest {path}: the closed swarm {manifest.name!r} does not list this"
            f" node's key {identity.public_key.hex()} (its members would not answer it"
            " nor accept its packets); add the key to the member list with `qisd"
            " manifest new ... --member KEY` and give every node the new file",
            exit_code=EXIT_CONFIG,
        )


def dht_config(config: Config) -> DHTConfig:
    d = config.dht
    return DHTConfig(
        ksize=d.ksize,
        alpha=d.alpha,
        rpc_timeout=d.rpc_timeout,
        rpc_retries=d.rpc_retries,
        max_outstanding=d.max_outstanding,
        limits=RateLimits(
            per_source_rate=d.rate_per_peer,
            per_source_burst=float(d.rate_burst),
            total_rate=d.rate_total,
            total_burst=2 * d.rate_total,
        ),
        subnets=SubnetPolicy(per_bucket=d.max_peers_per_subnet),
        refresh_interval=d.refresh_interval,
        republish_interval=d.republish_interval,
        origin_republish_interval=d.origin_republish_interval,
        handoff_concurrency=d.handoff_concurrency,
        listen_ttl_max=max(1, int(d.listen_ttl)),
        max_listens_per_peer=d.max_listens_per_peer,
        delivery_buffer=config.synthesis.channel_size,
        expire_interval=config.store.expire_interval,
    )


async def run_daemon(config: Config, *, notifier: Notifier | None = None) -> None:
    """Run until SIGTERM/SIGINT. Raises on a startup failure (the CLI reports it)."""
    notifier = notifier or Notifier()
    manifest = load_swarm_manifest(config)  # a bad one stops the start before any write
    state_dir = config.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with StateDirLock(state_dir):
        identity = Identity.load_or_create(state_dir / KEY_FILE_NAME)
        check_membership(manifest, identity, config.node.manifest)
        store = PacketStore.open(
            state_dir / STORE_FILE_NAME,
            max_packets=config.store.max_packets,
            max_bytes=config.store.max_bytes,
            origin_quota=config.store.origin_quota,
            key_quota=config.store.key_quota,
            cache_bytes=config.store.cache_bytes,
        )
        if store.failure is not None:
            log.warning("packet store read-only: serving queries, refusing writes",
                        code=store.failure.code, error=str(store.failure))
        try:
            serving = trio.Event()
            try:
                await _serve(config, notifier, state_dir, manifest, identity, store, serving)
            except Exception:
                if serving.is_set():  # not a failed start: a bug or fault while serving
                    log.exception("the daemon failed while serving")
                raise
        finally:
            store.close()
            notifier.close()
            log.info("stopped")


async def _serve(
    config: Config,
    notifier: Notifier,
    state_dir: Path,
    manifest: Manifest,
    identity: Identity,
    store: PacketStore,
    serving: trio.Event,
) -> None:
    host, port = config.node.listen_address
    watches = WatchHub()
    async with AsyncExitStack() as stack:
        try:
            node = await stack.enter_async_context(open_node(
                identity, manifest, store, host=host, port=port, config=dht_config(config),
                state_dir=state_dir,
            ))
        except OSError as exc:
            raise StartupError(
                f"cannot bind UDP {config.node.listen}: {exc.strerror or exc}"
            ) from None
        nursery = await stack.enter_async_context(trio.open_nursery())
        service = NodeService(
            config=config, ident=identity, manifest=manifest, store=store, node=node,
            watches=watches,
        )
        service.control_stats = ControlStats()
        socket_path = config.resolved_socket()
        control_scope = trio.CancelScope()
        drain = Drain()

        async def control(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with control_scope:
                await serve_control(
                    socket_path, service, mode=config.control.mode,
                    max_request_bytes=config.control.max_request_bytes,
                    idle_timeout=config.control.idle_timeout,
                    stats=service.control_stats, drain=drain, task_status=task_status,
                )

        await nursery.start(control)
        metrics_addr = config.metrics.address
        if metrics_addr is not None:
            try:
                service.metrics_url = await nursery.start(serve_metrics, metrics_addr, service)
            except OSError as exc:
                raise StartupError(
                    f"cannot bind metrics {config.metrics.listen}: {exc.strerror or exc}"
                ) from None
        synth_send = await nursery.start(run_synthesis, config, service)
        nursery.start_soon(_pump_deliveries, node, watches, synth_send, service)
        if config.node.bootstrap:
            nursery.start_soon(
                _bootstrap_forever, node, service, config.node.bootstrap_addresses
            )
        else:
            service.joined.set()
        if notifier.watchdog_interval:
            nursery.start_soon(_watchdog, notifier, notifier.watchdog_interval)
        _note_swarm(state_dir, manifest)  # once started: a failed start records nothing
        _log_ready(config, service, node)
        serving.set()
        notifier.ready(f"serving {len(node.table)} peers")
        await _wait_for_signal()
        notifier.stopping()
        log.info("stopping", grace_period=config.daemon.grace_period)
        # No new requests; those in flight (an emit placing its packet) finish and
        # are answered within the grace period, then everything is cancelled.
        drain.begin()
        with trio.move_on_after(config.daemon.grace_period):
            await drain.wait()
            await service.wait_idle()
        control_scope.cancel()
        nursery.cancel_scope.cancel()


def _note_swarm(state_dir: Path, manifest: Manifest) -> None:
    before = note_swarm(state_dir, manifest)
    if before is not None:
        log.warning(
            "state dir was used in another swarm; its packets there are not this"
            " swarm's (its nodes refuse them, queries do not match them) and expire"
            " with their ttl", state_dir=str(state_dir), was_swarm=before["swarm"][:16],
            was_name=before["name"], swarm=manifest.swarm_id.hex()[:16], name=manifest.name,
        )


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal", signal=signal.Signals(signum).name)
            return


async def _pump_deliveries(
    node: DHTNode,
    watches: WatchHub,
    synth_send: trio.MemorySendChannel[Delivery],
    service: NodeService,
) -> None:
    """Deliveries fan out to local watchers and to the synthesis worker. Neither may
    hold the node back: a full synthesis channel is counted and the worker catches up
    from the store."""
    async for delivery in node.deliveries:
        watches.publish(delivery.packet)
        try:
            synth_send.send_nowait(delivery)
        except trio.WouldBlock:
            service.synthesis_behind += 1
            if service.worker_state is not None:
                service.worker_state.mark_behind()


async def _bootstrap_forever(
    node: DHTNode, service: NodeService, addrs: tuple[tuple[str, int], ...]
) -> None:
    """Join through the bootstrap peers at start (a table saved by the last run
    included: they are the operator's word on where the swarm is), and again, with
    backoff while none answers, whenever the routing table runs empty. The node
    serves (N=1) meanwhile."""
    delay, cap = BOOTSTRAP_BACKOFF
    first = True
    while True:
        if first or len(node.table) == 0:
            try:
                found, failed = await node.join(list(addrs))
            finally:
                service.joined.set()
            first = False
            why = {format_hostport(h, p): reason for (h, p), reason in failed.items()}
            if found:
                service.last_bootstrap = time.time()
                log.info("bootstrapped", peers=len(node.table), via=len(found),
                         **({"failed": why} if why else {}))
                delay = BOOTSTRAP_BACKOFF[0]
            elif len(node.table) == 0:
                log.warning("bootstrap found no peer", retry_in=delay, failed=why)
                await trio.sleep(delay)
                delay = min(cap, delay * 2)
                continue
            else:
                log.warning("bootstrap found no peer; serving with the saved peers",
                            peers=len(node.table), failed=why)
        await trio.sleep(cap)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


def _log_ready(config: Config, service: NodeService, node: DHTNode) -> None:
    host, port = node.address
    shown_host = host
    if host in ("0.0.0.0", "::"):
        shown_host = "<this-host-address>"
    log.info(
        "ready",
        version=__version__,
        node_id=service.ident.node_id.hex(),
        udp=format_hostport(host, port),
        socket=str(config.resolved_socket()),
        metrics=service.metrics_url,
        state_dir=str(config.resolved_state_dir()),
        swarm=service.manifest.swarm_id.hex()[:16],
        join_with=f"qisd run --bootstrap {format_hostport(shown_host, port)}",
    )
