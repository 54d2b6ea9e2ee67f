"""The client library, for applications: ``from qisd.client import Client``.

:class:`Client` is blocking, :class:`AsyncClient` the trio variant; both find the
daemon's socket on their own (``$QISD_SOCKET``, else the daemon's default path). See
:mod:`qisd.control.client` for usage and :mod:`qisd.control.protocol` for the wire.
"""

from __future__ import annotations

from qisd.control.async_client import AsyncClient, AsyncWatch
from qisd.control.client import Client, Watch
from qisd.control.errors import ControlError, DaemonNotRunning

__all__ = ["AsyncClient", "AsyncWatch", "Client", "ControlError", "DaemonNotRunning", "Watch"]
