"""Who republishes a key: the replica-set test ignores contacts flagged as failing.

Paper 4.1 keeps a contact that stopped answering in its bucket while no replacement
waits; counted as "closer", such dead contacts made every live holder of a key
believe others were responsible, and copies lost with the dead nodes were never
placed again (scripts/fault_churn.py: ~1% of entries stuck under ``replicas``)."""

from __future__ import annotations

import trio
from kademlia.node import Node

from qisd.dht import open_node
from qisd.dht.maintenance import _in_replica_set
from qisd.identity import Identity
from qisd.manifest import Manifest


async def test_failing_contacts_do_not_count_as_closer_holders() -> None:
    manifest = Manifest(replicas=3)
    ident = Identity.from_seed(b"\x07" * 32)
    with trio.fail_after(10):
        async with open_node(ident, manifest) as node:
            me = int.from_bytes(node.me.id, "big")
            key_int = me ^ (1 << 159)  # the other half of the id space: far from us
            key = key_int.to_bytes(20, "big")
            near = [Node((key_int ^ i).to_bytes(20, "big"), "127.0.0.1", 40000 + i)
                    for i in (1, 2, 3)]
            for contact in near:
                node.table.add_contact(contact)
            assert len(node.table) == 3
            # Three answering contacts are closer: not ours to republish.
            assert not _in_replica_set(node, key)
            # One stops answering (kept, flagged): now we are among the three.
            node.table.contact_failed(near[0])
            assert node.table.failures(near[0].id) == 1 and len(node.table) == 3
            assert _in_replica_set(node, key)
            # It answers again: it counts again.
            node.table.touch(near[0])
            assert node.table.failures(near[0].id) == 0
            assert not _in_replica_set(node, key)
