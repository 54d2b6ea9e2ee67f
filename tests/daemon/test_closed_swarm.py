"""A closed swarm made the way an operator makes one: member keys read with ``qisd
identity --state-dir`` before any node runs, ``qisd manifest new`` signs the list,
``qisd manifest show`` reads it back, members run ``qisd run`` with it and find each
other's packets, and a node the list leaves out refuses to start, saying why.
Bad input to ``manifest new``/``show`` gets one clear error naming the problem."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from daemon_helpers import Daemon, cli, cli_json

VECTOR = "[0.3, -0.1, 0.8, 0.2]"


def _pubkey(state_dir: Path) -> str:
    out = json.loads(cli("identity", "--state-dir", str(state_dir), "--json").stdout)
    assert len(bytes.fromhex(out["public_key"])) == 32
    return str(out["public_key"])


def _make(root: Path, *members: str, name: str = "clinic-net") -> Path:
    path = root / "swarm.toml"
    args = [a for m in members for a in ("--member", m)]
    cli("manifest", "new", str(path), "--name", name, "--sign-key", str(root / "creator.key"),
        *args)
    return path


def _peers(d: Daemon) -> int:
    return int(cli_json("status", socket_path=d.socket)["peers"])


def test_members_run_the_swarm_and_an_outsider_is_refused_at_start(
    workdir: Path, daemons: list[Daemon]
) -> None:
    a, b, outsider = (Daemon(workdir, n) for n in ("a", "b", "out"))
    # Keys exist before the nodes ever run; the daemon uses the same key later.
    keys = [_pubkey(a.state_dir), _pubkey(b.state_dir)]
    manifest = _make(workdir, *keys)
    creator_key = workdir / "creator.key"
    assert stat.S_IMODE(creator_key.stat().st_mode) == 0o600

    shown = json.loads(cli("manifest", "show", str(manifest), "--json").stdout)
    assert shown["membership"] == "closed" and shown["signed"] is True
    assert sorted(shown["members"]) == sorted(keys) and shown["name"] == "clinic-net"
    assert "clinic-net (closed)" in cli("manifest", "show", str(manifest)).stdout

    for d in (a, b, outsider):
        d.extra = ["--manifest", str(manifest)]
    daemons.append(a.start())
    assert cli_json("identity", socket_path=a.socket)["public_key"] == keys[0]
    assert cli_json("status", socket_path=a.socket)["swarm"] == shown["swarm"]
    b.bootstrap = [a.address]
    daemons.append(b.start())
    deadline = time.monotonic() + 30
    while (_peers(a) < 1 or _peers(b) < 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _peers(a) == 1 and _peers(b) == 1

    emitted = cli_json("emit", "--topic", "t", "--vector", VECTOR, "-o", "ok=true",
                       socket_path=a.socket)
    found = cli_json("query", "--topic", "t", "--vector", VECTOR, socket_path=b.socket)
    assert emitted["id"] in [m["id"] for m in found["matches"]]

    daemons.append(outsider)
    outsider.bootstrap = [a.address]
    outsider.start(wait=False)
    assert outsider.proc is not None
    assert outsider.proc.wait(timeout=30) == 2  # a config matter: systemd does not retry
    log = outsider.log.read_text()
    own = _pubkey(outsider.state_dir)
    assert "does not list this node's key" in log and own in log and "clinic-net" in log

    # A node of the default open swarm, pointed at a member, is told why it cannot
    # join (not a bare "no answer": the member answers hello to anyone).
    stranger = Daemon(workdir, "stranger").start()
    daemons.append(stranger)
    proc = cli("bootstrap", a.address, "--json", socket_path=stranger.socket, check=False)
    assert proc.returncode == 1
    reply = json.loads(proc.stdout)
    assert reply["contacted"] == 0 and reply["error"]["code"] == "unreachable"
    assert [f["address"] for f in reply["failed"]] == [a.address]
    assert "another swarm" in reply["failed"][0]["reason"]


def test_manifest_new_and_show_refuse_bad_input_clearly(workdir: Path) -> None:
    key = _pubkey(workdir / "n1")
    sign = ["--sign-key", str(workdir / "creator.key")]
    path = str(workdir / "m.toml")

    def fails(*args: str) -> str:
        proc = cli("manifest", *args, check=False)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        return proc.stderr

    assert "--member #2" in fails("new", path, *sign, "--member", key, "--member", "zz")
    assert "64 hex digits" in fails("new", path, *sign, "--member", key[:10])
    members = workdir / "members.txt"
    members.write_text(f"# site keys\n\n{key}  # site 1\n")
    err = fails("new", path, *sign, "--member", key, "--members-file", str(members))
    assert "already given at --member #1" in err and f"{members}:3" in err
    assert "needs --sign-key" in fails("new", path, "--member", key)
    assert "replicas" in fails("new", path, *sign, "--replicas", "0")
    assert ".toml or .msgpack" in fails("new", str(workdir / "m.json"), *sign)
    assert not (workdir / "m.toml").exists() and not (workdir / "m.json").exists()

    # Refused input leaves no key file behind: everything is checked before the key is made.
    fresh = workdir / "fresh.key"
    assert "bits" in fails("new", path, "--sign-key", str(fresh), "--bits", "99")
    assert not fresh.exists()
    assert "is a directory" in fails("new", path, "--sign-key", str(workdir), "--member", key)
    assert "not a directory" in cli("identity", "--state-dir", str(members), check=False).stderr
    assert "cannot write" in fails("new", str(members / "m.toml"), "--sign-key", str(fresh),
                                   "--member", key)
    assert not fresh.exists()  # a key made for a manifest that could not be written is removed
    assert "--seed: must be 32 bytes" in fails("new", path, "--seed", "abcd")

    # 1,024 members (the most) do not fit a node's 64 KiB limit as TOML; as msgpack they do.
    many = workdir / "many.txt"
    many.write_text("\n".join(os.urandom(32).hex() for _ in range(1024)))
    assert "over the 65536 a node reads" in fails("new", path, *sign, "--members-file", str(many))
    big = workdir / "big.msgpack"
    made = json.loads(cli("manifest", "new", str(big), *sign, "--members-file", str(many),
                          "--json").stdout)
    read = json.loads(cli("manifest", "show", str(big), "--json").stdout)
    assert made == read and len(read["members"]) == 1024 and read["signed"] is True
    assert "more than 1024 members" in fails("new", path, *sign, "--members-file", str(many),
                                             "--member", key)
    # Without members and a key: an open swarm, unsigned, the same keys in its JSON.
    open_one = json.loads(cli("manifest", "new", str(workdir / "o.toml"), "--json").stdout)
    assert open_one["membership"] == "open" and open_one["signed"] is False
    assert open_one["creator"] is None and set(open_one) == set(read)
    again = json.loads(cli("manifest", "new", str(workdir / "o2.toml"), "--json").stdout)
    assert again["seed"] != open_one["seed"] and again["swarm"] != open_one["swarm"]
    err = cli("manifest", "show", str(workdir / "none.toml"), "--json", check=False)
    assert json.loads(err.stdout)["error"]["code"] == "invalid"

    # A creator key others can read is refused, as a node's own key is.
    loose = workdir / "loose.key"
    cli("manifest", "new", str(workdir / "tmp.toml"), "--sign-key", str(loose))
    os.chmod(loose, 0o644)
    assert "chmod 600" in fails("new", path, "--sign-key", str(loose), "--member", key)

    cli("manifest", "new", path, *sign, "--members-file", str(members))
    assert "exists; pass --force" in fails("new", path, *sign)
    text = (workdir / "m.toml").read_text()
    cli("manifest", "new", path, *sign, "--force", "--name", "other")
    assert (workdir / "m.toml").read_text() != text

    # An altered file: the signature no longer verifies, and show says so.
    (workdir / "m.toml").write_text(text.replace("replicas = 6", "replicas = 7"))
    assert "does not verify" in fails("show", path)
    assert "none.toml: no such file" in fails("show", str(workdir / "none.toml"))
