"""Who may use the control socket: the peer's kernel-reported credentials.

The socket file is mode 0660, so the filesystem already keeps others out; checking
``SO_PEERCRED`` as well keeps them out when an operator loosens the mode or the
directory by mistake. Allowed: root, the daemon's own uid, and members of the
daemon's group (primary or supplementary, as the user database says).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["PeerCredentials", "describe_policy", "groups_of_uid", "needs_group_lookup",
           "peer_allowed",
           "read_peer_credentials"]

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def read_peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials the kernel recorded for the peer of a connected Unix socket
    (at connect time, so a peer cannot change them later). Raises OSError."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def needs_group_lookup(cred: PeerCredentials, *, daemon_uid: int, daemon_gid: int) -> bool:
    """Whether the cheap checks are inconclusive and the user database must decide."""
    return cred.uid not in (0, daemon_uid) and cred.gid != daemon_gid


def peer_allowed(
    cred: PeerCredentials,
    *,
    daemon_uid: int,
    daemon_gid: int,
    peer_groups: Collection[int] = (),
) -> bool:
    """Root, the daemon's uid, or a member of its gid (``peer_groups``: the groups
    of the peer's user, from :func:`groups_of_uid`)."""
    if cred.uid in (0, daemon_uid) or cred.gid == daemon_gid:
        return True
    return daemon_gid in peer_groups


def groups_of_uid(uid: int) -> list[int]:
    """All groups of the user with ``uid`` per the user database (blocking: NSS may
    ask a directory server), or none if the uid has no entry."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(entry.pw_name, entry.pw_gid)


def describe_policy(daemon_uid: int, daemon_gid: int) -> str:
    """Who is allowed, in words, for the ``forbidden`` reply."""
    try:
        group = grp.getgrgid(daemon_gid).gr_name
    except KeyError:
        group = str(daemon_gid)
    return f"root, uid {daemon_uid} and members of group {group!r}"
