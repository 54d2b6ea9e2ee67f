"""The systemd unit: it verifies, scores <= 1.5 in ``systemd-analyze security``, and
the daemon really runs inside the sandbox it describes.

PID 1 on the test machines is not systemd, so the unit cannot be started. Instead the
sandbox is rebuilt from the unit file's own directives and the daemon run inside it:

* ``SystemCallFilter=`` / ``SystemCallErrorNumber=`` -- the groups are expanded with
  ``systemd-analyze syscall-filter`` (plus ``@default``, which systemd always adds to
  an allow list) and loaded as a seccomp allow list through libseccomp, with the
  error number for everything else, as systemd does;
* ``MemoryDenyWriteExecute=`` -- systemd's seccomp rules (no mmap W+X, no mprotect or
  pkey_mprotect to X, no shmat SHM_EXEC) and, where the kernel has it (Linux >= 6.3),
  ``prctl(PR_SET_MDWE)`` as well;
* ``RestrictAddressFamilies=`` -- socket() with any other family fails EAFNOSUPPORT;
* ``RestrictNamespaces=`` -- clone3() fails ENOSYS (its flags cannot be inspected, so
  systemd refuses it and glibc falls back to clone());
* ``SystemCallArchitectures=native`` -- libseccomp's filter admits the native ABI only;
* as root, with ``unshare`` and ``setpriv``: a private mount and PID namespace where
  ``/`` is read-only but for the state directory (``ProtectSystem=strict``), ``/proc``
  is mounted ``subset=pid,hidepid=invisible`` (``ProcSubset=pid``,
  ``ProtectProc=invisible``), and the daemon runs as PID 1 (as under Docker) with an
  unprivileged uid, no capabilities and ``no_new_privs``
  (``User=``, ``CapabilityBoundingSet=``, ``NoNewPrivileges=``).

Run as a script (``python tests/test_systemd.py SPEC_JSON -- ARGV...``) this file is
the launcher that applies the seccomp and prctl parts and execs ARGV.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "qisd.service"
SYSUSERS = ROOT / "systemd" / "qisd.sysusers"
MAX_EXPOSURE = 1.5

# --- the launcher (runs without pytest) ------------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_GE = 5
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
AF_MAX = 46  # one past the highest address family Linux 6.x knows


def _scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Seccomp:
    """The few libseccomp calls the launcher needs, through ctypes."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        lib = ctypes.CDLL(name, use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.restype = ctypes.c_int
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_load.restype = ctypes.c_int
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def number(self, name: str) -> int | None:
        nr = int(self.lib.seccomp_syscall_resolve_name(name.encode()))
        return None if nr < 0 else nr  # not a syscall of this architecture

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int]]]]) -> None:
        """One filter: ``default`` action, then (action, syscall, [(arg, op, value)])."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, name, conds in rules:
                nr = self.number(name)
                if nr is None:
                    continue
                # EQ/GE compare with datum_a; MASKED_EQ tests (arg & datum_a) ==
                # datum_b, and every mask here is also the value sought.
                arr = (_ArgCmp * max(1, len(conds)))(
                    *[_ArgCmp(a, op, v, v) for a, op, v in conds]
                )
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(conds), arr)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


def apply_sandbox(spec: dict[str, Any]) -> dict[str, bool]:
    """Apply the prctl and seccomp parts of ``spec`` to this process (and what it
    execs). Returns which optional parts took effect."""
    seccomp = _Seccomp()
    applied = {"prctl_mdwe": False}
    if spec["mdwe"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0:
            applied["prctl_mdwe"] = True
    # Filter 1: the extra rules, default allow. Loaded first: the allow list below may
    # not admit seccomp() itself.
    deny = _scmp_errno(spec["errno"])
    extra: list[tuple[int, str, list[tuple[int, int, int]]]] = []
    if spec["mdwe"]:
        wx = PROT_WRITE | PROT_EXEC
        extra += [(deny, "mmap", [(2, SCMP_CMP_MASKED_EQ, wx)])]
        extra += [(deny, name, [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC)])
                  for name in ("mprotect", "pkey_mprotect")]
        extra += [(deny, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC)])]
    families = spec["families"]
    if families is not None:
        refuse = _scmp_errno(errno.EAFNOSUPPORT)
        extra += [(refuse, "socket", [(0, SCMP_CMP_EQ, f)])
                  for f in range(AF_MAX) if f not in families]
        extra += [(refuse, "socket", [(0, SCMP_CMP_GE, AF_MAX)])]
    if spec["restrict_namespaces"]:
        extra += [(_scmp_errno(errno.ENOSYS), "clone3", [])]
    if extra:
        seccomp.load(SCMP_ACT_ALLOW, extra)
    if spec["allow"] is not None:
        seccomp.load(deny, [(SCMP_ACT_ALLOW, name, []) for name in spec["allow"]])
    return applied


def _launcher_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    assert argv[1] == "--", "usage: test_systemd.py SPEC_JSON -- ARGV..."
    applied = apply_sandbox(spec)
    if spec.get("report"):
        Path(spec["report"]).write_text(json.dumps(applied))
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    _launcher_main(sys.argv[1:])


# --- the tests ---------------------------------------------------------------------------

import pytest  # noqa: E402  (the launcher above must not need pytest)

from qisd.config import load_config  # noqa: E402


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order, repeated keys kept."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def service_values(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == "Service" and k == key]


def service_value(key: str) -> str:
    values = service_values(key)
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (it comes with systemd)")
    return exe


def unit_with_exec(tmp: Path) -> Path:
    """The unit, with ExecStart pointed at this venv's qisd (which exists here)."""
    qisd = Path(sys.executable).parent / "qisd"
    assert qisd.is_file(), f"{qisd} missing: is qisd installed in this venv?"
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={qisd}", UNIT.read_text())
    path = tmp / "qisd.service"
    path.write_text(text)
    return path


