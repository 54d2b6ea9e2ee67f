"""The client commands of the ``qisd`` CLI against a real control socket.

The daemon side is the fake ControlAPI of ``test_control`` served in a background
thread; commands run through typer's CliRunner (stdout and stderr apart), and every
``--json`` output is parsed, not just printed. One test runs ``qisd watch`` in a
subprocess to see that Ctrl-C ends it cleanly.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import typer
from test_control import TIMEOUT, FakeAPI, serving, short_dir
from typer.testing import CliRunner

from qisd.cli.client_cmd import register
from qisd.control.client import Client

app = typer.Typer()
register(app)
runner = CliRunner()


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def sock(api: FakeAPI) -> Iterator[str]:
    with serving(api) as (path, _):
        yield str(path)


def test_real_app_has_the_client_commands() -> None:
    from qisd.cli import app as qisd_app

    names = {c.name for c in qisd_app.registered_commands}
    assert {"status", "peers", "emit", "query", "watch", "packets", "identity",
            "bootstrap"} <= names


def test_status_json_and_table(sock: str) -> None:
    result = run("status", "--socket", sock, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert {"node_id", "listen", "peers", "packets", "metrics", "version"} <= set(status)
    assert status["metrics"] is None and status["peers"] == 2

    table = run("status", "--socket", sock)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["node_id", "ab" * 20]  # stable keys first
    assert ["metrics", "-"] in [ln.split() for ln in lines]


def test_socket_from_environment(sock: str) -> None:
    result = run("identity", "--json", env={"QISD_SOCKET": sock})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"node_id": "ab" * 20, "public_key": "ef" * 32}


def test_peers_packets_bootstrap(sock: str, api: FakeAPI) -> None:
    peers = run("peers", "--socket", sock)
    assert peers.stdout.splitlines()[0].split() == ["NODE_ID", "ADDRESS", "LAST_SEEN_S"]
    assert "10.0.0.2:4470" in peers.stdout
    assert json.loads(run("peers", "--socket", sock, "--json").stdout)["peers"][0][
        "address"] == "10.0.0.2:4470"

    assert run("packets", "--socket", sock).stdout.strip() == "no packets"
    run("emit", "--socket", sock, "-t", "t", "--vector", "[1,2,3]", "-o", "a=1")
    listed = json.loads(run("packets", "--socket", sock, "--json", "--limit", "5").stdout)
    assert [p["topic"] for p in listed["packets"]] == ["t"]
    assert api.calls[-1] == ("packets", {"topic": None, "limit": 5})
    table = run("packets", "--socket", sock, "--topic", "t").stdout
    assert "2023-11-14T22:13:20Z" in table and "a=1" in table

    boot = run("bootstrap", "10.0.0.5:4470", "[::1]:4471", "--socket", sock, "--json")
    assert boot.exit_code == 0, boot.output
    assert json.loads(boot.stdout) == {"contacted": 2, "peers": 3}
    assert api.calls[-1] == ("bootstrap", {"addresses": ["10.0.0.5:4470", "[::1]:4471"]})


def test_bootstrap_rejects_bad_addresses(sock: str, api: FakeAPI) -> None:
    result = run("bootstrap", "nohost", "--socket", sock)
    assert result.exit_code == 2
    assert "'nohost'" in result.output and "port" in result.output
    assert run("bootstrap", "h:0", "--socket", sock).exit_code == 2
    assert not [c for c in api.calls if c[0] == "bootstrap"]


def test_emit_one(sock: str, api: FakeAPI) -> None:
    result = run("emit", "--socket", sock, "--json", "--topic", "triage",
                 "--vector", "[0.1, 0.2, 0.3]", "--outcome", "admitted=true",
                 "-o", "age=42", "-o", "score=0.5", "-o", "ward=B=2", "-o", "x=nan",
                 "--n", "3", "--ttl", "600")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == f"{1:032x}"
    assert api.calls[-1] == ("emit", {
        "topic": "triage", "vector": [0.1, 0.2, 0.3],
        "outcome": {"admitted": True, "age": 42, "score": 0.5, "ward": "B=2", "x": "nan"},
        "n": 3, "ttl": 600,
    })
    table = run("emit", "--socket", sock, "-t", "t", "--vector", "[1,2,3]", "-o", "a=1")
    assert table.stdout.splitlines()[0].split() == ["id", f"{2:032x}"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--vector", "[0.1, oops]", "-o", "a=1"], "--vector"),
        (["--vector", '["a"]', "-o", "a=1"], "--vector"),
        (["--vector", "[]", "-o", "a=1"], "--vector"),
        (["--vector", "[1, 2]", "-o", "novalue"], "--outcome"),
        (["--vector", "[1, 2]", "-o", "a=1", "-o", "a=2"], "--outcome"),
        (["--vector", "[1, 2]"], "--outcome"),
        (["-o", "a=1"], "--vector"),
    ],
)
def test_emit_bad_arguments_are_usage_errors(
    sock: str, api: FakeAPI, args: list[str], named: str
) -> None:
    result = run("emit", "--socket", sock, "--topic", "t", *args)
    assert result.exit_code == 2
    assert named in result.output
    assert not api.calls  # nothing was sent


def test_daemon_refusal_is_one_line_and_exit_1(sock: str) -> None:
    result = run("emit", "--socket", sock, "-t", "t", "--vector", "[1, 2]", "-o", "a=1")
    assert result.exit_code == 1
    assert result.stderr == "error: invalid: vector: expected 3 dimensions, got 2\n"


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = '{"topic": "t", "vector": [1, 2, 3], "outcome": {"a": 1}}'


def test_emit_file_reports_each_rejected_line(sock: str, api: FakeAPI, tmp_path: Path) -> None:
    cases = write_lines(tmp_path / "cases.jsonl", [
        GOOD,                                                       # 1
        '{"topic": "t", "vector": [1, 2, 3], "outcome": ',          # 2 bad JSON
        '{"vector": [1, 2, 3], "outcome": {"a": 1}}',               # 3 no topic
        '{"topic": "t", "vector": [1, 2, 3], "outcome": {"b": 2}, "n": 5, "ttl": 60}',  # 4
        '{"topic": "t", "vector": [1, 2], "outcome": {"a": 1}}',    # 5 daemon: invalid
        "",                                                         # 6 blank: skipped
        "[1, 2, 3]",                                                # 7 not an object
        '{"topic": "t", "vector": [1, 2, 3], "outcome": {}, "colour": "red"}',  # 8
    ])
    result = run("emit", "--socket", sock, "--file", cases)
    assert result.exit_code == 1
    assert result.stdout == "accepted=2 rejected=5\n"
    rejected = result.stderr.splitlines()
    assert [ln.split(":")[0] for ln in rejected] == ["line 2", "line 3", "line 7", "line 8",
                                                     "line 5"]
    assert "not valid JSON" in rejected[0]
    assert "missing field 'topic'" in rejected[1]
    assert "must be a JSON object" in rejected[2]
    assert "unknown field 'colour'" in rejected[3]
    assert rejected[4] == "line 5: rejected: invalid: vector: expected 3 dimensions, got 2"
    # One bulk request carried the lines that passed the local checks.
    bulk = [c for c in api.calls if c[0] == "emit_many"]
    assert len(bulk) == 1 and len(bulk[0][1]["items"]) == 3
    assert [p["n"] for p in api.stored] == [1, 5]

    as_json = run("emit", "--socket", sock, "--file", cases, "--json")
    assert as_json.exit_code == 1
    summary = json.loads(as_json.stdout)
    assert (summary["accepted"], summary["rejected"]) == (2, 5)
    by_line = {r["line"]: r for r in summary["results"]}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 7, 8]
    assert by_line[1]["id"] == f"{3:032x}"
    assert by_line[5]["error"]["code"] == "invalid"


def test_emit_file_all_good_from_stdin(sock: str, api: FakeAPI) -> None:
    result = run("emit", "--socket", sock, "--file", "-", input="\n".join([GOOD] * 3))
    assert result.exit_code == 0, result.output
    assert result.stdout == "accepted=3 rejected=0\n"
    assert len(api.stored) == 3


def test_emit_file_argument_errors(sock: str, tmp_path: Path) -> None:
    missing = run("emit", "--socket", sock, "--file", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2 and "nope.jsonl" in missing.output
    both = run("emit", "--socket", sock, "--file", "-", "--topic", "t")
    assert both.exit_code == 2 and "--topic" in both.output


def test_query_json_is_exactly_matches_and_answer(sock: str, api: FakeAPI) -> None:
    for i in range(3):
        run("emit", "--socket", sock, "-t", "t", "--vector", "[1,2,3]", "-o", f"i={i}")
    result = run("query", "--socket", sock, "--json", "-t", "t", "--vector", "[1,2,3]",
                 "-k", "2")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert set(found) == {"matches", "answer"}
    assert len(found["matches"]) == 2
    assert set(found["matches"][0]) == {"id", "similarity", "outcome", "n", "origin", "kind"}
    assert api.calls[-1] == ("query", {"topic": "t", "vector": [1.0, 2.0, 3.0], "k": 2})

    table = run("query", "--socket", sock, "-t", "t", "--vector", "[1,2,3]").stdout
    lines = table.splitlines()
    assert lines[0].split() == ["SIMILARITY", "ID", "KIND", "N", "ORIGIN", "OUTCOME"]
    assert lines[1].split()[:2] == ["1.0000", f"{1:032x}"]
    assert lines[2].split()[0] == "0.9000"
    assert lines[1].index("1.0000") == lines[2].index("0.9000")  # aligned
    assert "answer" in lines and any(ln.split()[:2] == ["support", "3"] for ln in lines)
    assert any(ln.split() == ["admitted", "0.5", "3"] for ln in lines)


def test_query_file_json_lines(sock: str, tmp_path: Path) -> None:
    run("emit", "--socket", sock, "-t", "t", "--vector", "[1,2,3]", "-o", "a=1")
    queries = write_lines(tmp_path / "q.jsonl", [
        '{"topic": "t", "vector": [1, 2, 3], "k": 1}',
        '{"topic": "t"}',
        '{"topic": "none", "vector": [1, 2, 3]}',
    ])
    result = run("query", "--socket", sock, "--file", queries, "--json")
    assert result.exit_code == 1
    out = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert len(out) == 3
    assert len(out[0]["matches"]) == 1 and set(out[0]) == {"matches", "answer"}
    assert out[1] == {"line": 2, "error": {"code": "bad_request",
                                           "message": "missing field 'vector' for query"}}
    assert out[2]["matches"] == []
    assert result.stderr.startswith("line 2: bad_request:")


class FiniteWatchAPI(FakeAPI):
    """A watch that delivers two packets and then ends, as a stopping daemon does."""

    async def _events(self, topic: str) -> AsyncIterator[dict[str, Any]]:
        for i in range(2):
            yield {"id": f"{i:032x}", "topic": topic, "kind": "observation", "n": 1,
                   "outcome": {"i": i}, "created_ms": 1_700_000_000_000}

    def watch(self, *, topic: str, vector: list[float] | None = None  # type: ignore[override]
              ) -> AsyncIterator[dict[str, Any]]:
        return self._events(topic)


def test_watch_prints_events_until_the_stream_ends() -> None:
    with serving(FiniteWatchAPI()) as (path, _):
        result = run("watch", "--socket", str(path), "--topic", "w", "--json")
        table = run("watch", "--socket", str(path), "--topic", "w")
    assert result.exit_code == 1  # the daemon ended it: not a normal end
    events = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert [e["outcome"] for e in events] == [{"i": 0}, {"i": 1}]
    assert "the daemon ended the watch" in result.stderr
    assert table.stdout.splitlines()[0].split()[:4] == [
        "2023-11-14T22:13:20Z", "w", "observation", "n=1"]


def test_watch_exits_0_on_ctrl_c(api: FakeAPI) -> None:
    code = ("import sys, typer; from qisd.cli.client_cmd import register;"
            " app = typer.Typer(); register(app); app(sys.argv[1:])")
    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "watch", "--socket", str(path), "-t", "w"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            # Printed once the daemon acknowledged: from now on packets reach it.
            assert _readline(proc.stderr) == "watching topic 'w'; Ctrl-C to stop\n"
            pid = client.emit(topic="w", vector=[1, 2, 3], outcome={"a": 1})
            assert pid in _readline(proc.stdout)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(TIMEOUT) == 0
            assert proc.stderr is not None and proc.stderr.read() == ""
        finally:
            proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _readline(stream: IO[str] | None) -> str:
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], TIMEOUT)
    assert ready, "no output from qisd watch"
    return stream.readline()


@pytest.mark.parametrize("command", [["status"], ["query", "-t", "t", "--vector", "[1]"],
                                     ["watch", "-t", "t"]])
def test_daemon_not_running_is_one_line_and_exit_2(command: list[str]) -> None:
    with short_dir() as tmp:
        missing = str(tmp / "qisd.sock")
        result = run(*command, "--socket", missing)
        env_result = run(*command, env={"QISD_SOCKET": missing})
    for r in (result, env_result):
        assert r.exit_code == 2
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1
        assert missing in lines[0] and "qisd run" in lines[0]


def test_help_mentions_exit_status() -> None:
    result = run("status", "--help")
    assert result.exit_code == 0
    assert "2 bad arguments, or no daemon" in " ".join(result.stdout.split())
    assert "QISD_SOCKET" in result.stdout
