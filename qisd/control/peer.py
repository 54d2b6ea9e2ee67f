"""Who may use the control socket: the peer's kernel-reported credentials.

The socket file is mode 0660, so the filesystem already keeps others out; checking
``SO_PEERCRED`` as well keeps them out when an operator loosens the mode or the
directory by mistake. Allowed: root, the daemon's own uid, and members of the
daemon's group: primary or supplementary, as the kernel recorded them at connect
(``SO_PEERGROUPS``) or, where it cannot say, as the user database says.

The kernel's word comes first because a sandboxed daemon (systemd's
``PrivateUsers=yes``) sees every user but root and its own as uid 65534, whose
database entry says nothing of the real user's groups; the daemon's group, though,
is mapped into its namespace, so a member's connection carries it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import grp
import os
import pwd
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["PeerCredentials", "describe_policy", "groups_of_uid", "needs_group_lookup",
           "peer_allowed", "read_peer_credentials", "read_peer_groups"]

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
#: Linux's SO_PEERGROUPS (since 4.13; Python's socket module does not name it).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Bytes asked for first (256 groups); the kernel says how many more it needs.
_GROUPS_BUF = 1024
_MAX_GROUPS_BUF = 65536 * 4  # NGROUPS_MAX gid_t values


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


def read_peer_groups(sock: socket.socket) -> list[int]:
    """The supplementary groups the kernel recorded for the peer at connect time;
    empty where it cannot say (not Linux, an old kernel).

    Through libc's ``getsockopt``: Python's caps its buffer at 1024 bytes (256
    groups), and users of directory services are often in more; on ERANGE the
    kernel says the size it needs, and that is asked for once.
    """
    libc = _libc()
    if libc is None:
        return []
    size = ctypes.c_uint32(_GROUPS_BUF)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size.value)
        length = ctypes.c_uint32(size.value)
        if libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, _SO_PEERGROUPS, buf,
                           ctypes.byref(length)) == 0:
            raw = buf.raw[: length.value]
            return list(struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        if ctypes.get_errno() != errno.ERANGE or not size.value < length.value <= (
                _MAX_GROUPS_BUF):
            return []
        size = length
    return []


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # no C library to load (not a usual Linux): the database decides
        return None


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