# --- the unit's required settings ----------------------------------------------------


def test_unit_has_the_required_settings() -> None:
    assert service_value("Type") == "notify"
    assert service_value("NotifyAccess") == "main"
    assert service_value("User") == "qisd" and service_value("Group") == "qisd"
    for key in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert service_value(key) == "qisd", key
    assert service_value("ExecStart").split()[1:] == ["run"]
    assert not service_values("ExecReload"), "reload is not implemented"
    assert service_value("Restart") == "on-failure"
    assert service_value("CapabilityBoundingSet") == ""
    assert service_value("MemoryDenyWriteExecute") == "yes"
    assert "AF_NETLINK" not in service_value("RestrictAddressFamilies")


def test_timeouts_fit_the_daemon() -> None:
    defaults = load_config(None, env={})
    # The daemon pings every WatchdogSec/2 and needs grace_period to stop cleanly.
    assert int(service_value("WatchdogSec")) >= 10
    assert int(service_value("TimeoutStopSec")) > defaults.daemon.grace_period + 5
    # systemd puts the socket in RuntimeDirectory; the group needs to reach it.
    assert int(defaults.control.socket_mode, 8) & 0o060 == 0o060
    mode = int(service_value("RuntimeDirectoryMode"), 8)
    assert mode & 0o050 == 0o050 and mode & 0o007 == 0


# --- systemd-analyze -----------------------------------------------------------------


def test_unit_verifies(tmp_path: Path) -> None:
    exe = _analyze()
    unit = unit_with_exec(tmp_path)
    proc = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    # verify also reports problems of unrelated units installed on this host; only
    # lines about ours count.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "qisd" in line]
    assert not ours, "\n".join(ours)
    assert proc.returncode == 0, proc.stderr


def test_verify_notices_a_broken_unit(tmp_path: Path) -> None:
    # The check above must be able to fail: a misplaced key is reported.
    exe = _analyze()
    unit = unit_with_exec(tmp_path)
    unit.write_text(unit.read_text().replace("[Unit]\n", "[Unit]\nRestartSec=5\n"))
    proc = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert "RestartSec" in proc.stderr


def exposure(exe: str, unit: Path) -> float:
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert found, f"no overall exposure in output:\n{proc.stdout}\n{proc.stderr}"
    return float(found.group(1))


