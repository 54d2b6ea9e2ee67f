"""``qisd config check`` and ``qisd config show``: validate and print the configuration.

Both build the config exactly as ``qisd run`` would (file < ``QISD_*`` environment),
so what ``check`` accepts the daemon accepts and what ``show`` prints is what it runs
with. ``check`` goes a step further than loading: it also looks at the things a load
does not touch (the manifest file exists, the synthesizer is installed, the socket
path fits), so a deploy can fail at ``check`` rather than at start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from qisd.cli.output import JsonUsageCommand, echo, echo_json
from qisd.config import Config, ConfigError, load_config, to_dict, to_toml
from qisd.config_checks import runtime_problems

__all__ = ["config_app", "register"]

config_app = typer.Typer(
    name="config",
    help="Validate and inspect the configuration (file < QISD_* environment).",
    no_args_is_help=True,
)

CONFIG_FILE_HELP = (
    "Config file (TOML). Default: $QISD_CONFIG, else $CONFIGURATION_DIRECTORY/qisd.toml"
    " under systemd, else none (embedded defaults)."
)


def _fail(problems: tuple[str, ...], as_json: bool = False) -> NoReturn:
    """An ``error:`` line per problem on stderr (and, with ``--json``, one error map
    on stdout naming them all), exit 1."""
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if as_json:
        echo_json({"error": {"code": "invalid_config", "message": "; ".join(problems),
                             "problems": list(problems)}})
    raise typer.Exit(code=1)


def _load(file: Path | None, as_json: bool = False) -> Config:
    try:
        return load_config(file, env=os.environ)
    except ConfigError as exc:
        _fail(exc.problems, as_json)


def _describe(config: Config) -> str:
    what = str(config.source_file) if config.source_file else "embedded defaults"
    env_vars = sorted({s.name for s in config.sources.values() if s.kind == "env"})
    if env_vars:
        what += f" (environment: {', '.join(env_vars)})"
    return what


@config_app.command("check")
def check(
    file: Annotated[Path | None, typer.Argument(help=CONFIG_FILE_HELP, show_default=False)] = None,
) -> None:
    """Validate a config file and the QISD_* environment; exit 1 naming every problem."""
    try:
        config = load_config(file, env=os.environ)
    except ConfigError as exc:
        later = runtime_problems(exc.partial) if exc.partial is not None else []
        _fail((*exc.problems, *later))
    problems = runtime_problems(config)
    if problems:
        _fail(tuple(problems))
    typer.echo(f"ok: {_describe(config)}")


@config_app.command("show", cls=JsonUsageCommand)
def show(
    config_file: Annotated[
        Path | None, typer.Option("--config", "-c", help=CONFIG_FILE_HELP, show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Print the effective configuration (defaults, file and environment applied)."""
    config = _load(config_file, as_json)
    # echo: a reader that stops early (| head) ends the output quietly, exit 0.
    if as_json:
        echo(json.dumps(to_dict(config), indent=2))
        return
    try:
        state_dir, socket = config.resolved_state_dir(), config.resolved_socket()
    except ConfigError as exc:
        _fail(exc.problems)
    echo(f"# qisd effective configuration: {_describe(config)}\n"
         f"# state directory: {state_dir}\n"
         f"# control socket: {socket}\n\n"
         f"{to_toml(config, annotate=True)}", nl=False)


def register(app: typer.Typer) -> None:
    """Add ``qisd config ...`` to the top-level app."""
    app.add_typer(config_app, name="config")
