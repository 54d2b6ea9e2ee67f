"""Real ``qisd run`` processes and their stores, for the process-level fault experiments
(``scripts/fault_crash.py``, ``scripts/fault_disk.py`` and their tests).

- :class:`QisdProcess`: one daemon on 127.0.0.1 (port 0 unless told), started and awaited on its
  own sd_notify ``READY=1``, stopped with SIGTERM or killed with SIGKILL.
- :func:`check_store`: the offline checks of a store file (SQLite integrity, foreign
  keys, every packet decodes and verifies, no orphans, every acknowledged id held).
- :func:`tmpfs`, :func:`fill`, :func:`remount`: a tiny filesystem of its own for a state
  directory, filled to the last byte or remounted read-only (root only; the error
  says why when the kernel refuses).
- :func:`metric`: one sample of a daemon's Prometheus endpoint.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qisd.packet import PacketError, decode_packet

READY_TIMEOUT = 30.0
STORE_FILE = "packets.db"


class QisdProcess:
    """One ``qisd run`` (127.0.0.1, port 0), ready on its own READY=1."""

    def __init__(
        self,
        root: Path,
        name: str = "crash",
        *,
        extra: tuple[str, ...] = (),
        metrics: bool = False,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.root = root
        self.state_dir = root / name
        self.socket = root / f"{name}.sock"
        self.log = root / f"{name}.log"
        self.notify_path = root / f"{name}.notify"
        self.extra = extra
        self.metrics = metrics
        #: ``--listen``; a restart on the port a first start was given passes it here.
        self.listen = listen
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def store_path(self) -> Path:
        return self.state_dir / STORE_FILE

    def start(self) -> float:
        """Start and wait for READY=1; the seconds that took."""
        self.notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.notify_path))
        cmd = [
            sys.executable, "-m", "qisd", "run", "--state-dir", str(self.state_dir),
            "--socket", str(self.socket), "--listen", self.listen,
            "--metrics", "127.0.0.1:0" if self.metrics else "off",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QISD_")}
        env.update(NOTIFY_SOCKET=str(self.notify_path), QISD_LOG_FORMAT="json")
        started = time.monotonic()
        try:
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = started + READY_TIMEOUT
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"qisd did not become ready (exit {self.proc.poll()}):\n"
                        + self.log.read_text(errors="replace")[-3000:]
                    )
                notify.settimeout(min(remaining, 0.5))
                try:
                    if b"READY=1" in notify.recv(4096):
                        return time.monotonic() - started
                except TimeoutError:
                    continue
        finally:
            notify.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@dataclass
class StoreCheck:
    integrity: str
    foreign_key_violations: int
    packets: int
    entries: int
    bad_packets: int
    packets_without_entries: int
    missing_acked: int

    @property
    def clean(self) -> bool:
        return (
            self.integrity == "ok"
            and self.foreign_key_violations == 0
            and self.bad_packets == 0
            and self.packets_without_entries == 0
            and self.missing_acked == 0
        )


def check_store(path: Path, acked: set[str]) -> StoreCheck:
    """Check the SQLite store at ``path`` (the daemon may be running: WAL readers are fine)."""
    conn = sqlite3.connect(str(path), timeout=30.0)
    try:
        integrity = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        fk = len(conn.execute("PRAGMA foreign_key_check").fetchall())
        bad = 0
        held: set[str] = set()
        for pid, data in conn.execute("SELECT id, data FROM packets"):
            try:
                packet = decode_packet(bytes(data))  # signature verified
            except PacketError:
                bad += 1
                continue
            if packet.id != bytes(pid):
                bad += 1
            held.add(bytes(pid).hex())
        packets = len(held)
        entries = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        lonely = conn.execute(
            "SELECT COUNT(*) FROM packets p"
            " WHERE NOT EXISTS (SELECT 1 FROM entries e WHERE e.id = p.id)"
        ).fetchone()[0]
    finally:
        conn.close()
    return StoreCheck(integrity, fk, packets, int(entries), bad, int(lonely), len(acked - held))


# -- a small filesystem of its own ------------------------------------------------------


class MountError(RuntimeError):
    """The kernel would not mount (or remount) the test filesystem; the message says why."""


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise MountError(f"mount {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def mount_problem() -> str | None:
    """Why :func:`tmpfs` cannot work here (not root, no ``mount``), or None."""
    if os.geteuid() != 0:
        return f"mounting a tmpfs needs root (euid {os.geteuid()})"
    if not any(Path(d, "mount").exists() for d in os.get_exec_path()):
        return "no mount(8) on PATH"
    return None


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a ``size_bytes`` tmpfs at ``path`` (created); unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "qisd-fault", str(path))
    try:
        yield path
    finally:
        # Lazy as a last resort: a process the caller failed to stop may hold it.
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, *, read_only: bool) -> None:
    """Remount the tmpfs at ``path`` read-only or read-write. Going read-only fails
    while any process has a file on it open for writing (the kernel's rule)."""
    _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(path))


def fill(path: Path) -> int:
    """Write ``path`` (a file) until the filesystem is full; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return written


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample (0 if absent) from a Prometheus text endpoint."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                   if labels else "")
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == want:
            return float(value)
    return 0.0
