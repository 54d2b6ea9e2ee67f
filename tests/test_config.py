"""Config layering and validation, default paths, and log rendering.

Every test passes its own ``env`` mapping, so nothing here depends on (or changes)
the environment the suite runs in.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest
import structlog

from qisd import paths
from qisd.config import (
    DEFAULT_CONFIG_TOML,
    ENV_ALIASES,
    KEYS,
    NON_CONFIG_ENV,
    Config,
    ConfigError,
    DhtConfig,
    NodeConfig,
    SynthesisConfig,
    env_var_name,
    find_config_file,
    load_config,
    parse_hostport,
    to_dict,
    to_toml,
)
from qisd.logs import configure_logging, get_logger

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "config" / "qisd.toml"


def write(tmp_path: Path, text: str, name: str = "qisd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return list(exc.value.problems)


# --- defaults and the sample file ------------------------------------------------


def test_no_file_no_env_gives_embedded_defaults() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.source_file is None
    assert dict(config.sources) == {}
    assert config.dht.ksize == 20 and config.node.listen == "0.0.0.0:4470"


def test_default_toml_loads_back_to_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, DEFAULT_CONFIG_TOML), env={}) == Config()


def test_sample_config_equals_embedded_defaults() -> None:
    config = load_config(SAMPLE, env={})
    assert config == Config()
    assert config.source_file == SAMPLE


def test_sample_config_lists_every_key_with_a_comment() -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    listed = {f"{section}.{key}" for section, table in data.items() for key in table}
    assert listed == set(KEYS)
    # Each key line is directly preceded by a comment explaining it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_env_names_are_unique_and_aliases_point_at_keys() -> None:
    long_names = {env_var_name(key) for key in KEYS}
    assert len(long_names) == len(KEYS)
    assert not long_names & set(ENV_ALIASES)
    assert not (long_names | set(ENV_ALIASES)) & NON_CONFIG_ENV
    assert set(ENV_ALIASES.values()) <= set(KEYS)
    assert env_var_name("dht.rpc_timeout") == "QISD_DHT_RPC_TIMEOUT"


# --- layering ---------------------------------------------------------------------


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[node]\nlisten = "127.0.0.1:1000"\nbootstrap = ["a.example:1"]\n'
        "[dht]\nksize = 10\nalpha = 2\nrpc_timeout = 1\n",
    )
    env = {"QISD_LISTEN": "127.0.0.1:2000", "QISD_DHT_KSIZE": "12", "PATH": "/bin"}
    config = load_config(path, env=env, overrides={"dht.ksize": 14, "node.socket": None})
    assert config.node.listen == "127.0.0.1:2000"
    assert config.node.bootstrap == ("a.example:1",)
    assert config.dht.ksize == 14
    assert config.dht.alpha == 2
    # A TOML integer serves where a float is expected.
    assert config.dht.rpc_timeout == 1.0 and isinstance(config.dht.rpc_timeout, float)
    assert config.source_of("node.listen") == "QISD_LISTEN"
    assert config.source_of("node.bootstrap") == str(path)
    assert config.source_of("dht.ksize") == "--dht-ksize"
    assert config.source_of("node.socket") == "default"
    assert config.sources["dht.alpha"].kind == "file"


def test_env_values_are_parsed_by_type() -> None:
    env = {
        "QISD_BOOTSTRAP": " a:1 , [::1]:2,,",
        "QISD_SYNTHESIS_ENABLED": "no",
        "QISD_STORE_ORIGIN_QUOTA": "0.5",
        "QISD_DHT_RATE_TOTAL": "100",
        "QISD_LOG_LEVEL": "DEBUG",
        "QISD_METRICS": "off",
    }
    config = load_config(env=env)
    assert config.node.bootstrap == ("a:1", "[::1]:2")
    assert config.node.bootstrap_addresses == (("a", 1), ("::1", 2))
    assert config.synthesis.enabled is False
    assert config.store.origin_quota == 0.5
    assert config.dht.rate_total == 100.0
    assert config.log.level == "debug"
    assert config.metrics.address is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("No", False)],
)
def test_env_booleans(text: str, expected: bool) -> None:
    assert load_config(env={"QISD_SYNTHESIS_ENABLED": text}).synthesis.enabled is expected


def test_string_overrides_are_parsed_like_env() -> None:
    config = load_config(env={}, overrides={"dht.alpha": "5", "node.bootstrap": ["h:1"]})
    assert config.dht.alpha == 5
    assert config.node.bootstrap == ("h:1",)
    assert config.source_of("node.bootstrap") == "--bootstrap"


def test_qisd_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[dht]\nksize = 7\n")
    config = load_config(env={"QISD_CONFIG": str(path)})
    assert config.dht.ksize == 7
    assert config.source_file == path
    # An explicit path wins over QISD_CONFIG.
    other = write(tmp_path, "[dht]\nksize = 8\n", "other.toml")
    assert load_config(other, env={"QISD_CONFIG": str(path)}).dht.ksize == 8


def test_systemd_configuration_directory_is_the_default_file(tmp_path: Path) -> None:
    env = {"CONFIGURATION_DIRECTORY": str(tmp_path)}
    assert find_config_file(None, env) is None
    path = write(tmp_path, "[dht]\nalpha = 4\n")
    assert find_config_file(None, env) == path
    assert load_config(env=env).dht.alpha == 4


def test_relative_paths_in_file_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nstate_dir = "state"\nmanifest = "~/swarm.toml"\n')
    config = load_config(path, env={"HOME": "/home/op"})
    assert config.node.state_dir == str(tmp_path / "state")
    assert config.node.manifest == "/home/op/swarm.toml"
    assert config.resolved_state_dir() == tmp_path / "state"
    # And the effective TOML, loaded from elsewhere, means the same paths.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = load_config(write(elsewhere, to_toml(config)), env={})
    assert again == config


def test_to_toml_round_trips_awkward_values(tmp_path: Path) -> None:
    awkward = 'dir "with" \\ back\tslash\x7f and ünïcode'
    config = load_config(
        env={},
        overrides={
            "node.state_dir": "/" + awkward,
            "node.bootstrap": ["h:1", "[fe80::1]:2"],
            "synthesis.epsilon": 1e-5,
            "store.max_bytes": 10**15,
            "synthesis.enabled": False,
        },
    )
    text = to_toml(config, annotate=True)
    assert "# from --state-dir" in text
    assert load_config(write(tmp_path, text), env={}) == config
    assert json.loads(json.dumps(to_dict(config)))["node"]["bootstrap"] == ["h:1", "[fe80::1]:2"]


# --- errors -----------------------------------------------------------------------


def test_unknown_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nlisen = "0.0.0.0:1"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    [problem] = problems_of(exc)
    assert str(path) in problem
    assert "unknown key node.lisen" in problem
    assert "did you mean node.listen?" in problem


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[nodes]\nlisten = 1\n", "unknown section nodes (did you mean node?)"),
        ("ksize = 3\n", "unknown key ksize (keys belong in a section"),
        ("node = 3\n", "node: expected a table [node]"),
        ("[dht.extra]\nx = 1\n", "unknown key dht.extra"),
        ("[dht\n", "invalid TOML"),
    ],
)
def test_file_structure_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    assert needle in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(env={"QISD_CONFIG": str(tmp_path / "gone.toml")})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, env={})
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"[node]\nstate_dir = '\xff'\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(binary, env={})
    # A byte-order mark and CRLF line ends (as some editors save) are read as TOML.
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbf[node]\r\nlisten = "127.0.0.1:0"\r\n')
    assert load_config(bom, env={}).node.listen == "127.0.0.1:0"


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('[dht]\nksize = "20"', "dht.ksize", "an integer from 1 to 64"),
        ("[dht]\nksize = 0", "dht.ksize", "an integer from 1 to 64"),
        ("[dht]\nksize = 2.0", "dht.ksize", "an integer"),
        ("[dht]\nalpha = true", "dht.alpha", "an integer"),
        ("[dht]\nrpc_timeout = 0", "dht.rpc_timeout", "seconds > 0"),
        ("[dht]\nrpc_timeout = inf", "dht.rpc_timeout", "seconds > 0"),
        ("[dht]\nrpc_retries = 11", "dht.rpc_retries", "from 0 to 10"),
        ("[store]\norigin_quota = 1.5", "store.origin_quota", "fraction"),
        ("[synthesis]\nenabled = 1", "synthesis.enabled", "true or false"),
        ("[synthesis]\nsimilarity = -0.1", "synthesis.similarity", "from 0 to 1"),
        ('[synthesis]\nsynthesizer = ""', "synthesis.synthesizer", "entry point name"),
        ("[control]\nsocket_mode = 0o660", "control.socket_mode", "octal mode string"),
        ('[control]\nsocket_mode = "0999"', "control.socket_mode", "octal mode string"),
        ('[log]\nlevel = "loud"', "log.level", "one of debug, info"),
        ('[log]\nformat = "xml"', "log.format", "auto, json, console"),
        ("[daemon]\ngrace_period = -1", "daemon.grace_period", ">= 0"),
        ('[node]\nbootstrap = "a:1"', "node.bootstrap", "a list of peer addresses"),
        ('[node]\nbootstrap = ["a:0"]', "node.bootstrap", "port cannot be 0"),
        ('[node]\nlisten = "::1:4470"', "node.listen", "needs brackets"),
        ("[node]\nstate_dir = 5", "node.state_dir", "a directory path"),
        ('[metrics]\nlisten = "on"', "metrics.listen", "or 'off'"),
    ],
)
def test_bad_values_name_key_file_and_expectation(
    tmp_path: Path, line: str, key: str, expected: str
) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    [problem] = problems_of(exc)
    assert problem.startswith(f"{path}: {key}: expected ")
    assert expected in problem


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"QISD_DHT_KSIZE": "many"})
    [problem] = problems_of(exc)
    assert problem.startswith("QISD_DHT_KSIZE: dht.ksize: expected an integer")
    assert '"many"' in problem


def test_bad_override_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--listen: node\.listen: expected"):
        load_config(env={}, overrides={"node.listen": "nowhere"})
    with pytest.raises(ConfigError, match=r"unknown config key node\.nope"):
        load_config(env={}, overrides={"node.nope": 1})


def test_unknown_qisd_env_is_an_error_but_documented_ones_are_not() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={"QISD_LISEN": "x", "QISD_LONG_FUZZ": "1", "QISD_CONFIG": ""})
    assert problems_of(exc) == [
        "QISD_LISEN: unknown QISD_ environment variable (did you mean QISD_LISTEN?)"
    ]
    assert load_config(env={"QISD_LONG_FUZZ": "1", "OTHER_THING": "x"}) == Config()


def test_alias_and_long_name_must_agree() -> None:
    same = load_config(env={"QISD_LISTEN": "h:1", "QISD_NODE_LISTEN": "h:1"})
    assert same.node.listen == "h:1"
    with pytest.raises(ConfigError, match=r"QISD_LISTEN and QISD_NODE_LISTEN both set"):
        load_config(env={"QISD_LISTEN": "h:1", "QISD_NODE_LISTEN": "h:2"})


def test_alpha_may_not_exceed_ksize_and_names_the_source(tmp_path: Path) -> None:
    path = write(tmp_path, "[dht]\nalpha = 8\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"QISD_DHT_KSIZE": "4"})
    assert problems_of(exc) == [f"{path}: dht.alpha: expected at most dht.ksize (4), got 8"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nlisen = 1\nlisten = "x"\n[dht]\nksize = -1\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"QISD_STORE_KEY_QUOTA": "0", "QISD_NOPE": "1"})
    joined = "\n".join(problems_of(exc))
    for needle in ("node.lisen", "node.listen", "dht.ksize", "QISD_STORE_KEY_QUOTA", "QISD_NOPE"):
        assert needle in joined
    assert len(problems_of(exc)) == 5
    assert str(exc.value) == joined


# --- sections built in code ---------------------------------------------------------


def test_sections_validate_and_normalise_when_built_in_code() -> None:
    node = NodeConfig(bootstrap=["a:1"])  # type: ignore[arg-type]
    assert node.bootstrap == ("a:1",)
    assert DhtConfig(rpc_timeout=1).rpc_timeout == 1.0
    with pytest.raises(ConfigError, match=r"^dht\.ksize: expected an integer from 1 to 64"):
        DhtConfig(ksize=0)
    with pytest.raises(ConfigError, match=r"dht\.alpha: expected at most dht\.ksize"):
        DhtConfig(ksize=2, alpha=3)
    with pytest.raises(FrozenInstanceError):
        SynthesisConfig().enabled = False  # type: ignore[misc]
    assert Config().control.mode == 0o660
    assert Config().node.listen_address == ("0.0.0.0", 4470)
    assert Config().metrics.address == ("127.0.0.1", 9470)


def test_every_key_has_a_type_matching_its_default() -> None:
    config = Config()
    for key in KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        assert type(value) in (bool, int, float, str, tuple), key
    assert (
        len(KEYS) == len(set(KEYS)) == sum(len(fields(getattr(config, s))) for s in to_dict(config))
    )


# --- host:port ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:4470", ("0.0.0.0", 4470)),
        ("localhost:0", ("localhost", 0)),
        ("node-1.example.org.:65535", ("node-1.example.org.", 65535)),
        ("[::]:4470", ("::", 4470)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        ("qisd_node:9", ("qisd_node", 9)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4470", "missing ':port'"),
        ("host:", "missing port"),
        (":4470", "host is empty"),
        ("host:http", "not a number"),
        ("host:65536", "above 65535"),
        ("host:٣", "not a number"),
        ("::1:4470", "needs brackets"),
        ("[::1:4470", "missing ']'"),
        ("[::1]4470", "missing ':port'"),
        ("[nothex]:1", "not an IPv6 address"),
        ("300.1.1.1:1", "not a valid IPv4 address"),
        ("bad host:1", "not a host name"),
        ("-lead.example:1", "not a host name"),
    ],
)
def test_parse_hostport_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hostport(text)


# --- default paths ------------------------------------------------------------------


def test_state_dir_precedence() -> None:
    env = {"HOME": "/home/op"}
    assert paths.default_state_dir(env) == Path("/home/op/.local/state/qisd")
    env["XDG_STATE_HOME"] = "relative/ignored"
    assert paths.default_state_dir(env) == Path("/home/op/.local/state/qisd")
    env["XDG_STATE_HOME"] = "/xdg/state"
    assert paths.default_state_dir(env) == Path("/xdg/state/qisd")
    env["STATE_DIRECTORY"] = "/var/lib/qisd:/var/lib/other"
    assert paths.default_state_dir(env) == Path("/var/lib/qisd")


def test_socket_precedence() -> None:
    env = {"HOME": "/home/op"}
    assert paths.default_runtime_dir(env) is None
    assert paths.default_socket_path(env) == Path("/home/op/.local/state/qisd/qisd.sock")
    assert paths.default_socket_path(env, state_dir=Path("/s")) == Path("/s/qisd.sock")
    env["XDG_RUNTIME_DIR"] = "/run/user/1000"
    assert paths.default_socket_path(env) == Path("/run/user/1000/qisd/qisd.sock")
    env["RUNTIME_DIRECTORY"] = "/run/qisd"
    assert paths.default_socket_path(env, state_dir=Path("/s")) == Path("/run/qisd/qisd.sock")


def test_config_resolves_paths_against_its_load_environment() -> None:
    config = load_config(env={"HOME": "/home/op", "QISD_STATE_DIR": "/srv/qisd"})
    assert config.resolved_state_dir() == Path("/srv/qisd")
    assert config.resolved_socket() == Path("/srv/qisd/qisd.sock")
    systemd = load_config(env={"STATE_DIRECTORY": "/var/lib/qisd", "RUNTIME_DIRECTORY": "/run/q"})
    assert systemd.resolved_state_dir() == Path("/var/lib/qisd")
    assert systemd.resolved_socket() == Path("/run/q/qisd.sock")
    explicit = load_config(env={"QISD_SOCKET": "/tmp/x.sock", "RUNTIME_DIRECTORY": "/run/q"})
    assert explicit.resolved_socket() == Path("/tmp/x.sock")


def test_too_long_socket_path_is_a_config_error() -> None:
    config = load_config(env={"QISD_STATE_DIR": "/" + "d" * 120})
    with pytest.raises(ConfigError, match=r"QISD_STATE_DIR: node\.socket: .* at most 107"):
        config.resolved_socket()


# --- logging ------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    log = get_logger("qisd.test", node="n1")
    log.info("stored", key=b"\x01\x02", path=Path("/x"))
    log.debug("not shown")
    logging.getLogger("thirdparty").warning("plain %s", "stdlib")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["stored", "plain stdlib", "failed"]
    assert [r["level"] for r in records] == ["info", "warning", "error"]
    first = records[0]
    assert first["node"] == "n1" and first["key"] == "0102" and first["path"] == "/x"
    assert first["logger"] == "qisd.test" and records[1]["logger"] == "thirdparty"
    assert first["timestamp"].endswith("Z")
    assert "RuntimeError: boom" in records[2]["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_console_rendering_on_a_tty() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty, os.fdopen(master, "rb", buffering=0) as reader:
        configure_logging("debug", "auto", stream=tty)
        get_logger("qisd.test").debug("hello", peers=3)
        tty.flush()
        raw = reader.read(4096).decode()
    out = re.sub(r"\x1b\[[0-9;]*m", "", raw)  # colours, since this is a terminal
    assert raw != out
    assert "[debug" in out and "hello" in out and "peers=3" in out
    assert not out.lstrip().startswith("{")


@pytest.mark.usefixtures("restore_logging")
def test_forced_formats_and_reconfiguration() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("warning", "console", stream=first)
    configure_logging("info", "json", stream=second)
    get_logger("qisd.test").info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["event"] == "once"
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


def test_synthesis_ranges_reach_the_synthesizer(tmp_path: Path) -> None:
    """[synthesis] ranges scale the noise on means; they come from the file or the
    environment and each bad entry is named."""
    from qisd.manifest import DEFAULT_MANIFEST
    from qisd.synthesis import CohortSynthesizer, SynthesizerSettings

    path = write(tmp_path, '[synthesis]\nepsilon = 1.0\n'
                           'ranges = ["los_days=0:365", "age = -1:120.5"]\n')
    config = load_config(path, env={})
    assert config.synthesis.range_map() == {"los_days": (0.0, 365.0), "age": (-1.0, 120.5)}
    settings = SynthesizerSettings.from_config(config.synthesis, DEFAULT_MANIFEST, salt=b"s")
    assert settings.options == {"ranges": config.synthesis.range_map()}
    assert CohortSynthesizer(settings).ranges == {"los_days": (0.0, 365.0), "age": (-1.0, 120.5)}
    env = load_config(env={"QISD_SYNTHESIS_RANGES": "a=0:1, b=2:3"})
    assert env.synthesis.range_map() == {"a": (0.0, 1.0), "b": (2.0, 3.0)}
    plain = SynthesizerSettings.from_config(load_config(env={}).synthesis, DEFAULT_MANIFEST,
                                            salt=b"s")
    assert plain.options == {}  # none given: a plug-in without the option still loads
    for entry, detail in (("los", "is not 'field=lo:hi'"), ("x=1:a", "must be numbers"),
                          ("x=5:1", "lo <= hi"), ("x=0:inf", "finite"),
                          ("x=-1e308:1e308", "hi - lo too")):
        with pytest.raises(ConfigError, match=f"synthesis.ranges: .*{re.escape(detail)}"):
            load_config(env={"QISD_SYNTHESIS_RANGES": entry})
    with pytest.raises(ConfigError, match="'x' given twice"):
        load_config(env={"QISD_SYNTHESIS_RANGES": "x=0:1,x=0:2"})
