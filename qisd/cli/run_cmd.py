"""``qisd run``: the daemon. Flags override ``QISD_*`` variables, which override the
config file, which overrides the embedded defaults; only flags actually given count."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from qisd.cli.config_cmd import CONFIG_FILE_HELP
from qisd.config import ConfigError, load_config


def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", help=CONFIG_FILE_HELP),
    ] = None,
    state_dir: Annotated[
        str | None, typer.Option("--state-dir", help="State directory (key, store, peers).")
    ] = None,
    socket: Annotated[
        str | None, typer.Option("--socket", help="Control socket path.")
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="UDP HOST:PORT to bind (port 0: any free port)."),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", help="Peer HOST:PORT to join through (repeatable)."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", help="Metrics HTTP HOST:PORT, or 'off'."),
    ] = None,
    manifest: Annotated[
        str | None, typer.Option("--manifest", help="Swarm manifest file (TOML or msgpack).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning, error or critical.")
    ] = None,
) -> None:
    """Run the qisd daemon (a single node until it is given peers)."""
    overrides = {
        "node.state_dir": state_dir,
        "node.socket": socket,
        "node.listen": listen,
        "node.bootstrap": list(bootstrap) if bootstrap else None,
        "metrics.listen": metrics,
        "node.manifest": manifest,
        "log.level": log_level,
    }
    try:
        cfg = load_config(config, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(code=2) from None
    from qisd.config_checks import runtime_problems

    problems = runtime_problems(cfg)
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(code=2)

    import trio

    from qisd.daemon.errors import describe_startup_error
    from qisd.daemon.run import run_daemon
    from qisd.logs import configure_logging

    configure_logging(cfg.log.level, cfg.log.format)
    try:
        trio.run(run_daemon, cfg)
    except Exception as exc:
        known = describe_startup_error(exc)
        if known is None:
            raise
        message, code = known
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=code) from None
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("run")(run)
