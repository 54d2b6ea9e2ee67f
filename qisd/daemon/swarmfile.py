"""Which swarm a state directory belongs to: the ``swarm`` file in it (pure file I/O).

A state dir holds one swarm's packets (each signed with its swarm id), its routing
table and its republish duties. Started with another manifest (another swarm id: a
new swarm, or a closed swarm whose member list changed), the node joins the new
swarm while the store still holds the old one's packets, which the new swarm's
nodes refuse and queries do not match. That is allowed (a re-keyed swarm keeps its
nodes' state dirs) but never silent: :func:`note_swarm` records the swarm at every
start and says which one the directory held before, when it differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qisd.manifest import Manifest

SWARM_FILE_NAME = "swarm"


def note_swarm(state_dir: Path, manifest: Manifest) -> dict[str, str] | None:
    """Record ``manifest``'s swarm in ``state_dir``; the swarm recorded before
    (``{"swarm", "name"}``) if it was another one, else None. A missing or
    unreadable record is replaced without a word (a state dir from before it)."""
    path = state_dir / SWARM_FILE_NAME
    mine = {"swarm": manifest.swarm_id.hex(), "name": manifest.name}
    before: dict[str, str] | None = None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(recorded, dict) and isinstance(recorded.get("swarm"), str):
            before = {"swarm": recorded["swarm"], "name": str(recorded.get("name", ""))}
    except (OSError, ValueError):
        before = None
    if before is not None and before["swarm"] == mine["swarm"]:
        return None
    tmp = path.with_name(SWARM_FILE_NAME + ".tmp")
    try:
        tmp.write_text(json.dumps(mine) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full state dir: the store says so, and serves reads
    return before
