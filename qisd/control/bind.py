"""Claiming the control socket's path: refuse a live socket, replace a dead one.

A live socket at the path means another daemon and is refused
(:class:`ControlSocketInUse`); a dead one (connection refused) is left over from a
crash and is replaced; anything else at the path is an error naming it. On exit the
daemon removes the socket only if the file is still the one it bound.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import trio

from qisd.control.errors import ControlSocketError, ControlSocketInUse
from qisd.logs import get_logger

__all__ = ["MAX_SOCKET_PATH_BYTES", "bind_unix_socket", "remove_if_ours"]

log = get_logger(__name__)

#: sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
_BACKLOG = 128
_PROBE_TIMEOUT = 2.0


def _check_path_length(path: Path) -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ControlSocketError(
            f"control socket path is too long for a Unix socket ({size} bytes, at most"
            f" {MAX_SOCKET_PATH_BYTES}): {path}"
        )


async def _clear_stale(path: Path) -> None:
    """Refuse a live socket at ``path``, remove a dead one, refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(
            f"{path} exists and is not a socket; remove it or choose another --socket"
        )
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            with trio.fail_after(_PROBE_TIMEOUT):
                await probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            # Nobody listens: the file outlived its daemon (crash, kill -9).
            os.unlink(path)
            log.info("removed stale control socket", path=str(path))
            return
        except (trio.TooSlowError, BlockingIOError):  # a daemon too busy to accept
            raise ControlSocketInUse(path) from None
        except OSError as exc:
            raise ControlSocketError(
                f"cannot check the existing control socket {path}: {exc.strerror or exc}"
            ) from None
    raise ControlSocketInUse(path)


async def bind_unix_socket(path: Path, mode: int) -> trio.socket.SocketType:
    """A listening Unix socket at ``path`` with permissions ``mode``, the parent
    directory created (0750) if missing and a stale socket file replaced."""
    _check_path_length(path)
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlSocketError(
            f"cannot create the directory of the control socket {path}: {exc.strerror or exc}"
        ) from None
    await _clear_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        # chmod before listen(): until then a connect() is refused, so nobody gets in
        # through the umask-derived mode the file was created with.
        os.chmod(path, mode)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # another daemon won a race for the path
            raise ControlSocketInUse(path) from None
        raise ControlSocketError(
            f"cannot bind the control socket {path}: {exc.strerror or exc}"
        ) from None
    return sock


def remove_if_ours(path: Path, bound: os.stat_result) -> None:
    """Unlink ``path`` only if it is still the socket we bound (same device and
    inode): a successor daemon may already have replaced it."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)
    except OSError:
        # Already gone, or replaced by someone else's file: either way not ours to remove.
        return
