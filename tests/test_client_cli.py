"""The client commands of the ``qisd`` CLI against a real control socket.

The daemon side is the fake ControlAPI of ``test_control`` served in a background
thread; commands run through typer's CliRunner (stdout and stderr apart), and every
``--json`` output is parsed, not just printed. One test runs ``qisd watch`` in a
subprocess to see that Ctrl-C ends it cleanly.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import trio
import typer
from test_control import TIMEOUT, FakeAPI, serving, short_dir
from typer.testing import CliRunner

from qisd.cli.client_cmd import register
from qisd.control.client import Client
from qisd.control.errors import ControlError, DaemonNotRunning

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
    header, first, second = (ln.split() for ln in peers.stdout.splitlines())
    assert header == ["NODE_ID", "ADDRESS", "LAST_SEEN", "FAILURES"]
    assert first == ["cd" * 20, "10.0.0.2:4470", "1m", "ago", "0"]
    assert second == ["ef" * 20, "10.0.0.3:4470", "-", "2"]  # not heard from since start
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
    # Every JSON line names its input line, answered or not.
    assert len(out[0]["matches"]) == 1 and set(out[0]) == {"line", "matches", "answer"}
    assert out[0]["line"] == 1
    assert out[1] == {"line": 2, "error": {"code": "bad_request",
                                           "message": "missing field 'vector' for query"}}
    assert out[2]["matches"] == [] and out[2]["line"] == 3
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
    *events, end = [json.loads(ln) for ln in result.stdout.splitlines()]
    assert [e["outcome"] for e in events] == [{"i": 0}, {"i": 1}]
    assert "the daemon ended the watch" in result.stderr
    # With --json the end is also the last JSON line, so a script reading stdout sees it.
    assert end["error"]["code"] == "watch_ended"
    assert "the daemon ended the watch" in end["error"]["message"]
    assert table.stdout.splitlines()[0].split()[:4] == [
        "2023-11-14T22:13:20Z", "w", "observation", "n=1"]


def test_watch_exits_0_on_ctrl_c(api: FakeAPI) -> None:
    # SIGUSR1 dumps the watch's stacks (faulthandler): if it ever hangs, the failure
    # says where. SIGINT is set to raise KeyboardInterrupt as in a terminal: run in
    # the background of a non-interactive shell (as CI may), the test inherits it
    # ignored, and so would the watch.
    code = ("import faulthandler, signal, sys, typer; faulthandler.register(signal.SIGUSR1);"
            " signal.signal(signal.SIGINT, signal.default_int_handler);"
            " from qisd.cli.client_cmd import register;"
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
            try:
                status = proc.wait(3 * TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)
                time.sleep(1)
                proc.kill()
                assert proc.stderr is not None
                pytest.fail(f"watch did not exit on SIGINT; its stacks:\n{proc.stderr.read()}")
            assert status == 0
            assert proc.stderr is not None and proc.stderr.read() == ""
        finally:
            proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


class SlowEmitAPI(FakeAPI):
    """Each emit_many waits a moment before it stores, so a run is caught mid-way."""

    async def emit_many(self, *, items: list[dict[str, Any]]) -> dict[str, Any]:
        await trio.sleep(0.3)
        return await super().emit_many(items=items)


def test_emit_file_ctrl_c_still_prints_what_was_stored() -> None:
    """A real SIGINT mid-run: the summary comes with exit 130, every line before the
    first not sent is stored or unconfirmed, and every id it reports was stored."""
    code = ("import signal, sys, typer; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " from qisd.cli.client_cmd import register;"
            " app = typer.Typer(); register(app); app(sys.argv[1:])")
    lines = 5000  # five batches
    api = SlowEmitAPI()
    with serving(api) as (path, _):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "emit", "--socket", str(path), "--file", "-",
             "--json"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            out, err = "", ""
            assert proc.stdin is not None
            proc.stdin.write(_lines(lines))
            proc.stdin.close()
            proc.stdin = None  # written: communicate() below only reads
            deadline = time.monotonic() + 10 * TIMEOUT
            while not api.stored and time.monotonic() < deadline:
                time.sleep(0.01)
            assert api.stored, "no batch reached the daemon"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=3 * TIMEOUT)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    summary = json.loads(out)
    assert summary["error"] == {"code": "interrupted", "message": "stopped by Ctrl-C"}
    first_unsent = summary["not_sent_from"]
    assert 1000 < first_unsent <= lines
    by_line = {r["line"]: r for r in summary["results"]}
    assert sorted(by_line) == list(range(1, first_unsent))
    stored = {p["id"] for p in api.stored}
    accepted = [r["id"] for r in by_line.values() if "id" in r]
    assert len(accepted) == summary["accepted"] >= 1000 and set(accepted) <= stored
    assert all(r.get("unconfirmed") for r in by_line.values() if "id" not in r)
    assert f"line {first_unsent} and after: not sent" in err


def test_emit_file_ctrl_c_while_answers_are_recorded_counts_every_line_once(
    api: FakeAPI,
) -> None:
    """SIGINT lands while a batch's answers are recorded (batches of two; during the
    third line's): it is held back until the batch is recorded, so lines 3 and 4 are
    stored and said so, and line 5 is the first not sent."""
    code = ("import os, signal, sys, typer; signal.signal(signal.SIGINT,"
            " signal.default_int_handler); from qisd.cli import emit_file;"
            " emit_file.EMIT_BATCH_ITEMS = 2; real = emit_file._Tally.accept;"
            " calls = [];\n"
            "def accept(self, lineno, result):\n"
            "    calls.append(lineno)\n"
            "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGINT)\n"
            "    real(self, lineno, result)\n"
            "emit_file._Tally.accept = accept\n"
            "from qisd.cli.client_cmd import register\n"
            "app = typer.Typer(); register(app); app(sys.argv[1:])\n")
    with serving(api) as (path, _):
        proc = subprocess.run(
            [sys.executable, "-c", code, "emit", "--socket", str(path), "--file", "-",
             "--json"], input=_lines(5), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["accepted"], summary["unconfirmed"], summary["not_sent_from"]) == (4, 0, 5)
    assert [r["id"] for r in summary["results"]] == [p["id"] for p in api.stored]


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


# -- a --file run that stops part-way still accounts for every line ------------------


def _lines(n: int) -> str:
    return "\n".join([GOOD] * n) + "\n"


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from qisd.cli import emit_file

    monkeypatch.setattr(emit_file, "EMIT_BATCH_ITEMS", 2)


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, number: int, exc: Exception) -> None:
    """Client.emit_many works, except that call ``number`` raises ``exc``."""
    real = Client.emit_many
    count = {"calls": 0}

    def emit_many(self: Client, items: Any) -> list[dict[str, Any]]:
        count["calls"] += 1
        if count["calls"] == number:
            raise exc
        return real(self, items)

    monkeypatch.setattr(Client, "emit_many", emit_many)


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("exc", [
    ConnectionError("the daemon closed the control connection (c.sock)"),
    TimeoutError("no reply to emit_many within 30.0s from c.sock"),
])
def test_emit_file_stopped_by_the_connection_prints_the_summary_so_far(
    sock: str, api: FakeAPI, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    _fail_on_call(monkeypatch, 2, exc)
    lines = [GOOD, '{"x": 1}', GOOD, GOOD, GOOD, GOOD, GOOD]
    table = run("emit", "--socket", sock, "--file", "-", input="\n".join(lines))
    assert table.exit_code == 1
    ids = [p["id"] for p in api.stored]
    assert table.stdout.splitlines() == [
        "LINE  ID", f"   1  {ids[0]}", f"   3  {ids[1]}",
        "accepted=2 rejected=1 unconfirmed=2 not_sent_from=6",
    ]
    err = table.stderr.splitlines()
    assert err[0].startswith("line 2: rejected: bad_request:")
    assert err[1] == f"error: {exc}"
    assert err[2:] == ["lines 4-5: sent, but no answer came; they may or may not have"
                       " been stored", "line 6 and after: not sent"]

    _fail_on_call(monkeypatch, 2, exc)
    as_json = run("emit", "--socket", sock, "--file", "-", "--json", input="\n".join(lines))
    assert as_json.exit_code == 1
    summary = json.loads(as_json.stdout)
    code = "timeout" if isinstance(exc, TimeoutError) else "connection_lost"
    assert summary["error"] == {"code": code, "message": str(exc)}
    assert (summary["accepted"], summary["rejected"], summary["unconfirmed"],
            summary["not_sent_from"]) == (2, 1, 2, 6)
    by_line = {r["line"]: r for r in summary["results"]}
    assert sorted(by_line) == [1, 2, 3, 4, 5]
    assert by_line[1]["id"] == api.stored[2]["id"] and by_line[3]["id"] == api.stored[3]["id"]
    assert by_line[4]["unconfirmed"] is True and by_line[4]["error"]["code"] == code


@pytest.mark.usefixtures("small_batches")
def test_emit_file_whose_daemon_went_away_part_way_exits_1(
    sock: str, api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 2 says nothing was done; here the first batch was stored."""
    _fail_on_call(monkeypatch, 2, DaemonNotRunning(Path(sock), "no control socket"))
    result = run("emit", "--socket", sock, "--file", "-", "--json", input=_lines(5))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["accepted"], summary["not_sent_from"]) == (2, 3)
    assert summary["error"]["code"] == "not_running"


