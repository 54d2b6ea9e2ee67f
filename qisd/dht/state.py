"""The routing table on disk: a msgpack file in the state directory (never pickle).

Saved periodically and on shutdown, loaded at start so a restarted node knows its
old contacts before anyone bootstraps it. A missing, unreadable or malformed file
is logged and ignored: the node then starts empty and joins through ``bootstrap``.

The file records the swarm id it was saved in; a file of another swarm (or one that
records none) is ignored with a log line, so the contacts of an old swarm do not
come back after the swarm is re-keyed (a new manifest, a new swarm id). The node
decides what a restored contact may do (:meth:`qisd.dht.node.DHTNode.run`): in an
open swarm it enters the table at once, in a closed one only after proving its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import trio
from kademlia.node import Node

from qisd.dht.routing import contacts_from_state
from qisd.dht.wire import pack
from qisd.logs import get_logger

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

log = get_logger(__name__)
FILE_NAME = "dht-routing.msgpack"
MAX_STATE_BYTES = 4 * 1024 * 1024
#: The swarm id the table was saved in (32 bytes).
SWARM_FIELD = "swarm"


async def load(node: DHTNode) -> list[Node]:
    """Saved contacts of ``node``'s swarm that it could reach (none: nothing usable)."""
    path = node.state_file
    if path is None:
        return []

    def read() -> bytes | None:
        try:
            if path.stat().st_size > MAX_STATE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
            return path.read_bytes()
        except FileNotFoundError:
            return None

    try:
        data = await trio.to_thread.run_sync(read)
        if data is None:
            return []
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=1024,
            max_bin_len=1024,
            max_array_len=100_000,
            max_map_len=64,
            max_ext_len=0,
        )
        contacts = contacts_from_state(obj)
    except Exception as exc:  # any unreadable state: start empty, say why
        log.warning("ignoring routing state", path=str(path), error=str(exc))
        return []
    swarm = obj.get(SWARM_FIELD)
    if swarm != node.manifest.swarm_id:
        log.warning(
            "ignoring routing state of another swarm",
            path=str(path),
            saved_swarm=swarm.hex() if isinstance(swarm, bytes) else None,
            swarm=node.manifest.swarm_id.hex(),
        )
        return []
    return [c for c in contacts if c.id != node.me.id and node.reachable(c.ip)]


async def save(node: DHTNode) -> None:
    """Write the table atomically, one save at a time; an empty table does not
    overwrite a saved one."""
    path = node.state_file
    if path is None or len(node.table) == 0:
        return
    async with node.state_lock:  # a join's save and the periodic one may meet
        await _write(path, pack({**node.table.to_state(), SWARM_FIELD: node.manifest.swarm_id}))


async def _write(path: Path, data: bytes) -> None:
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a crash after the rename finds the whole table
        os.replace(tmp, path)

    try:
        await trio.to_thread.run_sync(write)
    except OSError as exc:
        log.warning("cannot save routing state", path=str(path), error=str(exc))
