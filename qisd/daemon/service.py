"""The daemon's answers to the control API: the node as an application sees it.

Each method validates its input (bad vectors, outcomes or topics become ``invalid``
errors that name the problem), does its work through the DHT node and the store, and
returns plain JSON-ready maps: the daemon returns data, the CLI renders it.
"""

from __future__ import annotations

import hashlib
import time
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from qisd import __version__
from qisd.answer import answer_query, match_summary
from qisd.config import Config, format_hostport, parse_hostport
from qisd.control.errors import ControlError
from qisd.control.protocol import MAX_K, MAX_LIMIT
from qisd.daemon.created import CreationClock
from qisd.daemon.watch import Subscription, WatchHub
from qisd.dht import DHTNode
from qisd.fingerprint import LSH, keys_for, probe_keys
from qisd.identity import Identity
from qisd.manifest import Manifest, ManifestError, check_local_topic
from qisd.packet import OutcomePacket, PacketError, create_packet, wall_ms
from qisd.sketch import FingerprintError, Sketch, cosine, normalize, quantize
from qisd.store import PacketStore, StoreError, StoreStats
from qisd.synthesis.encoding import carry_problem
from qisd.synthesis.worker import WorkerState

#: Items per bulk emit request; the CLI sends batches of this size.
MAX_EMIT_BATCH = 1000
#: Largest table-0 code width a topic-wide watch subscribes to whole (2**bits keys).
MAX_WATCH_BITS = 8
#: Seconds between listen attempts while a watched key has no node to register at.
WATCH_RETRY_S = 3.0


def _check_topic(topic: Any) -> str:
    """``topic`` as this node's packets carry it (NFC), or an ``invalid`` error."""
    try:
        return check_local_topic(topic)
    except ManifestError as exc:
        raise ControlError("invalid", str(exc)) from None


def _nfc_names(outcome: Mapping[Any, Any]) -> dict[Any, Any]:
    """``outcome`` with its field names in Unicode NFC (as topics), so one name
    typed two ways is one field; both ways in one outcome is an error."""
    out: dict[Any, Any] = {}
    for name, value in outcome.items():
        key = unicodedata.normalize("NFC", name) if isinstance(name, str) else name
        if key in out:
            raise ControlError("invalid", f"outcome.{key}: given twice, in two Unicode forms")
        out[key] = value
    return out


def _content_key(topic: str, sketch: Sketch, outcome: Mapping[str, Any], n: int, ttl: int) -> bytes:
    """What makes two emits the same packet but for their time (see CreationClock)."""
    items = sorted(outcome.items(), key=lambda item: repr(item[0]))  # names not yet checked
    fields = [topic, sketch.dim, sketch.bits, sketch.data, items, n, ttl]
    return hashlib.blake2b(msgpack.packb(fields, default=repr), digest_size=16).digest()