class StorageFullAPI(FakeAPI):
    """The disk fills after ``room`` packets: later items get storage_full each."""

    room = 3

    async def emit_many(self, *, items: list[dict[str, Any]]) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        for item in items:
            if len(self.stored) >= self.room:
                results.append({"error": {"code": "storage_full",
                                          "message": "the disk is full: /var/lib/qisd"}})
            else:
                results.append({"id": self._packet(**item)["id"]})
        return {"results": results}


class BrokenEmitAPI(FakeAPI):
    """emit_many fails with a bug on its second call (an ``internal`` reply; raised
    as such, so the server does not log a traceback into the captured stdout)."""

    async def emit_many(self, *, items: list[dict[str, Any]]) -> dict[str, Any]:
        if any(c[0] == "emit_many" for c in self.calls):
            raise ControlError("internal", "emit_many failed: RuntimeError: bug")
        return await super().emit_many(items=items)


@pytest.mark.usefixtures("small_batches")
def test_emit_file_stops_at_a_full_disk_and_says_where() -> None:
    api = StorageFullAPI()
    with serving(api) as (path, _):
        result = run("emit", "--socket", str(path), "--file", "-", "--json", input=_lines(9))
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    # Batches of two: lines 1-3 stored, 4 refused; line 5 was read, not sent.
    assert (summary["accepted"], summary["rejected"], summary["unconfirmed"],
            summary["not_sent_from"]) == (3, 1, 0, 5)
    assert summary["error"]["code"] == "storage_full"
    assert [r["line"] for r in summary["results"]] == [1, 2, 3, 4]
    assert summary["results"][3]["error"]["code"] == "storage_full"
    assert "line 5 and after: not sent" in result.stderr
    assert len(api.stored) == 3