def test_security_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    exe = _analyze()
    score = exposure(exe, unit_with_exec(tmp_path))
    print(f"systemd-analyze security --offline=yes: {score}")
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"


def test_exposure_parser_sees_a_weaker_unit(tmp_path: Path) -> None:
    exe = _analyze()
    unit = unit_with_exec(tmp_path)
    weak = re.sub(r"(?m)^(SystemCallFilter|ProtectSystem|PrivateUsers|CapabilityBoundingSet)=.*\n",
                  "", unit.read_text())
    unit.write_text(weak)
    assert exposure(exe, unit) > MAX_EXPOSURE


def test_sysusers_creates_the_system_user(tmp_path: Path) -> None:
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        pytest.skip("systemd-sysusers not installed")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([exe, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    passwd = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":")
             for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    user = passwd["qisd"]
    assert 0 < int(user[2]) < 1000, "expected a system uid"
    assert user[3] == group["qisd"][2], "primary group should be qisd"
    assert user[6].endswith("nologin")


# --- the sandbox -----------------------------------------------------------------------


def _expand_group(exe: str, name: str, seen: set[str]) -> set[str]:
    if name in seen:
        return set()
    seen.add(name)
    proc = subprocess.run([exe, "syscall-filter", "--no-pager", name], capture_output=True,
                          text=True, timeout=60, check=True)
    calls: set[str] = set()
    for line in proc.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _expand_group(exe, item, seen) if item.startswith("@") else {item}
    return calls


def allowed_syscalls(exe: str) -> set[str]:
    """The allow list systemd builds from the unit's SystemCallFilter= lines: the
    first line not starting with ~ makes it an allow list (seeded with @default),
    later ~ lines remove, later plain lines add."""
    allowed: set[str] = set()
    lines = service_values("SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "expected an allow list"
    allowed |= _expand_group(exe, "@default", set())
    for value in lines:
        negate = value.startswith("~")
        names = value.lstrip("~").split()
        calls: set[str] = set()
        for name in names:
            calls |= _expand_group(exe, name, set()) if name.startswith("@") else {name}
        allowed = allowed - calls if negate else allowed | calls
    return allowed


def sandbox_spec(exe: str) -> dict[str, Any]:
    families = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET,
                "AF_INET6": socket.AF_INET6}
    assert service_value("SystemCallArchitectures") == "native"
    assert service_value("RestrictNamespaces") == "yes"
    return {
        "allow": sorted(allowed_syscalls(exe)),
        "errno": getattr(errno, service_value("SystemCallErrorNumber")),
        "mdwe": service_value("MemoryDenyWriteExecute") == "yes",
        "families": [families[f] for f in service_value("RestrictAddressFamilies").split()],
        "restrict_namespaces": True,
    }


SANDBOX_UID = 47470  # not a user on the test hosts; owns nothing but the test's dir


@functools.cache
def _can_isolate() -> str | None:
    """None if the namespace part of the sandbox can be built, else why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--",
         "mount", "-t", "proc", "-o", "subset=pid,hidepid=invisible", "proc", "/proc"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if probe.returncode != 0:
        return f"cannot make mount/PID namespaces here: {probe.stderr.strip()}"
    return None


def _private_ancestor() -> Path | None:
    """A directory on the way to this Python (interpreter, stdlib, venv) that other
    users cannot traverse, or None. pyenv installs under /root (0700), where the
    unprivileged sandbox user could not even start the interpreter; a real
    installation lives elsewhere (ProtectHome= hides /root and /home anyway)."""
    for target in (Path(os.path.realpath(sys.executable)), Path(sys.base_prefix),
                   Path(sys.prefix)):
        for directory in [target, *target.parents]:
            if directory.is_dir() and not directory.stat().st_mode & 0o001:
                return directory
    return None


def _sandbox_uid() -> int:
    return 0 if _private_ancestor() is not None else SANDBOX_UID


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    exe = _analyze()
    try:
        _Seccomp()
    except OSError as exc:
        pytest.skip(f"libseccomp not loadable: {exc}")
    return sandbox_spec(exe)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the unprivileged sandbox user can reach (pytest's tmp_path lives
    under a 0700 root directory)."""
    with tempfile.TemporaryDirectory(prefix="qisd-sbx-", dir="/tmp") as name:
        path = Path(name)
        path.chmod(0o755)
        if _can_isolate() is None:
            os.chown(path, _sandbox_uid(), _sandbox_uid())
        yield path


def sandboxed(spec: dict[str, Any], workdir: Path, argv: list[str]) -> tuple[list[str], str]:
    """The command line that runs ``argv`` in the unit's sandbox, and a note saying
    which parts apply."""
    spec = {**spec, "report": str(workdir / "applied.json")}
    launch = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec), "--", *argv]
    why_not = _can_isolate()
    if why_not is not None:
        return launch, f"seccomp and prctl only ({why_not}: no namespaces, no uid change)"
    # ProtectSystem=strict: / read-only except the state dir. `remount,bind,ro` changes
    # this namespace's mount of / only, never the filesystem itself.
    script = (
        'set -e; mount --bind "$1" "$1"; mount -o remount,bind,ro /; '
        "mount -t proc -o nosuid,nodev,noexec,subset=pid,hidepid=invisible proc /proc; "
        'shift; exec "$@"'
    )
    uid = _sandbox_uid()
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--",
           "sh", "-c", script, "sh", str(workdir), *drop, *launch]
    who = (f"uid {uid}" if uid else
           f"uid 0 without capabilities ({_private_ancestor()} is private to root)")
    return cmd, f"seccomp, prctl, read-only /, /proc subset=pid, PID namespace, {who}"


