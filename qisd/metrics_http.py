"""A small trio HTTP server for ``GET /metrics`` (the exposition: :mod:`qisd.metrics`).

Bounded like the control socket: at most :data:`MAX_CONNECTIONS` at once (more are
closed at once, so idle or slow scrapers cannot take the daemon's file descriptors),
a request head of at most :data:`MAX_REQUEST_HEAD` bytes, and :data:`CONNECTION_S`
seconds per connection, whatever it does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from qisd.control.connection import end_gently
from qisd.metrics import QisdCollector, make_registry, scrape

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from qisd.daemon.service import NodeService

log = structlog.get_logger("qisd.metrics")
MAX_REQUEST_HEAD = 8192
#: Connections served at once; Prometheus needs one per scrape.
MAX_CONNECTIONS = 64
#: Seconds a connection may take, from accept to the last byte of the reply.
CONNECTION_S = 10.0
#: What is read and dropped after the reply, at most, before closing: a refused
#: request's unread body would otherwise reset the connection under its reply.
LINGER_BYTES = 65536
LINGER_S = 1.0
#: Seconds between two warnings about refused connections.
_WARN_EVERY_S = 60.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


async def serve_metrics(
    address: tuple[str, int],
    service: NodeService,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``address``; ``started`` with the URL actually bound."""
    registry, collector = make_registry(service)
    host, port = address
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}/metrics"

    open_now = 0
    refused = 0
    warned = -_WARN_EVERY_S

    async def handle(stream: trio.SocketStream) -> None:
        # One scraper's connection, whatever becomes of it (a reset, a bug met by
        # its request), never ends the daemon.
        nonlocal open_now, refused, warned
        if open_now >= MAX_CONNECTIONS:
            refused += 1
            if trio.current_time() - warned >= _WARN_EVERY_S:
                warned = trio.current_time()
                log.warning("metrics connections over the cap closed at once",
                            cap=MAX_CONNECTIONS, refused_total=refused)
            await stream.aclose()
            return
        open_now += 1
        try:
            async with stream:
                with trio.move_on_after(CONNECTION_S):
                    await _answer(stream, registry, collector)
                    await end_gently(stream, LINGER_S, LINGER_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the scraper went away (a reset: port scanners, health checks)
        except Exception:
            log.exception("metrics request failed")
        finally:
            open_now -= 1

    task_status.started(url)
    await trio.serve_listeners(handle, listeners)


async def _answer(
    stream: trio.SocketStream, registry: CollectorRegistry, collector: QisdCollector
) -> None:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        head += chunk
        if len(head) > MAX_REQUEST_HEAD:
            await _reply(stream, 431, b"request head too large\n")
            return
    line = head.split(b"\n", 1)[0].decode("latin-1").strip().split()
    if len(line) == 3 and line[1].lower().startswith(("http://", "https://")):
        line[1] = "/" + line[1].split("/", 3)[3] if line[1].count("/") >= 3 else "/"
    if len(line) != 3 or not line[2].startswith("HTTP/") or not line[1].startswith("/"):
        await _reply(stream, 400, b"not an HTTP request line; GET /metrics\n")
        return
    if line[0] not in ("GET", "HEAD"):
        await _reply(stream, 405, b"only GET /metrics\n")
        return
    path = line[1].split("?", 1)[0]
    if path not in ("/metrics", "/"):
        await _reply(stream, 404, b"see /metrics\n")
        return
    try:
        body = await scrape(registry, collector)
    except Exception as exc:
        log.exception("metrics collection failed")
        await _reply(stream, 500, f"metrics collection failed: {exc}\n".encode())
        return
    await _reply(stream, 200, body if line[0] == "GET" else b"",
                 content_type="text/plain; version=0.0.4; charset=utf-8", length=len(body))


async def _reply(stream: trio.SocketStream, status: int, body: bytes, *,
                 content_type: str = "text/plain; charset=utf-8",
                 length: int | None = None) -> None:
    allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n{allow}Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
