"""What loading a config does not verify but the daemon needs at start.

``qisd config check`` and ``qisd run`` both ask, so a deploy fails at ``check`` (or
at once, with exit status 2, at ``run``) rather than half-way through starting.
"""

from __future__ import annotations

from pathlib import Path

from qisd.config import Config, ConfigError
from qisd.synthesis.base import available_synthesizers


def runtime_problems(config: Config) -> list[str]:
    """Each problem as one line naming the key and where its value came from."""
    problems: list[str] = []
    try:
        socket = config.resolved_socket()
    except ConfigError as exc:
        problems += exc.problems
    else:
        # The automatic socket's directory is created; one given by name must exist
        # (a typo must not leave directories behind, as root anywhere).
        if config.node.socket and not socket.parent.is_dir():
            where = config.source_of("node.socket")
            problems.append(f"{where}: node.socket: directory {str(socket.parent)!r} does not"
                            " exist (create it, or leave node.socket empty for the automatic"
                            " path)")
    state_dir = config.resolved_state_dir()
    if state_dir.exists() and not state_dir.is_dir():
        where = config.source_of("node.state_dir")
        problems.append(f"{where}: node.state_dir: {str(state_dir)!r} is not a directory")
    manifest = config.node.manifest
    if manifest and not Path(manifest).is_file():
        where = config.source_of("node.manifest")
        problems.append(f"{where}: node.manifest: no such file {manifest!r}")
    if config.synthesis.enabled:
        name = config.synthesis.synthesizer
        installed = available_synthesizers()
        if name not in installed:
            where = config.source_of("synthesis.synthesizer")
            known = ", ".join(installed) or "none"
            problems.append(
                f"{where}: synthesis.synthesizer: no {name!r} in entry point group"
                f" qisd.synthesizers (installed: {known})"
            )
    return problems
