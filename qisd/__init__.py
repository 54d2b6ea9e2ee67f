"""qisd: a peer-to-peer daemon that routes signed outcome packets by semantic
fingerprint over a Kademlia DHT.

What applications import lives here (a test pins this list):

* :class:`Client` / :class:`AsyncClient` -- talk to a running daemon over its socket;
  :class:`ControlError` (an error reply), :class:`DaemonNotRunning` and
  :class:`ControlSocketError` (nothing to talk to) -- what they raise;
* :class:`OutcomePacket`, :func:`create_packet`, :func:`decode_packet`,
  :class:`PacketError` -- the wire v1 packet;
* :class:`Sketch`, :func:`make_sketch`, :class:`LSH`, :func:`keys_for`,
  :func:`probe_keys` -- fingerprints and keys;
* :class:`Manifest`, :data:`DEFAULT_MANIFEST` -- swarm parameters;
* :class:`Identity` -- a node's Ed25519 key.

Package map: ``packet``, ``sketch``, ``fingerprint``, ``manifest``, ``identity`` and
``store`` are the pure core (the store touches only its SQLite file); ``dht`` is the
trio Kademlia node; ``synthesis`` and ``answer`` turn packets into knowledge;
``control`` is the local socket API and client; ``metrics`` the Prometheus endpoint;
``daemon`` composes them; ``cli`` is the ``qisd`` command.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qisd.control.client import AsyncClient, Client
from qisd.control.errors import ControlError, ControlSocketError, DaemonNotRunning
from qisd.fingerprint import LSH, keys_for, probe_keys
from qisd.identity import Identity
from qisd.manifest import DEFAULT_MANIFEST, Manifest
from qisd.packet import OutcomePacket, PacketError, create_packet, decode_packet
from qisd.sketch import Sketch, make_sketch

__all__ = [
    "DEFAULT_MANIFEST",
    "LSH",
    "AsyncClient",
    "Client",
    "ControlError",
    "ControlSocketError",
    "DaemonNotRunning",
    "Identity",
    "Manifest",
    "OutcomePacket",
    "PacketError",
    "Sketch",
    "__version__",
    "create_packet",
    "decode_packet",
    "keys_for",
    "make_sketch",
    "probe_keys",
]
