"""The routing table on disk: a msgpack file in the state directory (never pickle).

Saved periodically and on shutdown, loaded at start so a restarted node knows its
old contacts before anyone bootstraps it. A missing, unreadable or malformed file
is logged and ignored: the node then starts empty and joins through ``bootstrap``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import msgpack
import trio

from qisd.dht.routing import contacts_from_state
from qisd.dht.wire import pack
from qisd.logs import get_logger

if TYPE_CHECKING:
    from qisd.dht.node import DHTNode

log = get_logger(__name__)
FILE_NAME = "dht-routing.msgpack"
MAX_STATE_BYTES = 4 * 1024 * 1024


async def load(node: DHTNode) -> bool:
    """Restore saved contacts into ``node.table``; True if any were restored."""
    path = node.state_file
    if path is None:
        return False

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
            return False
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
        return False
    for contact in contacts:
        if contact.id != node.me.id and node.reachable(contact.ip):
            node.table.add_contact(contact)
    return len(node.table) > 0


async def save(node: DHTNode) -> None:
    """Write the table atomically; an empty table does not overwrite a saved one."""
    path = node.state_file
    if path is None or len(node.table) == 0:
        return
    data = pack(node.table.to_state())

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    try:
        await trio.to_thread.run_sync(write)
    except OSError as exc:
        log.warning("cannot save routing state", path=str(path), error=str(exc))