@dataclass
class NodeService:
    config: Config
    ident: Identity
    manifest: Manifest
    store: PacketStore
    node: DHTNode
    watches: WatchHub
    metrics_url: str | None = None
    started: float = field(default_factory=time.monotonic)
    emitted: int = 0
    queries: int = 0
    #: Deliveries the synthesis worker missed because its channel was full.
    synthesis_behind: int = 0
    #: Wall-clock time of the last successful bootstrap (for metrics), or None.
    last_bootstrap: float | None = None
    #: Set once the first attempt to join through the bootstrap peers is over (at
    #: once without any): the routing table is then as good as it gets for a while.
    joined: trio.Event = field(default_factory=trio.Event)
    #: Synthesis packets this node published, and the worker's state (set by synth).
    synthesised: int = 0
    worker_state: WorkerState | None = None
    #: Control server request counters (set by the daemon once the server starts).
    control_stats: Any = None
    #: created_ms of emitted packets: two emits of one case are two packets.
    creation: CreationClock = field(default_factory=CreationClock)
    _inflight: int = 0
    _listening: Counter[bytes] = field(default_factory=Counter)
    _idle: trio.Event = field(default_factory=trio.Event)

    def synthesis_statistics(self) -> dict[str, int]:
        stats = {"drafts_published": self.synthesised, "backlog": 0}
        if self.worker_state is not None:
            stats.update(self.worker_state.statistics().to_dict())
            stats["drafts_published"] = self.synthesised
        return stats

    def control_statistics(self) -> dict[tuple[str, str], int]:
        if self.control_stats is None:
            return {}
        return dict(self.control_stats.statistics().requests)

    async def wait_idle(self) -> None:
        """Return once no write started through this service is still running."""
        while self._inflight:
            self._idle = trio.Event()
            await self._idle.wait()

    # -- status -----------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        unreadable: StoreError | None = None
        try:
            stats: StoreStats | None = await trio.to_thread.run_sync(self.store.statistics)
        except StoreError as exc:  # the rest of the status is what the operator needs now
            stats, unreadable = None, exc
        host, port = self.node.address
        storage = self.storage()
        if unreadable is not None:
            storage["read_error"] = str(unreadable)
        return {
            "node_id": self.ident.node_id.hex(),
            "public_key": self.ident.public_key.hex(),
            "listen": format_hostport(host, port),
            "peers": len(self.node.table),
            # null while the store cannot be read (storage.read_error says why)
            "packets": None if stats is None else stats.packets,
            "bytes": None if stats is None else stats.bytes,
            "keys": None if stats is None else stats.keys,
            "metrics": self.metrics_url,
            "version": __version__,
            "swarm": self.manifest.swarm_id.hex(),
            "swarm_name": self.manifest.name,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "emitted": self.emitted,
            "queries": self.queries,
            "synthesised": self.synthesised,
            "watch_missed": self.watches.dropped,
            "storage": storage,
        }

    def storage(self) -> dict[str, Any]:
        """Whether the store can write now (the last write's outcome) and its file."""
        failure = self.store.failure
        return {
            "path": str(self.store.path) if self.store.path else ":memory:",
            "state": "ok" if failure is None else failure.code,
            "error": None if failure is None else str(failure),
            # Stored rows that no longer decode (an older qisd's laxer rules): skipped.
            "undecodable": self.store.undecodable,
        }

    async def peers(self) -> dict[str, Any]:
        table = self.node.table
        now = trio.current_time()  # the table's clock
        peers = []
        for c in table.contacts():
            seen = table.last_seen(c.id)
            peers.append({
                "node_id": c.id.hex(),
                "address": format_hostport(str(c.ip), int(c.port)),
                # Seconds since it last sent or answered; null: not since this start.
                "last_seen_s": None if seen is None else round(max(0.0, now - seen), 1),
                # RPCs it failed to answer in a row (kept until a replacement is known).
                "failures": table.failures(c.id),
            })
        return {"peers": peers}

    async def identity(self) -> dict[str, Any]:
        return {
            "node_id": self.ident.node_id.hex(),
            "public_key": self.ident.public_key.hex(),
        }

    def _is_me(self, addr: tuple[str, int]) -> bool:
        """``addr`` is this node's own UDP address (as bound, or its port on a
        loopback or wildcard bind)."""
        host, port = self.node.address
        if addr == (host, port):
            return True
        local = {"127.0.0.1", "::1", "localhost"}
        return addr[1] == port and host in {"0.0.0.0", "::", *local} and addr[0] in local

    async def bootstrap(self, addresses: list[str]) -> dict[str, Any]:
        if not addresses:
            raise ControlError("invalid", "addresses: name at least one host:port")
        try:
            addrs = [parse_hostport(a) for a in addresses]
        except ValueError as exc:
            raise ControlError("invalid", f"addresses: {exc}") from None
        for text, (_, port) in zip(addresses, addrs, strict=True):
            if port == 0:
                raise ControlError("invalid", f"addresses: {text}: port 0 is no peer's port")
        mine = {a for a in addrs if self._is_me(a)}
        found, failed = await self.node.join([a for a in addrs if a not in mine])
        failed = {**failed, **dict.fromkeys(mine, "this node's own address")}
        if found and len(failed) < len(set(addrs)):
            self.last_bootstrap = time.time()
        return {
            "contacted": len(found),
            "peers": len(self.node.table),
            # Each address that did not answer, and why (extends the reply; scripts
            # reading contacted/peers are unaffected).
            "failed": [
                {"address": format_hostport(host, port), "reason": why}
                for (host, port), why in failed.items()
            ],
        }

    # -- emit ----------------------------------------------------------------------

    async def _packet(
        self, topic: Any, vector: Any, outcome: Any, n: Any, ttl: Any
    ) -> tuple[OutcomePacket, list[bytes]]:
        topic = _check_topic(topic)
        if not isinstance(outcome, Mapping):
            raise ControlError("invalid", "outcome: must be a map of name -> value")
        outcome = _nfc_names(outcome)
        for name, value in outcome.items():
            problem = isinstance(name, str) and carry_problem(name, value)
            if problem:
                raise ControlError("invalid", f"outcome.{name}: {problem}")
        if type(n) is not int:
            raise ControlError("invalid", "n: must be an integer")
        ttl_s = self.manifest.ttl_default_s if ttl is None else ttl
        if type(ttl_s) is not int or not 1 <= ttl_s <= self.manifest.ttl_max_s:
            raise ControlError(
                "invalid", f"ttl: must be an integer in 1..{self.manifest.ttl_max_s} seconds"
            )
        try:
            sketch = quantize(normalize(vector))
        except FingerprintError as exc:
            raise ControlError("invalid", str(exc)) from None
        created_ms = self.creation.created_ms(_content_key(topic, sketch, outcome, n, ttl_s))
        wait = self.creation.wait_s(created_ms)
        if wait:
            await trio.sleep(wait)  # the same case again this millisecond: the next one
        try:
            packet = create_packet(
                self.ident.signing_key,
                swarm=self.manifest.swarm_id,
                topic=topic,
                sketch=sketch,
                outcome=dict(outcome),
                n=n,
                ttl_s=ttl_s,
                created_ms=created_ms,
                max_bytes=self.manifest.packet_max_bytes,
            )
            # Keys come from the sketch, not the raw vector, so any node holding the
            # packet can recompute (and check) exactly the keys it belongs under.
            keys = keys_for(self.manifest, topic, sketch.to_array())
        except (FingerprintError, PacketError, ManifestError) as exc:
            raise ControlError("invalid", str(exc)) from None
        return packet, keys

    async def emit(
        self,
        topic: str,
        vector: list[float],
        outcome: dict[str, Any],
        n: int = 1,
        ttl: int | None = None,
    ) -> dict[str, Any]:
        packet, keys = await self._packet(topic, vector, outcome, n, ttl)
        report = await self._put(packet)
        return {"id": packet.id.hex(), "keys": len(keys), "stored": report}

    async def emit_many(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if len(items) > MAX_EMIT_BATCH:
            raise ControlError("invalid", f"items: at most {MAX_EMIT_BATCH} per request")
        results: list[dict[str, Any]] = [{} for _ in items]
        ready: list[tuple[int, OutcomePacket]] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, Mapping):
                    raise ControlError("invalid", "item: must be an object")
                unknown = set(item) - {"topic", "vector", "outcome", "n", "ttl"}
                if unknown:
                    raise ControlError("invalid", f"{sorted(unknown)[0]}: unknown field")
                for name in ("topic", "vector", "outcome"):
                    if name not in item:
                        raise ControlError("invalid", f"{name}: missing")
                packet, _ = await self._packet(
                    item["topic"], item["vector"], item["outcome"], item.get("n", 1),
                    item.get("ttl"),
                )
            except ControlError as exc:
                results[i] = {"error": {"code": exc.code, "message": exc.message}}
                continue
            ready.append((i, packet))

        # One placement per key for the whole batch (qisd.dht.packets.put_packets).
        try:
            outcomes = await self._put_many([packet for _, packet in ready])
        except ControlError as exc:
            outcomes = [exc] * len(ready)
        for (i, packet), outcome in zip(ready, outcomes, strict=True):
            if isinstance(outcome, ControlError):
                results[i] = {"error": {"code": outcome.code, "message": outcome.message}}
            else:
                results[i] = {"id": packet.id.hex(), "stored": outcome}
        return {"results": results}

    async def _put(self, packet: OutcomePacket) -> int:
        (outcome,) = await self._put_many([packet])
        if isinstance(outcome, ControlError):
            raise outcome
        return outcome

    async def _put_many(self, packets: list[OutcomePacket]) -> list[int | ControlError]:
        """Put ``packets``; for each, its copies or why it was not emitted."""
        if not packets:
            return []
        self._inflight += 1
        try:
            reports = await self.node.put_packets(packets)
        except StoreError as exc:
            raise ControlError(exc.code, str(exc)) from None
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        failure = self.store.failure
        outcomes: list[int | ControlError] = []
        for packet, report in zip(packets, reports, strict=True):
            if not report.ok and failure is not None:
                # Some key of the packet has no copy anywhere because this node's
                # store refused it (disk full, read-only): say so, naming the file,
                # so the application can retry once the disk is fixed.
                outcomes.append(ControlError(failure.code, str(failure)))
                continue
            self.emitted += 1
            self.watches.publish(packet)
            outcomes.append(report.copies)
        return outcomes

    # -- query -----------------------------------------------------------------

    async def query(self, topic: str, vector: list[float], k: int = 10) -> dict[str, Any]:
        if type(k) is not int or not 1 <= k <= MAX_K:
            raise ControlError("invalid", f"k: must be an integer in 1..{MAX_K}")
        topic = _check_topic(topic)
        try:
            unit = normalize(vector)
            sketch = quantize(unit)
            keys = probe_keys(self.manifest, topic, unit)
        except (FingerprintError, ManifestError) as exc:
            raise ControlError("invalid", str(exc)) from None
        found = await self.node.find_packets(keys, sketch, k)
        self.queries += 1
        of_topic = [(s, p) for s, p in found if p.topic == topic]
        # A topic may carry vectors of several dimensions; only the query's compare.
        same = [(s, p) for s, p in of_topic if p.sketch.dim == sketch.dim]
        matches = same[: k * 2]
        notes: list[str] = []
        if len(same) < len(of_topic):
            dims = sorted({p.sketch.dim for _, p in of_topic} - {sketch.dim})
            notes.append(
                f"left out {len(of_topic) - len(same)} packets of topic {topic!r} with "
                f"{', '.join(map(str, dims))} dimensions; the query has {sketch.dim}"
            )
        return {
            "matches": [match_summary(s, p) for s, p in matches[:k]],
            "answer": answer_query(matches, k=k),
            "notes": notes,
        }

    # -- packets and watch ---------------------------------------------------------

    async def packets(self, topic: str | None = None, limit: int = 100) -> dict[str, Any]:
        if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
            raise ControlError("invalid", f"limit: must be an integer in 1..{MAX_LIMIT}")
        if topic is not None:
            topic = _check_topic(topic)  # as emit, query and watch: no other can exist
        try:
            found = await trio.to_thread.run_sync(
                lambda: self.store.recent(topic=topic, limit=limit, now_ms=wall_ms())
            )
        except StoreError as exc:  # a failing disk or a damaged file: say which
            raise ControlError(exc.code, str(exc)) from None
        return {"packets": [p.to_summary() for p in found]}

    @asynccontextmanager
    async def watch(
        self, topic: str, vector: list[float] | None = None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Subscribe on entry (before the server acknowledges), so nothing emitted
        after the ack is missed; the body iterates the events."""
        topic = _check_topic(topic)
        try:
            keys = self._watch_keys(topic, vector)
            query = quantize(normalize(vector)) if vector is not None else None
        except (FingerprintError, ManifestError) as exc:
            raise ControlError("invalid", str(exc)) from None
        async with self.watches.subscribe(topic) as sub, trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_listening, keys)
            yield _events(sub, query)
            nursery.cancel_scope.cancel()

    def _watch_keys(self, topic: str, vector: Sequence[float] | None) -> list[bytes]:
        """The keys to listen on at their responsible nodes.

        With a vector: its exact key in every table (similar packets share at least
        one with high probability). Without: every code of table 0 of the topic, since
        each packet has exactly one table-0 key. Keys do not depend on the dimension.
        """
        if vector is not None:
            return keys_for(self.manifest, topic, normalize(vector))
        lsh = LSH.for_topic(self.manifest, topic, 1)
        if lsh.bits > MAX_WATCH_BITS:
            raise ControlError(
                "invalid",
                f"vector: topic {topic!r} uses {lsh.bits}-bit codes; watching it whole "
                f"needs a vector (at most {MAX_WATCH_BITS} bits without one)",
            )
        return [lsh.key(0, code) for code in range(1 << lsh.bits)]

    async def _keep_listening(self, keys: list[bytes]) -> None:
        """Register at the keys' responsible nodes and renew before the ttl runs out;
        while some key found no node to register at (a node still alone, or still
        joining), try again every few seconds."""
        ttl = max(10.0, self.config.dht.listen_ttl)
        granted: dict[bytes, int] = {}

        async def register(key: bytes) -> None:
            granted[key] = await self.node.listen(key, ttl)

        for key in keys:
            self._listening[key] += 1
        try:
            while True:
                async with trio.open_nursery() as nursery:
                    for key in keys:
                        nursery.start_soon(register, key)
                complete = all(granted.get(k, 0) > 0 for k in keys)
                await trio.sleep(ttl / 2 if complete else WATCH_RETRY_S)
        finally:
            # Other watches may listen on the same keys: the last one out unlistens.
            for key in keys:
                self._listening[key] -= 1
                if self._listening[key] <= 0:
                    del self._listening[key]
                    self.node.unlisten(key)


async def _events(sub: Subscription, query: Sketch | None) -> AsyncIterator[dict[str, Any]]:
    async for packet in sub.receive:
        yield _watch_event(packet, query, sub.take_missed())


def _watch_event(packet: OutcomePacket, query: Sketch | None, missed: int) -> dict[str, Any]:
    event = packet.to_summary()
    if query is not None:
        # 0.0 for a packet of another dimension (a topic may carry several).
        event["similarity"] = round(cosine(query, packet.sketch), 6)
    if missed:
        # Packets of the topic this watcher was too slow to take, since its last event.
        event["missed"] = missed
    return event
