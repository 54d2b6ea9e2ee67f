"""Bootstrapping through a peer of no use says why (real UDP, 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from dht_helpers import member

from qisd.dht import DHTConfig
from qisd.dht.diagnose import NOT_ADMITTED, OTHER_SWARM, SILENT_TO_PING
from qisd.dht.wire import WireError
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST, Manifest

CONFIG = DHTConfig(rpc_timeout=0.5)
ELSEWHERE = Manifest(name="another-swarm")


async def test_a_peer_of_another_open_swarm_is_named_and_kept_out(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            member(Identity.generate(), tmp_path / "a", config=CONFIG) as a,
            member(Identity.generate(), tmp_path / "b", config=CONFIG, manifest=ELSEWHERE) as b,
            member(Identity.generate(), tmp_path / "c", config=CONFIG) as c,
        ):
            assert ELSEWHERE.swarm_id != DEFAULT_MANIFEST.swarm_id
            found, failed = await a.node.join([b.node.address, c.node.address])
            # It answered the ping, and would have entered the table; it is named instead.
            assert failed == {b.node.address: OTHER_SWARM}
            assert [n.id for n in found] == [c.node.me.id]
            # Its own requests do not bring it back into the table either.
            assert await b.node.ping(a.node.address) is not None
            assert b.node.me.id not in {n.id for n in a.node.table.contacts()}
            assert c.node.me.id in {n.id for n in a.node.table.contacts()}


async def test_a_closed_swarm_that_does_not_list_us_is_named(tmp_path: Path) -> None:
    """A closed node answers nothing but hello to a non-member: not "no answer"."""
    insider = Identity.generate()
    closed = Manifest(
        name="closed", membership="closed", members=(insider.public_key,)
    ).signed(Identity.generate().signing_key)
    with trio.fail_after(20):
        async with (
            member(insider, tmp_path / "in", config=CONFIG, manifest=closed) as inside,
            member(Identity.generate(), tmp_path / "out", config=CONFIG) as outside,
        ):
            found, failed = await outside.node.join([inside.node.address])
            assert found == [] and failed == {inside.node.address: OTHER_SWARM}


@pytest.mark.parametrize("closed", [False, True])
async def test_a_peer_that_drops_pings_but_answers_hello(tmp_path: Path, closed: bool) -> None:
    """Same swarm, pings dropped: an open swarm's peer is busy; a closed swarm's
    has not admitted us."""
    a_id, b_id = Identity.generate(), Identity.generate()
    manifest = DEFAULT_MANIFEST
    if closed:
        manifest = Manifest(
            name="closed", membership="closed", members=(a_id.public_key, b_id.public_key)
        ).signed(Identity.generate().signing_key)
    with trio.fail_after(20):
        async with (
            member(a_id, tmp_path / "a", config=CONFIG, manifest=manifest) as a,
            member(b_id, tmp_path / "b", config=CONFIG, manifest=manifest) as b,
        ):
            def no_ping(addr: Any, args: Any) -> Any:
                raise WireError("unsupported", "not today")

            b.node.rpc._methods["ping"] = no_ping
            _, failed = await a.node.join([b.node.address])
            assert failed == {b.node.address: NOT_ADMITTED if closed else SILENT_TO_PING}


async def test_a_dead_address_costs_one_timeout(tmp_path: Path) -> None:
    """Ping and hello go out together: one timeout, not one each."""
    slow = DHTConfig(rpc_timeout=1.0)
    with trio.fail_after(20):
        async with member(Identity.generate(), tmp_path / "a", config=slow) as a:
            async with member(Identity.generate(), tmp_path / "gone", config=slow) as gone:
                addr = gone.node.address
            start = trio.current_time()
            _, failed = await a.node.join([addr])
            assert failed == {addr: "no answer"}
            assert trio.current_time() - start < 1.6


async def test_the_same_address_in_our_swarm_again_is_let_back_in(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with member(Identity.generate(), tmp_path / "a", config=CONFIG) as a:
            async with member(
                Identity.generate(), tmp_path / "b", config=CONFIG, manifest=ELSEWHERE
            ) as b:
                port = b.node.address[1]
                _, failed = await a.node.join([b.node.address])
                assert failed == {b.node.address: OTHER_SWARM}
            # Its operator fixes the manifest and restarts it on the same port.
            async with member(Identity.generate(), tmp_path / "b2", config=CONFIG,
                              port=port) as fixed:
                found, failed = await a.node.join([fixed.node.address])
                assert failed == {} and [n.id for n in found] == [fixed.node.me.id]
                assert await fixed.node.ping(a.node.address) is not None
                assert fixed.node.me.id in {n.id for n in a.node.table.contacts()}
