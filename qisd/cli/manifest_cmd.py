"""``qisd manifest new`` and ``qisd manifest show``: make and read a swarm manifest.

A manifest fixes a swarm's parameters (LSH seed and shape, replicas, TTLs) and, for a
closed swarm, the Ed25519 keys of its members, signed by its creator; every node of
the swarm runs with the same file (``manifest`` in the config, or ``QISD_MANIFEST``).
``new`` builds one from options and a member list (public keys as ``qisd identity``
prints them), signs it with a creator key file (made on first use, mode 0600, like a
node's key) and writes it whole or not at all; ``show`` validates a file as the
daemon would and prints what it says. Every input is checked before anything is
written: a refused ``new`` leaves no manifest and no new key file behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from qisd.cli.output import JsonUsageCommand, echo, echo_json
from qisd.identity import Identity, IdentityError
from qisd.manifest import (
    MAX_ENCODED_BYTES,
    MAX_MEMBERS,
    PUBKEY_BYTES,
    Manifest,
    ManifestError,
    load_manifest,
    read_capped,
)

__all__ = ["manifest_app", "parse_members", "register", "summary"]

manifest_app = typer.Typer(
    name="manifest",
    help="Make and inspect swarm manifests (parameters and, for closed swarms, members).",
    no_args_is_help=True,
)

_DEFAULTS = Manifest()
#: Longest members file read: 1,024 keys of 64 hex digits with room for comments.
MAX_MEMBERS_FILE_BYTES = 1 << 20
#: Most bytes a creator key and signature add to an encoded manifest (TOML, hex).
SIGNED_EXTRA = 256

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def _fail(message: str, as_json: bool) -> NoReturn:
    """One ``error:`` line on stderr (and, with ``--json``, the error map on stdout)."""
    if as_json:
        echo_json({"error": {"code": "invalid", "message": message}})
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _member_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ManifestError(f"{where}: {text[:80]!r} is not hex (a public key as `qisd"
                            " identity` prints it)") from None
    if len(key) != PUBKEY_BYTES:
        raise ManifestError(f"{where}: a public key is {PUBKEY_BYTES} bytes "
                            f"({2 * PUBKEY_BYTES} hex digits), got {len(key)}")
    return key


def _read_members_file(path: Path) -> list[str]:
    data = read_capped(path, MAX_MEMBERS_FILE_BYTES)
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text (one hex key per line)") from None


def parse_members(options: list[str], files: list[Path]) -> list[bytes]:
    """Member keys from ``--member`` values and ``--members-file`` files (one hex key
    per line; blank lines and ``#`` comments skipped), in order, duplicates refused
    with both places named."""
    seen: dict[bytes, str] = {}
    for i, text in enumerate(options):
        _add(seen, _member_key(text.strip(), f"--member #{i + 1}"), f"--member #{i + 1}")
    for path in files:
        for n, line in enumerate(_read_members_file(path), 1):
            text = line.split("#", 1)[0].strip()
            if text:
                _add(seen, _member_key(text, f"{path}:{n}"), f"{path}:{n}")
    return list(seen)


def _add(seen: dict[bytes, str], key: bytes, where: str) -> None:
    if key in seen:
        raise ManifestError(f"{where}: key {key.hex()[:16]}... already given at {seen[key]}")
    if len(seen) == MAX_MEMBERS:
        raise ManifestError(f"{where}: more than {MAX_MEMBERS} members")
    seen[key] = where


def summary(manifest: Manifest, path: Path | None = None) -> dict[str, Any]:
    """What a manifest says, JSON-ready (the ``--json`` output of both commands; the
    same keys always, ``creator`` and ``signature`` null when unsigned). ``signed``
    means signed and verified: a signature that does not verify is an error."""
    out: dict[str, Any] = {"file": str(path) if path else None, "swarm": manifest.swarm_id.hex(),
                           "creator": None, "signature": None}
    out.update(manifest.to_toml_dict())
    out["signed"] = manifest.signature is not None
    return out


def _render(info: dict[str, Any]) -> str:
    members = info["members"]
    lines = [
        f"swarm      {info['name']} ({info['membership']})",
        f"swarm id   {info['swarm']}",
        f"lsh        {info['tables']} tables x {info['bits']} bits, {info['probes']} probes"
        " per query",
        f"replicas   {info['replicas']}",
        f"ttl        default {info['ttl_default_s']} s, max {info['ttl_max_s']} s",
        f"signed     {'by ' + info['creator'] if info['signed'] else 'no'}",
        f"members    {len(members) if members else 'anyone (open swarm)'}",
    ]
    lines += [f"  {key}" for key in members]
    lines += [f"topic      {name}: {p['tables']} tables x {p['bits']} bits"
              for name, p in info["topics"].items()]
    return "\n".join(lines)


def _write(path: Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``path`` whole or not at all (temp file, fsync, then rename
    with ``force``, else link, which fails if ``path`` appeared meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if force:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
    except FileExistsError:
        raise ManifestError(f"{path} exists; pass --force to replace it") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _creator(path: Path) -> Identity:
    if path.is_dir():
        raise ManifestError(f"--sign-key {path}: is a directory, not a key file")
    try:
        return Identity.load_or_create(path)
    except OSError as exc:
        raise ManifestError(f"--sign-key {path}: cannot create the key file "
                            f"({exc.strerror or exc})") from None


def _seed(text: str | None) -> bytes:
    if text is None:
        return os.urandom(32)
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ManifestError(f"--seed: {text[:80]!r} is not hex") from None
    if len(seed) != 32:
        raise ManifestError(f"--seed: must be 32 bytes (64 hex digits), got {len(seed)}")
    return seed


@manifest_app.command("new", cls=JsonUsageCommand)
def new(
    file: Annotated[Path, typer.Argument(help="Where to write it: FILE.toml or FILE.msgpack.",
                                         show_default=False)],
    sign_key: Annotated[Path | None, typer.Option(
        "--sign-key", metavar="KEYFILE", show_default=False,
        help="The creator's Ed25519 key file (created, mode 0600, if missing). Required"
             " for a closed swarm.")] = None,
    name: Annotated[str, typer.Option("--name", help="The swarm's name.")] = "qisd-swarm",
    member: Annotated[list[str] | None, typer.Option(
        "--member", metavar="PUBKEY", show_default=False,
        help="A member's public key (hex, as `qisd identity` prints it); repeat it. Any"
             " member makes the swarm closed.")] = None,
    members_file: Annotated[list[Path] | None, typer.Option(
        "--members-file", metavar="FILE", show_default=False,
        help="A file of member keys, one per line (# comments).")] = None,
    seed: Annotated[str | None, typer.Option(
        "--seed", metavar="HEX", show_default=False,
        help="The LSH seed (64 hex digits). Default: a fresh random one.")] = None,
    tables: Annotated[int, typer.Option(help="LSH tables.")] = _DEFAULTS.tables,
    bits: Annotated[int, typer.Option(help="LSH bits per table.")] = _DEFAULTS.bits,
    probes: Annotated[int, typer.Option(help="Key lookups per query.")] = _DEFAULTS.probes,
    replicas: Annotated[int, typer.Option(help="Copies per key.")] = _DEFAULTS.replicas,
    ttl_default: Annotated[int, typer.Option(
        "--ttl-default", help="Packet lifetime when emit gives none (s).")
    ] = _DEFAULTS.ttl_default_s,
    ttl_max: Annotated[int, typer.Option("--ttl-max", help="Longest packet lifetime (s).")
                       ] = _DEFAULTS.ttl_max_s,
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write a new swarm manifest; with members, a closed swarm signed by --sign-key."""
    suffix = file.suffix.lower()
    try:
        if suffix not in (".toml", ".msgpack"):
            raise ManifestError(f"{file}: the manifest file must end in .toml or .msgpack")
        if file.exists() and not force:
            raise ManifestError(f"{file} exists; pass --force to replace it")
        members = parse_members(member or [], members_file or [])
        if members and sign_key is None:
            raise ManifestError("a closed swarm (with --member) needs --sign-key: members"
                                " check the creator's signature")
        # Validated whole before a creator key file is made.
        manifest = Manifest(
            name=name, seed=_seed(seed), tables=tables, bits=bits, probes=probes,
            replicas=replicas, ttl_default_s=ttl_default, ttl_max_s=ttl_max,
            membership="closed" if members else "open", members=tuple(members),
        )
        data = manifest.to_toml().encode() if suffix == ".toml" else manifest.encode()
        if len(data) + (SIGNED_EXTRA if sign_key is not None else 0) > MAX_ENCODED_BYTES:
            raise ManifestError(f"{file}: {len(data)} bytes, over the {MAX_ENCODED_BYTES}"
                                " a node reads; use FILE.msgpack (smaller) or fewer members")
        new_key = sign_key is not None and not sign_key.exists()
        if sign_key is not None:
            manifest = manifest.signed(_creator(sign_key).signing_key)
            data = manifest.to_toml().encode() if suffix == ".toml" else manifest.encode()
        try:
            _write(file, data, force)
        except ManifestError:
            if new_key and sign_key is not None:  # made for this manifest: not left behind
                sign_key.unlink(missing_ok=True)
            raise
    except (ManifestError, IdentityError) as exc:
        _fail(str(exc), as_json)
    info = summary(manifest, file)
    if as_json:
        echo_json(info)
        return
    echo(f"wrote {file}\n{_render(info)}\n\nGive every node of the swarm this file:"
         f" manifest = \"{file}\" in its config, or QISD_MANIFEST={file}.")


@manifest_app.command("show", cls=JsonUsageCommand)
def show(
    file: Annotated[Path, typer.Argument(help="A manifest file (.toml or .msgpack).",
                                         show_default=False)],
    as_json: JsonFlag = False,
) -> None:
    """Validate a manifest as the daemon would (signature included) and print it."""
    try:
        manifest = load_manifest(file)
    except ManifestError as exc:
        _fail(str(exc), as_json)
    info = summary(manifest, file)
    if as_json:
        echo_json(info)
    else:
        echo(_render(info))


def register(app: typer.Typer) -> None:
    app.add_typer(manifest_app)
