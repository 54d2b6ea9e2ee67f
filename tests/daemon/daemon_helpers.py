"""Real ``qisd run`` subprocesses on 127.0.0.1 (port 0), driven through the CLI.

Readiness is the daemon's own sd_notify ``READY=1`` on a datagram socket the test
binds (no polling, no sleeps); its ``qisd status --json`` then says where it listens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0


def cli(*args: str, socket_path: Path | None = None, timeout: float = 60.0,
        check: bool = True, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("NOTIFY_SOCKET", None)
    cmd = [sys.executable, "-m", "qisd", *args]
    if socket_path is not None:
        cmd += ["--socket", str(socket_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[2:])} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


def cli_json(*args: str, socket_path: Path) -> Any:
    return json.loads(cli(*args, "--json", socket_path=socket_path).stdout)


@dataclass
class Daemon:
    root: Path
    name: str
    bootstrap: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    listen: str = "127.0.0.1:0"
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    messages: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / self.name

    @property
    def socket(self) -> Path:
        return self.root / f"{self.name}.sock"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def address(self) -> str:
        return str(self.status["listen"])

    def start(self, *, wait: bool = True) -> Daemon:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.root / f"{self.name}.notify"
        notify_path.unlink(missing_ok=True)
        self.notify.bind(str(notify_path))
        self.messages = []
        cmd = [
            sys.executable, "-m", "qisd", "run",
            "--state-dir", str(self.state_dir),
            "--socket", str(self.socket),
            "--listen", self.listen,
            "--metrics", "127.0.0.1:0",
            *[arg for peer in self.bootstrap for arg in ("--bootstrap", peer)],
            *self.extra,
        ]
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), QISD_LOG_FORMAT="json")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_for("READY=1")
            self.status = cli_json("status", socket_path=self.socket)
        return self

    def wait_for(self, message: str, timeout: float = START_TIMEOUT) -> None:
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while not any(message in m for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name}: no {message} (exit {self.proc.poll()}); log:\n"
                    + self.log.read_text(errors="replace")[-4000:]
                )
            self.notify.settimeout(min(remaining, 0.5))
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                continue

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None
