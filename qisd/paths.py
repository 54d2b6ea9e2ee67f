"""Default filesystem locations: state directory, control socket, config file.

One place decides where qisd keeps things when the operator says nothing, so the
daemon and the client library (which finds the daemon's socket with no argument)
always agree. The order follows what runs us:

* under systemd, the directories it creates for the unit (``StateDirectory=``,
  ``RuntimeDirectory=``, ``ConfigurationDirectory=``) arrive as ``$STATE_DIRECTORY``,
  ``$RUNTIME_DIRECTORY`` and ``$CONFIGURATION_DIRECTORY``;
* otherwise the XDG base directories (``$XDG_STATE_HOME``, ``$XDG_RUNTIME_DIR``);
* otherwise ``~/.local/state/qisd``, which also holds the socket.

Every function takes the environment as an argument (default ``os.environ``) so it
can be tested without touching the process environment. Nothing here creates a
directory: the daemon does that when it starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "CONFIG_FILE_NAME",
    "PATH_ENV_VARS",
    "SOCKET_NAME",
    "default_config_path",
    "default_runtime_dir",
    "default_socket_path",
    "default_state_dir",
    "home_dir",
]

#: File name of the control socket inside the runtime (or state) directory.
SOCKET_NAME = "qisd.sock"
#: File name of the config file inside ``$CONFIGURATION_DIRECTORY``.
CONFIG_FILE_NAME = "qisd.toml"
#: The environment variables these defaults read; a loaded config keeps a snapshot
#: of them so its resolved paths do not change if the environment does later.
PATH_ENV_VARS = (
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "HOME",
)


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _systemd_dirs(env: Mapping[str, str], name: str) -> list[Path]:
    """Entries of a systemd directory variable (colon-separated when the unit lists
    several directories), skipping empty and relative ones."""
    return [Path(p) for p in env.get(name, "").split(":") if p and os.path.isabs(p)]


def _xdg_dir(env: Mapping[str, str], name: str) -> Path | None:
    # The XDG base directory spec: a relative path in these variables is invalid
    # and must be ignored.
    value = env.get(name, "")
    return Path(value) if value and os.path.isabs(value) else None


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$HOME`` from ``env``, else the password database's idea of home."""
    home = _env(env).get("HOME", "")
    return Path(home) if home else Path.home()


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the node keeps its key, packet store and routing table.

    ``$STATE_DIRECTORY`` (first entry) else ``$XDG_STATE_HOME/qisd`` else
    ``~/.local/state/qisd``.
    """
    env = _env(env)
    systemd = _systemd_dirs(env, "STATE_DIRECTORY")
    if systemd:
        return systemd[0]
    xdg = _xdg_dir(env, "XDG_STATE_HOME")
    if xdg is not None:
        return xdg / "qisd"
    return home_dir(env) / ".local" / "state" / "qisd"


def default_runtime_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The directory for the control socket, or None when there is no runtime
    directory (then the socket lives in the state directory).

    ``$RUNTIME_DIRECTORY`` (first entry) else ``$XDG_RUNTIME_DIR/qisd``.
    """
    env = _env(env)
    systemd = _systemd_dirs(env, "RUNTIME_DIRECTORY")
    if systemd:
        return systemd[0]
    xdg = _xdg_dir(env, "XDG_RUNTIME_DIR")
    if xdg is not None:
        return xdg / "qisd"
    return None


def default_socket_path(
    env: Mapping[str, str] | None = None, *, state_dir: Path | None = None
) -> Path:
    """The control socket a daemon binds, and a client connects to, by default.

    ``$RUNTIME_DIRECTORY/qisd.sock`` else ``$XDG_RUNTIME_DIR/qisd/qisd.sock`` else
    ``<state_dir>/qisd.sock``, where ``state_dir`` defaults to
    :func:`default_state_dir`. A daemon whose state directory was configured passes
    it here; a client that wants to match it should load the same config
    (``qisd.config.load_config(...).resolved_socket()``).
    """
    runtime = default_runtime_dir(env)
    if runtime is not None:
        return runtime / SOCKET_NAME
    base = state_dir if state_dir is not None else default_state_dir(env)
    return base / SOCKET_NAME


def default_config_path(env: Mapping[str, str] | None = None) -> Path | None:
    """``$CONFIGURATION_DIRECTORY/qisd.toml`` if systemd gave us such a directory and
    the file exists there; otherwise None: qisd runs on embedded defaults."""
    for directory in _systemd_dirs(_env(env), "CONFIGURATION_DIRECTORY"):
        candidate = directory / CONFIG_FILE_NAME
        if candidate.is_file():
            return candidate
    return None