@pytest.mark.usefixtures("small_batches")
def test_emit_file_internal_error_leaves_the_batch_unconfirmed() -> None:
    with serving(BrokenEmitAPI()) as (path, _):
        result = run("emit", "--socket", str(path), "--file", "-", input=_lines(5))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1] == (
        "accepted=2 rejected=0 unconfirmed=2 not_sent_from=5")
    assert "error: internal: emit_many failed: RuntimeError: bug" in result.stderr
    assert "lines 3-4: sent, but no answer came" in result.stderr


def test_emit_file_without_a_daemon_sends_nothing_and_exits_2() -> None:
    with short_dir() as tmp:
        result = run("emit", "--socket", str(tmp / "none.sock"), "--file", "-", "--json",
                     input=_lines(2))
    assert result.exit_code == 2
    summary = json.loads(result.stdout)
    assert (summary["accepted"], summary["not_sent_from"]) == (0, 1)
    assert summary["error"]["code"] == "not_running"


class BrokenQueryAPI(FakeAPI):
    async def query(self, *, topic: str, vector: list[float], k: int = 10) -> dict[str, Any]:
        if topic == "boom":
            raise ControlError("internal", "query failed: RuntimeError: bug")
        return await super().query(topic=topic, vector=vector, k=k)


def test_query_file_stopped_part_way_says_from_which_line() -> None:
    lines = ['{"topic": "t", "vector": [1, 2, 3]}', '{"topic": "boom", "vector": [1, 2, 3]}',
             '{"topic": "t", "vector": [1, 2, 3]}']
    with serving(BrokenQueryAPI()) as (path, _):
        result = run("query", "--socket", str(path), "--file", "-", "--json",
                     input="\n".join(lines))
        table = run("query", "--socket", str(path), "--file", "-", input="\n".join(lines))
    assert result.exit_code == 1
    first, end = (json.loads(ln) for ln in result.stdout.splitlines())
    assert first["line"] == 1 and "matches" in first
    assert end == {"error": {"code": "internal", "message": "query failed: RuntimeError: bug"},
                   "not_answered_from": 2}
    assert table.exit_code == 1
    assert table.stdout.startswith("line 1: t\n")
    assert table.stderr.splitlines() == ["error: internal: query failed: RuntimeError: bug",
                                         "line 2 and after: not answered"]


