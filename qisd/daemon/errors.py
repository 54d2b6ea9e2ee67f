"""Startup failures an operator can fix, turned into one clear line each."""

from __future__ import annotations


class StartupError(RuntimeError):
    pass


def describe_startup_error(exc: BaseException) -> str | None:
    """One line for a known startup failure, or None for a genuine bug."""
    from qisd.control.server import ControlSocketError, ControlSocketInUse
    from qisd.daemon.lock import StateDirLocked
    from qisd.identity import IdentityError
    from qisd.manifest import ManifestError
    from qisd.store import StoreError

    if isinstance(exc, BaseExceptionGroup):
        inner = [describe_startup_error(e) for e in exc.exceptions]
        known = [m for m in inner if m]
        return known[0] if known and len(known) == len(inner) else None
    known_types = (StartupError, StateDirLocked, ControlSocketInUse, ControlSocketError,
                   IdentityError, ManifestError, StoreError)
    if isinstance(exc, known_types):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{exc.strerror} ({exc.filename or 'address'})" if exc.strerror else str(exc)
    return None
