"""Plug-ins: a synthesizer registered through an entry point is loaded and driven.

The plug-in is ``docs/example_synthesizer.py`` (the copy users start from), installed
here as a throw-away distribution on ``sys.path``: a ``*.dist-info`` directory whose
``entry_points.txt`` registers it, as ``pip install`` of a real package would.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from synth_helpers import KEYS, NOW_MS, direction, near, obs, sign_draft

from qisd.packet import OutcomePacket
from qisd.synthesis import (
    CohortSynthesizer,
    SynthesisDraft,
    SynthesizerError,
    SynthesizerSettings,
    available_synthesizers,
    decode_outcome,
    load_synthesizer,
    run_worker,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example_synthesizer.py"


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "example_synth.py").write_text(EXAMPLE.read_text())
    info = tmp_path / "qisd_example_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qisd-example-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[qisd.synthesizers]\n"
        "example = example_synth:ExampleSynthesizer\n"
        "missing = example_synth:NoSuchThing\n"
        "not_a_synthesizer = builtins:str\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.modules.pop("example_synth", None)


def test_builtin_cohort_is_registered() -> None:
    assert "cohort" in available_synthesizers()
    synth = load_synthesizer("cohort", SynthesizerSettings(min_cohort=3))
    assert isinstance(synth, CohortSynthesizer) and synth.settings.min_cohort == 3


async def test_entry_point_plugin_is_loaded_and_driven(
        plugin_dist: Path, autojump_clock: trio.testing.MockClock) -> None:
    assert {"cohort", "example"} <= set(available_synthesizers())
    settings = SynthesizerSettings(min_cohort=5, salt=b"me")
    synth = load_synthesizer("example", settings)
    assert type(synth).__name__ == "ExampleSynthesizer"
    assert type(synth).__module__ == "example_synth"

    send, receive = trio.open_memory_channel[OutcomePacket](16)
    published: list[SynthesisDraft] = []

    async def publish(draft: SynthesisDraft) -> None:
        published.append(draft)

    rng = np.random.default_rng(0)
    packets = [obs(near(direction(1), rng), {"ok": i < 3}, n=2) for i in range(3)]
    async with trio.open_nursery() as nursery:
        state = await nursery.start(functools.partial(
            run_worker, receive, synth, is_primary=lambda p: True, publish=publish,
            interval=1.0, now_ms=lambda: NOW_MS,
        ))
        for p in packets:
            await send.send(p)
        await trio.sleep(1.5)
        assert [d.n for d in published] == [6]
        await send.send(obs(direction(1), {"ok": False}, n=1))
        await trio.sleep(1.0)
        await send.aclose()
    assert [d.n for d in published] == [6, 7]
    assert published[0].series == published[1].series
    assert state.statistics().drafts_published == 2
    counts = decode_outcome(published[1].outcome, 7).aggregate.get("ok")
    assert counts is not None and counts.labels.counts == {True: 6, False: 1}
    packet = sign_draft(published[1], key=KEYS[3])  # the daemon signs it like this
    assert packet.kind == "synthesis" and packet.n == 7


def test_unknown_and_broken_plugins_are_explained(plugin_dist: Path) -> None:
    settings = SynthesizerSettings()
    with pytest.raises(SynthesizerError) as info:
        load_synthesizer("nope", settings)
    message = str(info.value)
    assert "'nope'" in message and "qisd.synthesizers" in message
    assert "cohort" in message and "example" in message  # what is installed
    with pytest.raises(SynthesizerError, match=r"'missing'.*failed to load"):
        load_synthesizer("missing", settings)
    with pytest.raises(SynthesizerError, match="lacks consume"):
        load_synthesizer("not_a_synthesizer", settings)