PROBE = r"""
import ctypes, errno, json, mmap, os, socket, sqlite3, sys, threading
import numpy, nacl.signing, trio

out = {}
key = nacl.signing.SigningKey.generate()
signed = key.sign(b"outcome")
key.verify_key.verify(signed)
out["pynacl"] = True

db = sqlite3.connect(os.path.join(sys.argv[1], "probe.db"))
out["wal"] = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
db.execute("CREATE TABLE t (x)"); db.execute("INSERT INTO t VALUES (1)"); db.commit()

async def udp():
    a = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    b = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await a.bind(("127.0.0.1", 0)); await b.bind(("127.0.0.1", 0))
    await a.sendto(b"ping", b.getsockname())
    data, _ = await b.recvfrom(64)
    await trio.to_thread.run_sync(lambda: None)  # a worker thread: clone3 -> clone
    return data == b"ping"
out["trio_udp"] = trio.run(udp)
out["numpy"] = float(numpy.arange(4.0).dot(numpy.ones(4)))

def refused(fn):
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return None
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
c_int = ctypes.c_int
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, c_int, c_int, c_int, ctypes.c_long]
p = libc.mmap(None, 4096, 0x7, 0x22, -1, 0)  # PROT_READ|WRITE|EXEC, MAP_PRIVATE|ANON
failed = p in (None, ctypes.c_void_p(-1).value)
out["wx_mmap"] = errno.errorcode.get(ctypes.get_errno()) if failed else "mapped"
out["netlink"] = refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
out["setpriority"] = refused(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))
print(json.dumps(out))
"""


