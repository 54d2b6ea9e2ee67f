"""The state dir's swarm record: a start in another swarm is said, once, and recorded."""

from __future__ import annotations

import json
from pathlib import Path

from daemon_helpers import Daemon

from qisd.daemon.swarmfile import SWARM_FILE_NAME, note_swarm
from qisd.manifest import DEFAULT_MANIFEST, Manifest


def test_the_swarm_a_state_dir_held_before_is_returned_once(tmp_path: Path) -> None:
    other = Manifest(name="other")
    assert note_swarm(tmp_path, DEFAULT_MANIFEST) is None  # first start: recorded
    assert note_swarm(tmp_path, DEFAULT_MANIFEST) is None  # same swarm: nothing to say
    assert note_swarm(tmp_path, other) == {"swarm": DEFAULT_MANIFEST.swarm_id.hex(),
                                           "name": DEFAULT_MANIFEST.name}
    assert note_swarm(tmp_path, other) is None
    recorded = json.loads((tmp_path / SWARM_FILE_NAME).read_text())
    assert recorded == {"swarm": other.swarm_id.hex(), "name": "other"}


def test_an_unreadable_record_is_replaced_and_an_unwritable_place_tolerated(tmp_path: Path) -> None:
    (tmp_path / SWARM_FILE_NAME).write_text("{not json")
    assert note_swarm(tmp_path, DEFAULT_MANIFEST) is None
    assert json.loads((tmp_path / SWARM_FILE_NAME).read_text())["name"] == "qisd-default"
    gone = tmp_path / "missing"  # cannot be written: no error, nothing recorded
    assert note_swarm(gone, DEFAULT_MANIFEST) is None
    assert not gone.exists()


def test_a_daemon_started_in_another_swarm_says_so(workdir: Path,
                                                   daemons: list[Daemon]) -> None:
    d = Daemon(workdir, "moved").start()
    daemons.append(d)
    assert d.stop() == 0
    manifest = workdir / "lab.toml"
    manifest.write_text('name = "lab"\n')
    d.extra = ["--manifest", str(manifest)]
    d.start()
    rows = [json.loads(r) for r in d.log.read_text().splitlines() if r.startswith("{")]
    (said,) = [r for r in rows if r["event"].startswith("state dir was used in another swarm")]
    assert said["was_name"] == "qisd-default" and said["name"] == "lab"
    assert said["level"] == "warning"
