"""Maintainer commands: `pinkybrain release keygen|sign|verify` (or `python -m pinkybrain.node.release_cli`).

keygen makes an Ed25519 release key pair; sign hashes a wheel and writes the signed manifest that nodes
fetch from update.url; verify checks a manifest (and optionally its wheel) the way a node will.
"""

from __future__ import annotations

import base64
import email.parser
import hashlib
import json
import os
import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

release_app = typer.Typer(
    help="Maintainer tools: release signing key, signed release manifests.",
    no_args_is_help=True,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    from pinkybrain.node.cli import fail as node_fail  # the same line, or JSON under --json

    node_fail(message, code)


def _write_new(path: Path, text: str, mode: int, force: bool) -> None:
    if path.exists() and not force:
        fail(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
    os.chmod(tmp, mode)  # the umask may have narrowed it, never widened; make it exact
    os.replace(tmp, path)


@release_app.command("keygen")
def keygen(
    key_file: Annotated[
        Path, typer.Argument(help="private key file to create (mode 0600); KEY.pub is written next to it")
    ],
    force: Annotated[bool, typer.Option("--force", help="replace existing files")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an Ed25519 release key pair. Keep the private file offline; ship only the .pub."""
    from nacl.signing import SigningKey

    from pinkybrain.node.core.release import key_id, private_key_file_text, public_key_file_text

    signing_key = SigningKey.generate()
    public = bytes(signing_key.verify_key)
    pub_file = key_file.with_name(key_file.name + ".pub")
    _write_new(key_file, private_key_file_text(signing_key), 0o600, force)
    _write_new(pub_file, public_key_file_text(public), 0o644, force)
    info = {
        "key_file": str(key_file),
        "public_key_file": str(pub_file),
        "public_key": base64.b64encode(public).decode(),
        "key_id": key_id(public),
    }
    typer.echo(
        json.dumps(info, indent=2)
        if as_json
        else f"wrote {key_file} (private, 0600) and {pub_file}\nkey id: {info['key_id']}\n"
        f"public key: {info['public_key']}"
    )


def _load_signing_key(path: Path):
    from pinkybrain.node.core.release import ReleaseError, parse_private_key

    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the signing key {path}: {getattr(exc, 'strerror', None) or exc}")
    if mode & 0o077:
        fail(f"{path} is readable by others (mode {mode:o}); chmod 600 it first")
    try:
        return parse_private_key(text)
    except ReleaseError as exc:
        fail(f"{path}: {exc}")


def wheel_version(wheel: Path) -> str:
    """The version a wheel's own METADATA declares (checked against its file name)."""
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    try:
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
    except InvalidWheelFilename as exc:
        fail(str(exc))
    if name != "pinkybrain":
        fail(f"{wheel.name} is a wheel of {name}, not pinkybrain")
    try:
        with zipfile.ZipFile(wheel) as zf:
            metas = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            meta = (
                email.parser.HeaderParser().parsestr(zf.read(metas[0]).decode()) if len(metas) == 1 else None
            )
    except (OSError, zipfile.BadZipFile) as exc:
        fail(f"{wheel}: not a readable wheel ({exc})")
    if meta is None or canonicalize_name(meta.get("Name", "")) != "pinkybrain":
        fail(f"{wheel}: no pinkybrain METADATA inside")
    from packaging.version import Version

    if Version(meta["Version"]) != version:
        fail(f"{wheel.name} says {version} but its METADATA says {meta['Version']}")
    return meta["Version"]


@release_app.command("sign")
def sign(
    wheel: Annotated[
        Path, typer.Argument(help="the pinkybrain wheel to release", exists=True, dir_okay=False)
    ],
    key: Annotated[Path, typer.Option("--key", help="release signing key file (from `release keygen`)")],
    url: Annotated[
        Optional[str],
        typer.Option(
            "--url",
            help="where nodes download the wheel; relative URLs are taken from the feed's URL "
            "(default: the wheel's file name, next to the manifest)",
        ),
    ] = None,
    notes: Annotated[str, typer.Option("--notes", help="release notes shown by `update check`")] = "",
    notes_file: Annotated[
        Optional[Path], typer.Option("--notes-file", help="read the release notes from a file", exists=True)
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="manifest file to write")] = Path(
        "manifest.json"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Hash a wheel and write its signed release manifest (what update.url points at)."""
    from pinkybrain.node.core.release import Manifest, ReleaseError, key_id, sign_manifest

    signing_key = _load_signing_key(key)
    version = wheel_version(wheel)
    digest, size = hashlib.sha256(), 0
    with open(wheel, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    text = notes_file.read_text(encoding="utf-8") if notes_file else notes
    manifest = Manifest(
        version=version,
        filename=wheel.name,
        url=url or wheel.name,
        size=size,
        sha256=digest.hexdigest(),
        notes=text,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    try:
        envelope = sign_manifest(manifest, signing_key)
    except ReleaseError as exc:
        fail(str(exc))
    output.write_text(json.dumps(envelope, indent=2) + "\n", encoding="utf-8")
    kid = key_id(bytes(signing_key.verify_key))
    if as_json:
        typer.echo(json.dumps({"version": version, "size": size, "sha256": manifest.sha256, "key_id": kid,
                               "manifest": str(output)}, indent=2))
        return
    typer.echo(f"signed pinkybrain {version} ({size} bytes, sha256 {manifest.sha256[:16]}...) with key {kid}: {output}")


@release_app.command("verify")
def verify(
    manifest_file: Annotated[Path, typer.Argument(help="signed manifest", exists=True, dir_okay=False)],
    public_key: Annotated[
        Optional[str],
        typer.Option("--public-key", help="key (hex/base64) or .pub file; default: the pinned key"),
    ] = None,
    wheel: Annotated[
        Optional[Path], typer.Option("--wheel", help="also check this wheel's size and SHA-256")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check a manifest's signature and fields (and a wheel against it) the way a node does."""
    from pinkybrain.node.core.release import (
        ReleaseError,
        parse_public_key,
        pinned_public_key,
        read_key_text,
        verify_envelope,
    )

    try:
        if public_key and Path(public_key).is_file():
            key = parse_public_key(read_key_text(Path(public_key).read_text(encoding="ascii")))
        else:
            key = parse_public_key(public_key) if public_key else pinned_public_key()
        manifest = verify_envelope(manifest_file.read_bytes(), key)
    except ReleaseError as exc:
        fail(str(exc), 1)
    if wheel is not None:
        data = wheel.read_bytes()
        if len(data) != manifest.size or hashlib.sha256(data).hexdigest() != manifest.sha256:
            fail(f"{wheel} does not match the manifest (size or SHA-256 differs)", 1)
    if as_json:
        typer.echo(json.dumps({"ok": True, "version": manifest.version, "size": manifest.size,
                               "sha256": manifest.sha256, "wheel_checked": wheel is not None}, indent=2))
        return
    typer.echo(f"ok: pinkybrain {manifest.version}, {manifest.size} bytes, sha256 {manifest.sha256}")


if __name__ == "__main__":
    release_app(prog_name="pinkybrain release")