def test_file_runs_refuse_per_line_options(sock: str, api: FakeAPI) -> None:
    # Like --topic and --vector, -k belongs on each line: refused, not ignored.
    query = run("query", "--socket", sock, "--file", "-", "-k", "1", input=GOOD)
    assert query.exit_code == 2 and "-k" in query.output
    emit = run("emit", "--socket", sock, "--file", "-", "--n", "1", input=GOOD)
    assert emit.exit_code == 2 and "--n" in emit.output
    assert not api.calls


# -- bootstrap that reached nobody -------------------------------------------------


class LonelyAPI(FakeAPI):
    def __init__(self, failed: bool) -> None:
        super().__init__()
        self.failed = failed

    async def bootstrap(self, *, addresses: list[str]) -> dict[str, Any]:
        reply: dict[str, Any] = {"contacted": 0, "peers": 0}
        if self.failed:
            reply["failed"] = [{"address": a, "reason": "no answer within 5s"}
                               for a in addresses]
        return reply


@pytest.mark.parametrize("failed", [False, True])
def test_bootstrap_that_reached_no_peer_fails_naming_the_addresses(failed: bool) -> None:
    with serving(LonelyAPI(failed)) as (path, _):
        table = run("bootstrap", "10.0.0.5:4470", "nowhere.invalid:4470", "--socket", str(path))
        as_json = run("bootstrap", "10.0.0.5:4470", "--socket", str(path), "--json")
    assert table.exit_code == 1
    detail = " (no answer within 5s)" if failed else ""
    assert table.stderr == (f"error: joined no swarm through: 10.0.0.5:4470{detail},"
                            f" nowhere.invalid:4470{detail}\n")
    assert as_json.exit_code == 1
    out = json.loads(as_json.stdout)
    assert out["contacted"] == 0 and out["error"]["code"] == "unreachable"
    assert "10.0.0.5:4470" in out["error"]["message"]


class KnownPeersAPI(FakeAPI):
    """A node that already has peers: its join lookup reaches them whatever the
    addresses given did."""

    def __init__(self, dead: set[str]) -> None:
        super().__init__()
        self.dead = dead

    async def bootstrap(self, *, addresses: list[str]) -> dict[str, Any]:
        return {"contacted": 3, "peers": 3,
                "failed": [{"address": a, "reason": "no answer"} for a in addresses
                           if a in self.dead]}


def test_bootstrap_fails_when_no_address_given_answered_though_known_peers_did() -> None:
    with serving(KnownPeersAPI({"127.0.0.1:9", "127.0.0.1:10"})) as (path, _):
        none = run("bootstrap", "127.0.0.1:9", "127.0.0.1:10", "--socket", str(path), "--json")
        some = run("bootstrap", "127.0.0.1:9", "127.0.0.1:11", "--socket", str(path))
    assert none.exit_code == 1
    out = json.loads(none.stdout)
    assert out["contacted"] == 3 and out["error"]["code"] == "unreachable"
    assert "127.0.0.1:9 (no answer)" in out["error"]["message"]
    assert some.exit_code == 0
    assert some.stderr == "warning: 127.0.0.1:9: no answer\n"


# -- --socket paths that cannot be a control socket ------------------------------


def test_socket_paths_that_cannot_work_are_named(tmp_path: Path) -> None:
    long_path = "/tmp/" + "s" * 200 + ".sock"
    regular = tmp_path / "file"
    regular.write_text("")
    for socket_path, expected in [
        (long_path, f"too long for a Unix socket (210 bytes, at most 107): {long_path}"),
        (str(regular), f"{regular} is a regular file, not a control socket"),
        (str(tmp_path), f"{tmp_path} is a directory, not a control socket"),
    ]:
        result = run("status", "--socket", socket_path, "--json")
        assert result.exit_code == 2, socket_path
        assert expected in result.stderr and "qisd run" not in result.stderr
        assert json.loads(result.stdout)["error"]["code"] == "bad_socket"
    empty = run("status", "--socket", "")
    assert empty.exit_code == 2 and "--socket" in empty.output and "empty" in empty.output


