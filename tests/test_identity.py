import os
import stat

import pytest

from nodes import node_env, run_cli
from pinkybrain.node.core.identity import (
    Identity,
    IdentityError,
    load_identity,
    node_id_from_public_key,
    public_key_from_node_id,
    save_identity,
    validate_node_id,
    verify,
)


def test_node_id_round_trips_and_carries_the_key():
    ident = Identity.generate()
    nid = ident.node_id
    assert len(nid) == 63 and nid.count("-") == 7
    assert public_key_from_node_id(nid) == ident.public_key
    assert public_key_from_node_id(nid.lower().replace("-", "")) == ident.public_key
    msg = b"hello mesh"
    assert verify(nid, msg, ident.sign(msg))
    assert not verify(nid, msg + b"!", ident.sign(msg))


def test_every_single_character_typo_is_caught():
    nid = Identity.generate().node_id
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    for i, ch in enumerate(nid):
        if ch == "-":
            continue
        wrong = alphabet[(alphabet.index(ch) + 7) % 32]
        with pytest.raises(IdentityError):
            validate_node_id(nid[:i] + wrong + nid[i + 1 :])


def test_garbage_ids_are_refused_with_a_reason():
    for bad in ("", "peer_id", "A" * 56 + "!", "ZZZZ"):
        with pytest.raises(IdentityError, match="node id"):
            public_key_from_node_id(bad)
    with pytest.raises(IdentityError):
        node_id_from_public_key(b"short")


def test_key_file_is_private_and_never_overwritten(tmp_path):
    path = tmp_path / "sub" / "identity.key"
    first = Identity.generate()
    save_identity(first, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(IdentityError, match="--force"):
        save_identity(Identity.generate(), path)
    assert load_identity(path).node_id == first.node_id
    second = Identity.generate()
    save_identity(second, path, force=True)
    assert load_identity(path).node_id == second.node_id
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp files left


def test_damaged_or_exposed_keys_are_refused(tmp_path):
    path = tmp_path / "identity.key"
    save_identity(Identity.generate(), path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(path)
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not a PinkyBrain identity key"):
        load_identity(path)


def test_cli_identity_init_show_and_refuse_overwrite(tmp_path):
    env = node_env(tmp_path / "home")
    first = run_cli("identity", "init", env=env)
    assert first.returncode == 0, first.stderr
    key = tmp_path / "home" / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = run_cli("identity", "show", env=env)
    assert shown.returncode == 0
    node_id = shown.stdout.strip()
    assert validate_node_id(node_id) == node_id
    assert node_id in first.stdout
    before = key.read_bytes()
    again = run_cli("identity", "init", env=env)
    assert again.returncode != 0
    assert "already holds an identity key" in again.stderr and "Traceback" not in again.stderr
    assert key.read_bytes() == before
    forced = run_cli("identity", "init", "--force", env=env)
    assert forced.returncode == 0 and key.read_bytes() != before
