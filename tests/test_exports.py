"""The public surface is deliberate: this list changes only on purpose."""

from __future__ import annotations

import qisd

PUBLIC = {
    "DEFAULT_MANIFEST", "LSH", "AsyncClient", "Client", "ControlError", "ControlSocketError",
    "DaemonNotRunning",
    "Identity", "Manifest", "OutcomePacket", "PacketError", "Sketch", "__version__",
    "create_packet", "decode_packet", "keys_for", "make_sketch", "probe_keys",
}


def test_public_names_are_pinned() -> None:
    assert set(qisd.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(qisd, name) is not None


def test_client_errors_are_importable_from_the_top() -> None:
    """An application catches what :class:`qisd.Client` raises without reaching inside."""
    from qisd.control import errors

    assert qisd.ControlError is errors.ControlError
    assert qisd.ControlSocketError is errors.ControlSocketError
    assert qisd.DaemonNotRunning is errors.DaemonNotRunning


def test_version_matches_the_distribution() -> None:
    from importlib.metadata import version

    assert qisd.__version__ == version("qisd")