# -- -o values ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), ("-7", -7), ("0", 0), ("0.5", 0.5), ("-0.5", -0.5), ("1e3", 1000.0),
    ("2.5E-1", 0.25), ("true", True), ("false", False),
    ("02139", "02139"), ("1_000", "1_000"), ("+1", "+1"), (".5", ".5"), ("5.", "5."),
    ("1e400", "1e400"), ("nan", "nan"), ("inf", "inf"), ("0x10", "0x10"), (" 1", " 1"),
    ("True", "True"), ("null", "null"), ("", ""),
    ('"02139"', "02139"), ('"true"', "true"), ('"a=b"', "a=b"), ('""', ""),
])
def test_outcome_values_follow_the_documented_rules(text: str, value: Any) -> None:
    from qisd.cli.client_cmd import parse_outcome

    parsed = parse_outcome([f"k={text}"])["k"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ['"open', '"a" "b"', '"1" x'])
def test_a_quoted_outcome_value_must_be_one_json_string(text: str) -> None:
    from qisd.cli.client_cmd import parse_outcome

    with pytest.raises(typer.BadParameter, match="one JSON string"):
        parse_outcome([f"k={text}"])


def test_outcome_rules_are_in_the_help() -> None:
    text = " ".join(run("emit", "--help").stdout.split())
    assert "plain JSON number" in text and "02139" in text and "JSON string" in text


# -- --json errors ---------------------------------------------------------------------


def test_json_errors_are_also_json_on_stdout(sock: str) -> None:
    refused = run("emit", "--socket", sock, "--json", "-t", "t", "--vector", "[1, 2]",
                  "-o", "a=1")
    assert refused.exit_code == 1
    assert json.loads(refused.stdout) == {"error": {
        "code": "invalid", "message": "vector: expected 3 dimensions, got 2"}}
    assert refused.stderr == "error: invalid: vector: expected 3 dimensions, got 2\n"

    usage = run("query", "--socket", sock, "--json", "-t", "t", "--vector", "[1, oops]")
    assert usage.exit_code == 2
    error = json.loads(usage.stdout)["error"]
    assert error["code"] == "usage" and "--vector" in error["message"]

    with short_dir() as tmp:
        missing = run("status", "--socket", str(tmp / "none.sock"), "--json")
    assert missing.exit_code == 2
    assert json.loads(missing.stdout)["error"]["code"] == "not_running"


@pytest.mark.parametrize("args", [
    ["emit", "-t", "t", "--vector", "[1]", "-o", "a=1", "--n", "0"],
    ["query", "-t", "t", "--vector", "[1]", "-k", "0"],
    ["packets", "--limit", "0"],
    ["bootstrap"],
    ["status", "--bogus"],
], ids=["range", "k", "limit", "missing", "unknown"])
def test_argument_errors_found_before_the_command_runs_are_json_too(
    sock: str, args: list[str]
) -> None:
    """Errors click finds while parsing (ranges, missing arguments, unknown options)
    print a JSON error with --json, as those the command finds itself do."""
    result = run(*args, "--socket", sock, "--json")
    assert result.exit_code == 2
    (line,) = result.stdout.splitlines()
    error = json.loads(line)["error"]
    assert error["code"] == "usage" and error["message"]
    assert "Usage:" in result.stderr
    plain = run(*args, "--socket", sock)
    assert plain.exit_code == 2 and plain.stdout == ""


def test_config_show_json_names_config_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    from qisd.cli import app

    monkeypatch.setenv("QISD_DHT_KSIZE", "abc")
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "invalid_config" and "QISD_DHT_KSIZE" in error["message"]
    assert "QISD_DHT_KSIZE" in result.stderr


# -- a reader that stops reading ends the output quietly ------------------------------

_CLI = ("import sys, typer; from qisd.cli.client_cmd import register;"
        " app = typer.Typer(); register(app); app(sys.argv[1:])")


