"""Stock ``kademlia.network.Server`` nodes (asyncio) driven by JSON lines on stdin.

Run as a subprocess by ``test_interop.py``. Each command is one JSON object per line;
each answer is one JSON line on stdout. Stock log output goes to stderr.

    {"cmd": "start", "port": 0, "timeout": 5}  -> {"i": 0, "id": hex, "port": n}
    {"cmd": "bootstrap", "i": 0, "addrs": [[ip, port]]} -> {"found": [hex...]}
    {"cmd": "ping", "i": 0, "addr": [ip, port]}          -> {"ok": bool, "id": hex}
    {"cmd": "find", "i": 0, "target": hex}               -> {"found": [hex...]}
    {"cmd": "set", "i": 0, "key": str, "value": str}     -> {"ok": bool}
    {"cmd": "get", "i": 0, "key": str}                   -> {"value": str | null}
    {"cmd": "call", "i": 0, "addr": [ip, port], "name": str, "args": [...]}
                                                         -> {"ok": bool, "result": repr}
    {"cmd": "table", "i": 0}                             -> {"ids": [hex...]}
    {"cmd": "stop", "i": 0}                              -> {}
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node

servers: list[Server | None] = []


def arg(value: Any) -> Any:
    """JSON cannot carry bytes: {"hex": "..."} stands for bytes."""
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return [arg(v) for v in value]
    return value


async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["cmd"]
    if op == "start":
        server = Server()
        await server.listen(cmd.get("port", 0), interface="127.0.0.1")
        # rpcudp waits 5 s for a reply; tests with stopped peers pass a shorter wait.
        server.protocol._wait_timeout = cmd.get("timeout", 5)
        servers.append(server)
        port = server.transport.get_extra_info("sockname")[1]
        return {"i": len(servers) - 1, "id": server.node.id.hex(), "port": port}
    server = servers[cmd["i"]]
    assert server is not None, "server stopped"
    if op == "bootstrap":
        found = await server.bootstrap([tuple(a) for a in cmd["addrs"]])
        return {"found": [n.id.hex() for n in found]}
    if op == "ping":
        ok, node_id = await server.protocol.ping(tuple(cmd["addr"]), server.node.id)
        return {"ok": ok, "id": node_id.hex() if ok else None}
    if op == "find":
        target = Node(bytes.fromhex(cmd["target"]))
        nearest = server.protocol.router.find_neighbors(target)
        spider = NodeSpiderCrawl(server.protocol, target, nearest, server.ksize, server.alpha)
        return {"found": [n.id.hex() for n in await spider.find()]}
    if op == "set":
        return {"ok": bool(await server.set(cmd["key"], cmd["value"]))}
    if op == "get":
        return {"value": await server.get(cmd["key"])}
    if op == "call":
        method = getattr(server.protocol, cmd["name"])
        ok, result = await method(tuple(cmd["addr"]), *arg(cmd["args"]))
        return {"ok": ok, "result": repr(result)}
    if op == "table":
        ids = [n.id.hex() for b in server.protocol.router.buckets for n in b.get_nodes()]
        return {"ids": ids}
    if op == "stop":
        server.stop()
        servers[cmd["i"]] = None
        return {}
    raise ValueError(f"unknown command {op!r}")


async def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            answer = await handle(json.loads(line))
        except Exception as exc:
            answer = {"error": repr(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