def test_sandbox_admits_pynacl_trio_sqlite_and_refuses_the_rest(
    spec: dict[str, Any], workdir: Path
) -> None:
    cmd, note = sandboxed(spec, workdir, [sys.executable, "-c", PROBE, str(workdir)])
    print(f"sandbox: {note}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["pynacl"] and got["trio_udp"] and got["numpy"] == 6.0
    assert got["wal"] == "wal"
    # The sandbox is really there: W+X memory, netlink and @resources are refused.
    assert got["wx_mmap"] == "EPERM"
    assert got["netlink"] == "EAFNOSUPPORT"
    assert got["setpriority"] == "EPERM"
    applied = json.loads((workdir / "applied.json").read_text())
    print(f"PR_SET_MDWE applied: {applied['prctl_mdwe']}")


# --- the daemon in the sandbox -----------------------------------------------------------


class NotifyListener:
    """The NOTIFY_SOCKET side of sd_notify: collects the daemon's datagrams."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)  # the sandbox user sends here
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        while not any(line in m.splitlines() for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {line} within {timeout}s; got {self.messages}")
            if proc.poll() is not None:
                pytest.fail(f"daemon exited with {proc.returncode} before {line}")
            self.sock.settimeout(min(0.5, remaining))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


def _daemon_pid(proc: subprocess.Popen[bytes]) -> int:
    """The daemon's pid seen from here: the child of unshare when namespaced."""
    if _can_isolate() is not None:
        return proc.pid
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _qisd(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "qisd")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


class SandboxedDaemon:
    """``qisd run`` in the sandbox, with a NOTIFY_SOCKET to watch its sd_notify."""

    def __init__(self, spec: dict[str, Any], workdir: Path, name: str, *extra: str) -> None:
        self.name = name
        self.sock = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.listener = NotifyListener(workdir / f"{name}.notify")
        argv = [str(Path(sys.executable).parent / "qisd"), "run",
                "--state-dir", str(workdir / name), "--socket", str(self.sock),
                "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *extra]
        cmd, self.note = sandboxed(spec, workdir, argv)
        env = {k: v for k, v in os.environ.items() if not k.startswith("QISD_")}
        env.update(NOTIFY_SOCKET=str(workdir / f"{name}.notify"), WATCHDOG_USEC="1000000",
                   PYTHONDONTWRITEBYTECODE="1")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_for(self, line: str, timeout: float) -> None:
        self.listener.wait_for(line, timeout, self.proc)

    def status(self) -> dict[str, Any]:
        proc = _qisd("status", "--json", "--socket", str(self.sock))
        assert proc.returncode == 0, proc.stderr
        reply: dict[str, Any] = json.loads(proc.stdout)
        return reply

    def terminate(self) -> int:
        """SIGTERM (to PID 1 of the sandbox's PID namespace, when there is one); the
        exit status."""
        os.kill(_daemon_pid(self.proc), signal.SIGTERM)
        self.wait_for("STOPPING=1", 10)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.listener.close()
        if self.proc.returncode != 0:
            print(f"--- {self.name} log:\n{self.log_path.read_text()[-4000:]}")


def test_daemon_runs_in_the_sandbox(spec: dict[str, Any], workdir: Path) -> None:
    a = SandboxedDaemon(spec, workdir, "a")
    b: SandboxedDaemon | None = None
    print(f"sandbox: {a.note}")
    try:
        a.wait_for("READY=1", 60)
        info = a.status()
        assert info["node_id"]
        # A second sandboxed node joins through a host name (getaddrinfo without
        # netlink) and the two talk over UDP.
        port = info["listen"].rsplit(":", 1)[1]
        b = SandboxedDaemon(spec, workdir, "b", "--bootstrap", f"localhost:{port}")
        b.wait_for("READY=1", 60)
        deadline = time.monotonic() + 30
        while a.status()["peers"] < 1 or b.status()["peers"] < 1:
            assert time.monotonic() < deadline, "the sandboxed nodes did not find each other"
            time.sleep(0.2)
        # A signed packet (pynacl) into the stores (SQLite WAL) and back.
        vector = json.dumps([1.0, 0.5, -0.25, 0.0] * 4)
        where = ["--topic", "default", "--vector", vector, "--json"]
        emitted = _qisd("emit", "--socket", str(a.sock), *where, "-o", "result=ok")
        assert emitted.returncode == 0, emitted.stdout + emitted.stderr
        queried = _qisd("query", "--socket", str(b.sock), *where)
        assert queried.returncode == 0, queried.stdout + queried.stderr
        assert json.loads(queried.stdout)["matches"][0]["outcome"] == {"result": "ok"}
        with urllib.request.urlopen(info["metrics"], timeout=10) as resp:
            assert b"qisd_peers" in resp.read()
        a.wait_for("WATCHDOG=1", 10)
        assert b.terminate() == 0
        assert a.terminate() == 0
    finally:
        for daemon in (a, b):
            if daemon is not None:
                daemon.close()