@pytest.mark.parametrize("command", [
    ["-c", _CLI, "status", "--json"], ["-c", _CLI, "packets"], ["-m", "qisd", "config", "show"],
])
def test_closed_stdout_is_a_quiet_end(sock: str, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QISD_")}
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, *command], stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=TIMEOUT, env={**env, "QISD_SOCKET": sock},
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


class WatchedAPI(FakeAPI):
    """Says when a watch has subscribed (--json prints no "watching" line to wait for)."""

    def __init__(self) -> None:
        super().__init__()
        self.watching = threading.Event()

    @asynccontextmanager
    async def watch(self, *, topic: str, vector: list[float] | None = None
                    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        async with super().watch(topic=topic, vector=vector) as events:
            self.watching.set()
            yield events


def test_watch_piped_to_head_ends_quietly() -> None:
    api = WatchedAPI()
    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLI, "watch", "--socket", str(path), "-t", "w", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert api.watching.wait(TIMEOUT)
            client.emit(topic="w", vector=[1, 2, 3], outcome={"a": 1})
            assert json.loads(_readline(proc.stdout))["topic"] == "w"
            assert proc.stdout is not None
            proc.stdout.close()  # as `head -1` does once it has its line
            client.emit(topic="w", vector=[1, 2, 3], outcome={"a": 2})
            assert proc.wait(TIMEOUT) == 0
            assert proc.stderr is not None and proc.stderr.read() == ""
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def test_query_notes_and_missed_watch_packets_are_shown() -> None:
    from qisd.cli import render

    text = render.render_query({"matches": [], "answer": {},
                                "notes": ["2 packets of another dimension left out"]})
    assert text.splitlines()[-1] == "note: 2 packets of another dimension left out"
    line = render.render_event({"id": "ab", "topic": "t", "missed": 3, "outcome": {"a": 1}})
    assert "missed=3" in line.split("  ")


class FailingReader:
    """Input whose third line cannot be read (a disk error, a dropped NFS mount)."""

    def __iter__(self) -> Iterator[bytes]:
        yield (GOOD + "\n").encode()
        yield (GOOD + "\n").encode()
        raise OSError(5, "Input/output error")


def test_emit_file_that_cannot_be_read_to_the_end_sends_what_it_read(
    api: FakeAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    from qisd.cli.emit_file import emit_file

    with serving(api) as (path, _), Client(path, timeout=TIMEOUT) as client:
        status = emit_file(client, FailingReader(), True)  # type: ignore[arg-type]
    assert status == 1 and len(api.stored) == 2
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["accepted"], summary["not_sent_from"]) == (2, 3)
    assert summary["error"] == {"code": "read_error", "message":
                                "cannot read the input after line 2: Input/output error"}
    assert "line 3 and after: not sent" in err


def test_packet_text_cannot_forge_lines_or_drive_the_terminal() -> None:
    """Outcome values come from any member of the swarm: shown escaped in tables."""
    from qisd.cli import render

    hostile = "\x1b[2J\x1b[31mRED\r\nFAKE LINE\x00"
    packet = {"id": "ab" * 16, "topic": "t", "kind": "observation", "n": 1,
              "origin": "cd" * 32, "created_ms": 1_700_000_000_000,
              "outcome": {"note": hostile, "ward": "réa"}}
    query = {"matches": [{**packet, "similarity": 0.9}],
             "answer": {"fields": {"note": {"type": "categorical",
                                            "probabilities": {hostile: 1.0}}}}}
    for text in (render.render_packets({"packets": [packet]}), render.render_query(query),
                 render.render_event(packet)):
        assert not any(ch in text for ch in "\x1b\r\x00")
        assert "FAKE LINE" in text and "\\x0d\\x0aFAKE LINE" in text
        assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert "ward=réa" in render.render_packets({"packets": [packet]})  # printable: as is


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("command", [["status", "--json"], ["config", "show"], ["--help"],
                                     ["identity", "--state-dir", "{tmp}", "--json"]])
def test_output_to_a_full_disk_is_one_error_line(command: list[str], tmp_path: Path) -> None:
    """Not a traceback (nor two: the JSON error written to the same full stdout)."""
    args = [a.replace("{tmp}", str(tmp_path / "st")) for a in command]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "qisd", *args], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "QISD_SOCKET": str(tmp_path / "none.sock")})
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "error: cannot write the output: No space left on device")
    assert "Traceback" not in proc.stderr
