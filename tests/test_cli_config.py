"""``qisd config check`` / ``qisd config show``, through typer's runner and as a real
``python -m qisd`` process.

The process environment is scrubbed of ``QISD_*`` and systemd directory variables
for each test, so the suite's own environment cannot leak into what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qisd.cli import app
from qisd.config import Config, load_config, to_dict

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "qisd.toml"
_SCRUB = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CONFIGURATION_DIRECTORY")


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("QISD_") and k not in _SCRUB}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("QISD_") or name in _SCRUB:
            monkeypatch.delenv(name)
    # Automatic paths land in the test's directory, never the real home.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))


runner = CliRunner()


def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nlisen = "0.0.0.0:4470"\n', encoding="utf-8")
    return path


def test_check_sample_config_is_ok() -> None:
    result = runner.invoke(app, ["config", "check", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {SAMPLE}\n"
    assert result.stderr == ""


def test_check_without_file_uses_defaults_then_qisd_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "check"])
    assert result.exit_code == 0
    assert result.stdout == "ok: embedded defaults\n"
    result = runner.invoke(
        app, ["config", "check"], env={"QISD_CONFIG": str(SAMPLE), "QISD_LISTEN": "[::]:0"}
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {SAMPLE} (environment: QISD_LISTEN)\n"


def test_check_bad_key_names_key_and_file(tmp_path: Path) -> None:
    path = bad_file(tmp_path)
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "node.lisen" in result.stderr
    assert str(path) in result.stderr
    assert "did you mean node.listen?" in result.stderr


def test_check_bad_env_value_names_the_variable() -> None:
    result = runner.invoke(app, ["config", "check"], env={"QISD_DHT_ALPHA": "three"})
    assert result.exit_code == 1
    assert result.stderr.startswith("error: QISD_DHT_ALPHA: dht.alpha: expected an integer")


def test_check_missing_file() -> None:
    result = runner.invoke(app, ["config", "check", "/nonexistent/qisd.toml"])
    assert result.exit_code == 1
    assert "/nonexistent/qisd.toml: config file not found" in result.stderr


def test_check_looks_at_what_the_daemon_needs(tmp_path: Path) -> None:
    path = tmp_path / "qisd.toml"
    path.write_text(
        '[node]\nmanifest = "swarm.toml"\n[synthesis]\nsynthesizer = "nosuch"\n', encoding="utf-8"
    )
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert f"node.manifest: no such file '{tmp_path / 'swarm.toml'}'" in result.stderr
    assert "synthesis.synthesizer: no 'nosuch' in entry point group qisd.synthesizers" in (
        result.stderr
    )
    # Once the manifest exists and synthesis is off, the same file passes.
    (tmp_path / "swarm.toml").write_text("", encoding="utf-8")
    result = runner.invoke(
        app, ["config", "check", str(path)], env={"QISD_SYNTHESIS_ENABLED": "false"}
    )
    assert result.exit_code == 0, result.output


def test_check_reports_a_socket_path_too_long(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "check"], env={"QISD_SOCKET": "/" + "s" * 200})
    assert result.exit_code == 1
    assert "QISD_SOCKET: node.socket:" in result.stderr


def test_show_prints_effective_toml_that_loads_back(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["config", "show", "--config", str(SAMPLE)],
        env={"QISD_DHT_KSIZE": "16", "QISD_BOOTSTRAP": "a:1,b:2"},
    )
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.stdout)
    assert data["dht"]["ksize"] == 16
    assert data["node"]["bootstrap"] == ["a:1", "b:2"]
    assert "ksize = 16  # from QISD_DHT_KSIZE" in result.stdout
    assert f"# control socket: {tmp_path / 'run' / 'qisd' / 'qisd.sock'}" in result.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout, encoding="utf-8")
    expected = load_config(SAMPLE, env={"QISD_DHT_KSIZE": "16", "QISD_BOOTSTRAP": "a:1,b:2"})
    assert load_config(shown, env={}) == expected != Config()


def test_show_json() -> None:
    result = runner.invoke(app, ["config", "show", "--json"], env={"QISD_METRICS": "off"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == to_dict(load_config(env={"QISD_METRICS": "off"}))
    assert data["metrics"]["listen"] == "off"


def test_show_with_bad_file_fails(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "-c", str(bad_file(tmp_path))])
    assert result.exit_code == 1
    assert "node.lisen" in result.stderr


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("qisd ")
    result = runner.invoke(app, ["config", "--help"])
    assert result.exit_code == 0
    assert "check" in result.stdout and "show" in result.stdout


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qisd", *args],
        capture_output=True,
        text=True,
        env=_clean_environ(),
        timeout=60,
        check=False,
    )


def test_python_dash_m_qisd_config_check(tmp_path: Path) -> None:
    good = _run("config", "check", str(SAMPLE))
    assert good.returncode == 0, good.stderr
    assert good.stdout == f"ok: {SAMPLE}\n"
    path = bad_file(tmp_path)
    bad = _run("config", "check", str(path))
    assert bad.returncode == 1
    assert f"error: {path}: unknown key node.lisen" in bad.stderr


def test_check_names_every_problem_those_of_values_and_of_the_running_daemon(
    tmp_path: Path,
) -> None:
    """A bad value does not hide what only a start would meet (a missing synthesizer)."""
    path = tmp_path / "qisd.toml"
    path.write_text('[dht]\nksize = 0\n[synthesis]\nsynthesizer = "nosuch"\n', encoding="utf-8")
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert "dht.ksize: expected an integer from 1 to 64, got 0" in lines[0]
    assert "synthesis.synthesizer: no 'nosuch'" in lines[1]
