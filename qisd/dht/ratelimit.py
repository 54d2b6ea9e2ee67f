"""Inbound request rate limits: token buckets per source and in total (pure).

The caller passes the time, so the same code runs under trio's clock, a mock clock
or none at all; :func:`source_key` says whom a request counts against. The
per-source table is an LRU of bounded size: a flood from many addresses evicts old
entries (each new source starts with a full bucket) but cannot grow memory, and the
total bucket still caps the work all of them can cause.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from functools import lru_cache

#: IPv6 sources are counted per prefix of this length (one subscriber's network).
V6_SOURCE_PREFIX = 64


def source_key(addr: tuple[str, int]) -> Hashable:
    """Whom a request from ``addr`` counts against (rate limits, fair share).

    An IPv4 address by itself; an IPv6 address by its /64, since one host is
    usually given a whole /64 and could otherwise send from 2**64 "sources"; on
    loopback the address and port, since local swarms run many nodes on one IP.
    """
    ip = addr[0]
    if ":" not in ip:
        return addr if ip.startswith("127.") else ip
    key = _v6_key(ip)
    return addr if key is None else key


@lru_cache(maxsize=8192)
def _v6_key(ip: str) -> str | None:
    """The /64 of an IPv6 source (the IPv4 address if it is v4-mapped); None on loopback."""
    try:
        parsed = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    mapped = parsed.ipv4_mapped
    if mapped is not None:
        return None if mapped.is_loopback else str(mapped)
    if parsed.is_loopback:
        return None
    return str(ipaddress.IPv6Network((parsed, V6_SOURCE_PREFIX), strict=False))


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one token per admitted request."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests per second and bursts; a rate of 0 disables that limit."""

    per_source_rate: float = 2000.0
    per_source_burst: float = 4000.0
    total_rate: float = 50000.0
    total_burst: float = 100000.0
    max_sources: int = 4096

    def __post_init__(self) -> None:
        for name in ("per_source_rate", "per_source_burst", "total_rate", "total_burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"rate limits: {name} must be >= 0")
        if self.max_sources < 1:
            raise ValueError("rate limits: max_sources must be >= 1")


class RateLimiter:
    """Admit or refuse one inbound request; :meth:`check` returns the refusal reason."""

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self._total = TokenBucket(limits.total_rate, limits.total_burst, now)
        self._sources: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def check(self, source: Hashable, now: float) -> str | None:
        """None if admitted, else ``"rate_source"`` or ``"rate_total"``."""
        lim = self.limits
        if lim.per_source_rate > 0:
            bucket = self._sources.get(source)
            if bucket is None:
                bucket = TokenBucket(lim.per_source_rate, lim.per_source_burst, now)
                self._sources[source] = bucket
                if len(self._sources) > lim.max_sources:
                    self._sources.popitem(last=False)
            else:
                self._sources.move_to_end(source)
            if not bucket.take(now):
                return "rate_source"
        if lim.total_rate > 0 and not self._total.take(now):
            return "rate_total"
        return None

    def __len__(self) -> int:
        return len(self._sources)
