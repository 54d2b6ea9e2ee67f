"""One daemon per state directory: an exclusive ``flock`` on ``<state_dir>/qisd.lock``.

The kernel drops the lock when the process dies, so a crashed daemon never leaves a
stale lock behind; the file holds the pid of the holder only to make the error useful.
On a read-only state directory an existing lock file is locked read-only (no pid).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class StateDirLocked(RuntimeError):
    pass


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "qisd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            writable = True
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES) or not self.path.exists():
                raise
            # A read-only state dir (the store then opens read-only and the daemon
            # serves what it holds): flock works on a read-only descriptor too.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            writable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirLocked(
                f"another qisd (pid {holder}) is running with state directory "
                f"{self.path.parent}; stop it first or use another --state-dir"
            ) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
