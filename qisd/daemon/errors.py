"""Startup failures an operator can fix, turned into one clear line each.

Each comes with its exit status: 2 for what only a change of configuration (or of a
file it names) can fix, which systemd does not retry (``RestartPreventExitStatus=2``);
1 for what may pass on its own (a port or socket still held, say by the instance
being replaced), which it does.
"""

from __future__ import annotations

#: Exit statuses of ``qisd run``.
EXIT_RETRY = 1
EXIT_CONFIG = 2


class StartupError(RuntimeError):
    def __init__(self, message: str, *, exit_code: int = EXIT_RETRY) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe_startup_error(exc: BaseException) -> tuple[str, int] | None:
    """One line and the exit status for a known startup failure, or None for a
    genuine bug."""
    from qisd.config import ConfigError
    from qisd.control.server import ControlSocketError, ControlSocketInUse
    from qisd.daemon.lock import StateDirLocked
    from qisd.identity import IdentityError
    from qisd.manifest import ManifestError
    from qisd.store import StoreError
    from qisd.synthesis.base import SynthesizerError

    if isinstance(exc, BaseExceptionGroup):
        inner = [describe_startup_error(e) for e in exc.exceptions]
        known = [m for m in inner if m]
        return known[0] if known and len(known) == len(inner) else None
    if isinstance(exc, StartupError):
        return str(exc), exc.exit_code
    if isinstance(exc, ConfigError):
        return "; ".join(exc.problems), EXIT_CONFIG
    if isinstance(exc, ManifestError | IdentityError | SynthesizerError):
        return str(exc), EXIT_CONFIG
    if isinstance(exc, StateDirLocked | ControlSocketInUse | ControlSocketError | StoreError):
        return str(exc), EXIT_RETRY
    if isinstance(exc, NotADirectoryError | FileExistsError | IsADirectoryError):
        return f"{exc.strerror} ({exc.filename})", EXIT_CONFIG
    if isinstance(exc, OSError) and exc.errno is not None:
        message = f"{exc.strerror} ({exc.filename or 'address'})" if exc.strerror else str(exc)
        return message, EXIT_RETRY
    return None
