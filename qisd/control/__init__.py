"""The local control API: a Unix socket the daemon serves and the clients that use it.

* ``protocol``     -- the wire format, version 1 (newline-delimited JSON), method
  signatures, error codes; pure. Its docstring is the protocol's reference, with an
  example to type by hand.
* ``framing``      -- bounded line splitting, shared by the server and the clients
* ``api``          -- :class:`ControlAPI`, the protocol the daemon implements
* ``errors``       -- :class:`ControlError` (the one error that crosses the socket) and
  the local socket errors (:class:`ControlSocketInUse`, :class:`DaemonNotRunning`)
* ``server``       -- :func:`serve_control`: one trio task per connection, limits,
  peer credentials, dispatch to the API
* ``connection``   -- one client connection: whole-line writes with a deadline
* ``watching``     -- ``watch``: the connection becomes a stream of events
* ``drain``        -- on shutdown: no new work, requests in flight finish and answer
* ``bind``         -- claiming the socket path (refusing a live socket, replacing a
  dead one) and removing it on exit
* ``peer``         -- who may connect (``SO_PEERCRED``: root, our uid, our group)
* ``stats``        -- request and connection counters, read as a snapshot by metrics
* ``calls``        -- what both clients share: socket discovery, params, results
* ``client``       -- :class:`Client`, blocking (stdlib ``socket``)
* ``async_client`` -- :class:`AsyncClient`, the same over trio

Applications import the clients from :mod:`qisd` (or :mod:`qisd.client`).
"""

from __future__ import annotations

from qisd.control.api import ControlAPI
from qisd.control.async_client import AsyncClient, AsyncWatch
from qisd.control.client import Client, Watch
from qisd.control.errors import (
    ControlError,
    ControlSocketError,
    ControlSocketInUse,
    DaemonNotRunning,
)
from qisd.control.server import serve_control
from qisd.control.stats import ControlStatistics, ControlStats

__all__ = [
    "AsyncClient",
    "AsyncWatch",
    "Client",
    "ControlAPI",
    "ControlError",
    "ControlSocketError",
    "ControlSocketInUse",
    "ControlStatistics",
    "ControlStats",
    "DaemonNotRunning",
    "Watch",
    "serve_control",
]
