"""Suite-wide: tests marked ``ipv6`` are skipped, with the reason, on machines
without an IPv6 loopback."""

from __future__ import annotations

import functools
import socket

import pytest


@functools.cache
def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("ipv6") is not None and not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
