"""qisd nodes and stock ``kademlia.network.Server`` nodes in one swarm on 127.0.0.1.

The stock nodes run asyncio in a subprocess (``stock_peer.py``), driven by JSON lines.
Both sides ping and find each other; a value ``set`` by a stock node is ``get`` by
another stock node when only qisd nodes still hold it, and the reverse; qisd packet
puts and finds work with stock nodes in the swarm (those log the packet RPCs they do
not know and ignore them).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from dht_helpers import make_packet, member
from kademlia.node import Node

from qisd.dht import DHTConfig
from qisd.identity import Identity

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("stock_peer.py")
CONFIG = DHTConfig(rpc_timeout=0.5)
#: Seconds stock nodes wait for a reply (rpcudp's default is 5).
STOCK_WAIT = 1.0


class Stock:
    """The stock-node subprocess: one JSON command, one JSON answer."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buffer = b""

    async def __call__(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        await self.proc.stdin.send_all(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some(65536)
            assert chunk, "stock helper exited"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer


@asynccontextmanager
async def stock_process(log: Path) -> AsyncIterator[Stock]:
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(HELPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        try:
            yield Stock(proc)
        finally:
            proc.kill()
            await proc.wait()


async def test_mixed_swarm(tmp_path: Path) -> None:
    rng = random.Random(11)
    with trio.fail_after(120):
        async with stock_process(tmp_path / "stock.log") as stock:
            s0 = await stock("start", timeout=STOCK_WAIT)
            s0_addr = ("127.0.0.1", s0["port"])
            ids = [Identity.generate() for _ in range(4)]
            async with AsyncExitStack() as qisd_nodes:
                qs = [
                    await qisd_nodes.enter_async_context(
                        member(ident, tmp_path / f"q{i}", config=CONFIG)
                    )
                    for i, ident in enumerate(ids)
                ]
                # qisd joins through the stock node, stock nodes join through qisd.
                for q in qs:
                    await q.node.bootstrap([s0_addr])
                s1 = await stock("start", timeout=STOCK_WAIT)
                await stock("bootstrap", i=s1["i"], addrs=[list(qs[0].node.address)])

                # Each side pings the other.
                pong = await stock("ping", i=s1["i"], addr=list(qs[2].node.address))
                assert pong == {"ok": True, "id": ids[2].node_id.hex()}
                contact = await qs[3].node.ping(s0_addr)
                assert contact is not None and contact.id.hex() == s0["id"]
                # Each side finds the other's nodes.
                found, _ = await qs[1].node.lookup_nodes(bytes.fromhex(s1["id"]))
                assert found[0].id.hex() == s1["id"]
                stock_found = await stock("find", i=s1["i"], target=ids[3].node_id.hex())
                assert stock_found["found"][0] == ids[3].node_id.hex()
                table = set((await stock("table", i=s1["i"]))["ids"])
                assert table >= {i.node_id.hex() for i in ids}

                # A stock value reaches another stock node through qisd nodes only: the
                # setter and the other stock node are gone before the getter joins.
                assert (await stock("set", i=s1["i"], key="from-stock", value="v1"))["ok"]
                await stock("stop", i=s1["i"])
                await stock("stop", i=s0["i"])
                # The qisd nodes notice (a ping each) and stop naming them to others.
                async with trio.open_nursery() as nursery:
                    for q in qs:
                        for gone in (s0, s1):
                            peer = Node(bytes.fromhex(gone["id"]), "127.0.0.1", gone["port"])
                            nursery.start_soon(q.node.call, peer, "ping", [q.node.me.id])
                s2 = await stock("start", timeout=STOCK_WAIT)
                await stock("bootstrap", i=s2["i"], addrs=[list(qs[1].node.address)])
                assert (await stock("get", i=s2["i"], key="from-stock"))["value"] == "v1"
                assert await qs[3].node.get("from-stock") == "v1"

                # Packets with a stock node in the swarm: it ignores the packet RPCs.
                packet = make_packet(ids[0], rng)
                report = await qs[0].node.put_packet(packet)
                assert report.ok
                keys = [p.key for p in report.placements]
                for q in qs:
                    hits = await q.node.find_packets(keys, packet.sketch, 3)
                    assert [p.id for _, p in hits] == [packet.id]
                # A stock node calling a packet RPC with bad arguments, or an RPC no
                # one has: dropped and counted, and the qisd node keeps answering.
                target = list(qs[2].node.address)
                bad = await stock(
                    "call", i=s2["i"], addr=target, name="find_packets", args=[{"hex": "00"}]
                )
                assert bad["ok"] is False
                odd = await stock("call", i=s2["i"], addr=target, name="frobnicate", args=[])
                assert odd["ok"] is False
                stats = qs[2].node.statistics()
                assert stats.dropped["bad_args"] >= 1 and stats.dropped["unknown_rpc"] >= 1
                assert (await stock("ping", i=s2["i"], addr=target))["ok"]
                s3 = await stock("start", timeout=STOCK_WAIT)
                await stock("bootstrap", i=s3["i"], addrs=[list(qs[2].node.address)])

            # The reverse: with every qisd node above gone, a qisd value set through
            # the stock nodes reaches a fresh qisd node that knows only stock nodes.
            s2_addr = ("127.0.0.1", s2["port"])
            s3_addr = ("127.0.0.1", s3["port"])
            async with member(Identity.generate(), tmp_path / "setter", config=CONFIG) as setter:
                await setter.node.bootstrap([s2_addr])
                assert await setter.node.set("from-qisd", "v2")
            async with member(Identity.generate(), tmp_path / "getter", config=CONFIG) as getter:
                await getter.node.bootstrap([s3_addr])
                assert getter.node.values.get(b"\x00" * 20, 0.0) is None
                assert await getter.node.get("from-qisd") == "v2"
                assert (await stock("get", i=s3["i"], key="from-qisd"))["value"] == "v2"
    log = (tmp_path / "stock.log").read_text()
    # The stock nodes saw our packet RPCs, logged them and ignored them.
    assert "has no callable method rpc_find_packet_ids" in log
