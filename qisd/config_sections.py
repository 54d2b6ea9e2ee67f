"""The sections of the configuration, one frozen dataclass per TOML table.

Field defaults *are* the embedded defaults, and the type of each default is the
type the key accepts (tuple meaning a list of strings). Every section checks its
values against :mod:`qisd.config_rules` on construction; :mod:`qisd.config`
assembles them into the one :class:`~qisd.config.Config` and loads them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from qisd.config_rules import (
    ConfigError,
    Invalid,
    accept,
    cross_problems,
    parse_hostport,
    parse_range,
)

__all__ = [
    "KEYS",
    "KINDS",
    "SECTIONS",
    "SECTION_NAMES",
    "ControlConfig",
    "DaemonConfig",
    "DhtConfig",
    "LogConfig",
    "MetricsConfig",
    "NodeConfig",
    "Section",
    "StoreConfig",
    "SynthesisConfig",
]


@dataclass(frozen=True)
class Section:
    """Base of the section dataclasses: validates (and normalises, e.g. lists to
    tuples, ints to floats) on construction, so a config built in code is held to
    the same rules as one loaded from a file."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        problems: list[str] = []
        values: dict[str, Any] = {}
        for f in fields(self):
            key = f"{self.section}.{f.name}"
            raw = getattr(self, f.name)
            try:
                value = accept(key, KINDS[key], raw, textual=False)
            except Invalid as exc:
                problems.append(exc.render(None))
                continue
            object.__setattr__(self, f.name, value)
            values[key] = value
        problems += cross_problems(values, lambda _key: None)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class NodeConfig(Section):
    """[node]: where this node keeps its state, listens and finds its swarm."""

    section: ClassVar[str] = "node"
    state_dir: str = ""
    listen: str = "0.0.0.0:4470"
    bootstrap: tuple[str, ...] = ()
    socket: str = ""
    manifest: str = ""

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def bootstrap_addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_hostport(peer) for peer in self.bootstrap)


@dataclass(frozen=True)
class MetricsConfig(Section):
    """[metrics]: the Prometheus HTTP endpoint."""

    section: ClassVar[str] = "metrics"
    listen: str = "127.0.0.1:9470"

    @property
    def address(self) -> tuple[str, int] | None:
        """The HTTP listen address, or None when metrics are ``off``."""
        return None if self.listen == "off" else parse_hostport(self.listen)


@dataclass(frozen=True)
class DhtConfig(Section):
    """[dht]: Kademlia parameters (k, alpha; paper 2.3) and the transport's limits."""

    section: ClassVar[str] = "dht"
    ksize: int = 20
    alpha: int = 3
    rpc_timeout: float = 2.0
    rpc_retries: int = 1
    max_outstanding: int = 4096
    rate_per_peer: float = 2000.0
    rate_burst: int = 4000
    rate_total: float = 50000.0
    refresh_interval: float = 3600.0
    republish_interval: float = 3600.0
    origin_republish_interval: float = 3600.0
    handoff_concurrency: int = 8
    max_peers_per_subnet: int = 2
    listen_ttl: float = 600.0
    max_listens_per_peer: int = 64


@dataclass(frozen=True)
class StoreConfig(Section):
    """[store]: capacity and fairness limits of the packet store."""

    section: ClassVar[str] = "store"
    max_packets: int = 1_000_000
    max_bytes: int = 1_073_741_824
    origin_quota: float = 0.25
    key_quota: int = 10_000
    expire_interval: float = 60.0
    cache_bytes: int = 33_554_432


@dataclass(frozen=True)
class SynthesisConfig(Section):
    """[synthesis]: the worker that turns delivered packets into syntheses."""

    section: ClassVar[str] = "synthesis"
    enabled: bool = True
    synthesizer: str = "cohort"
    min_cohort: int = 5
    similarity: float = 0.9
    interval: float = 2.0
    min_new: int = 1
    epsilon: float = 0.0
    #: Bounds of numeric outcome fields for the noise on means: "field=lo:hi" each.
    ranges: tuple[str, ...] = ()
    channel_size: int = 4096

    def range_map(self) -> dict[str, tuple[float, float]]:
        """``ranges`` as field -> (lo, hi) (checked when the config was loaded)."""
        return dict(parse_range(entry) for entry in self.ranges)


@dataclass(frozen=True)
class ControlConfig(Section):
    """[control]: the local API on the Unix socket."""

    section: ClassVar[str] = "control"
    socket_mode: str = "0660"
    max_request_bytes: int = 1_048_576
    #: Seconds a connection may wait between requests before it is closed (a watch
    #: is not idle); the client library reconnects on its next call.
    idle_timeout: float = 60.0

    @property
    def mode(self) -> int:
        """``socket_mode`` as permission bits for ``os.chmod``."""
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class LogConfig(Section):
    """[log]: level and rendering (see :mod:`qisd.logs`)."""

    section: ClassVar[str] = "log"
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class DaemonConfig(Section):
    """[daemon]: process lifecycle."""

    section: ClassVar[str] = "daemon"
    grace_period: float = 5.0


SECTIONS: tuple[type[Section], ...] = (
    NodeConfig,
    MetricsConfig,
    DhtConfig,
    StoreConfig,
    SynthesisConfig,
    ControlConfig,
    LogConfig,
    DaemonConfig,
)
#: The TOML table names, in file order.
SECTION_NAMES: tuple[str, ...] = tuple(cls.section for cls in SECTIONS)
#: Every dotted key, in file order.
KEYS: tuple[str, ...] = tuple(f"{cls.section}.{f.name}" for cls in SECTIONS for f in fields(cls))
#: The type of each key, from its default (tuple means a list of strings).
KINDS: dict[str, type] = {
    f"{cls.section}.{f.name}": type(f.default) for cls in SECTIONS for f in fields(cls)
}
