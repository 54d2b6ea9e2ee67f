"""A store that cannot be read (a disk I/O error): status and metrics still answer.

In process, over a real node and a real SQLite file whose connections are then made
to fail as a sick disk makes them."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from qisd.config import Config
from qisd.control.errors import ControlError
from qisd.daemon.service import NodeService
from qisd.daemon.watch import WatchHub
from qisd.dht import DHTConfig, open_node
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST
from qisd.metrics import make_registry, scrape
from qisd.store import PacketStore


class _Failing:
    def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    def close(self) -> None:
        pass


async def test_status_and_metrics_say_the_store_is_unreadable(tmp_path: Path) -> None:
    identity = Identity.generate()
    store = PacketStore.open(tmp_path / "packets.db")
    live = store._conn
    try:
        async with open_node(identity, DEFAULT_MANIFEST, store, host="127.0.0.1", port=0,
                             config=DHTConfig(rpc_timeout=0.2)) as node:
            service = NodeService(config=Config(), ident=identity, manifest=DEFAULT_MANIFEST,
                                  store=store, node=node, watches=WatchHub())
            assert (await service.status())["packets"] == 0
            assert "qisd_stored_packets" in (await scrape(*make_registry(service))).decode()
            store._conn = _Failing()  # type: ignore[assignment]
            store._reader = _Failing()  # type: ignore[assignment]
            store._totals = None
            status = await service.status()
            assert status["packets"] is None and status["keys"] is None
            assert "read failed, the disk failed" in status["storage"]["read_error"]
            assert status["node_id"] == identity.node_id.hex()  # the rest as ever
            page = (await scrape(*make_registry(service))).decode()
            assert "qisd_stored_packets" not in page and "qisd_peers" in page
            with trio.fail_after(10):
                answer = await service.query(topic="t", vector=[1.0, 0.0], k=5)
            assert answer["matches"] == []
            with pytest.raises(ControlError) as listing:
                await service.packets()
            assert listing.value.code == "storage_error"
            assert "read failed" in listing.value.message
            store._conn, store._reader = live, None
    finally:
        store._conn = live
        store.close()
