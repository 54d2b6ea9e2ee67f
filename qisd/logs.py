"""Logging: structlog for our own events, the stdlib ``logging`` tree routed the same way.

One handler on the root logger renders everything, so a line from a library that uses
``logging`` looks like one of ours. On a terminal the rendering is for people (time,
level, event, then ``key=value`` pairs); anywhere else (journald, Docker, a file) it is
one JSON object per line, which log shippers parse without guessing. Timestamps are ISO
8601 in UTC so lines from sites in different time zones sort together.

Call :func:`configure_logging` once at start-up (``qisd run`` does it from the
``[log]`` config); modules take a logger with :func:`get_logger` at import time, which
is safe before configuration because structlog binds lazily.
"""

from __future__ import annotations

import logging
import sys
from pathlib import PurePath
from typing import IO, Any

import structlog
from structlog.typing import Processor

__all__ = ["FORMATS", "LEVELS", "configure_logging", "get_logger"]

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")


class _QisdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our root handler; its type lets a second configure_logging replace it (and
    leave alone the handlers others installed, e.g. pytest's)."""


def _json_default(value: object) -> object:
    """JSON for the values we log that json cannot encode: paths as their text,
    bytes (ids, keys) as hex, anything else as its repr."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset):
        return list(value)
    return repr(value)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure_logging(level: str, fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Send structlog and stdlib logging at ``level`` and above to ``stream``
    (default ``sys.stderr``), as JSON lines (``fmt="json"``, or ``"auto"`` when
    ``stream`` is not a TTY) or key=value console lines (``"console"``, or ``"auto"``
    on a TTY). Raises ValueError for an unknown level or format."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = sys.stderr if stream is None else stream
    tty = _is_tty(out)
    as_json = fmt == "json" or (fmt == "auto" and not tty)

    # Applied to every event, ours and the stdlib's, before rendering.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(default=_json_default)
        # A traceback becomes a string field rather than lines that break the JSON.
        final: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
        final = [renderer]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so a later configure_logging (tests, a reload) takes effect
        # for loggers modules created at import time.
        cache_logger_on_first_use=False,
    )
    handler = _QisdHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _QisdHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def get_logger(name: str, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use ``__name__``), with ``initial``
    key/values bound to every event it logs."""
    return structlog.stdlib.get_logger(name, **initial)
