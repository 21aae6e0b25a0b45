"""The mesh reads nothing outside shared_models/: each escape attempt is refused on its own."""

import os

import pytest

from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.models import (
    ModelNotFound,
    ModelPathError,
    ModelRegistry,
    resolve_shared,
    verify_entry,
)

GGUF = b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64


@pytest.fixture
def layout(tmp_path):
    models = tmp_path / "shared_models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(GGUF)
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(GGUF)
    (tmp_path / "passwd").write_text("root:x:0:0")
    return models, outside


def test_plain_name_and_file_name_resolve(layout):
    models, _ = layout
    assert resolve_shared(models, "tiny") == (models / "tiny.gguf").resolve()
    assert resolve_shared(models, "tiny.gguf") == (models / "tiny.gguf").resolve()


@pytest.mark.parametrize("name", ["../secret", "../secret.gguf", "sub/../../secret", "..", "./tiny"])
def test_dot_dot_and_separators_refused(layout, name):
    with pytest.raises(ModelPathError):
        resolve_shared(layout[0], name)


def test_absolute_path_refused(layout):
    _, outside = layout
    with pytest.raises(ModelPathError, match="absolute"):
        resolve_shared(layout[0], str(outside))
    with pytest.raises(ModelPathError, match="absolute"):
        resolve_shared(layout[0], "~/secret")


def test_symlink_leading_outside_refused(layout):
    models, outside = layout
    (models / "escape.gguf").symlink_to(outside)
    with pytest.raises(ModelPathError, match="symlink"):
        resolve_shared(models, "escape")
    (models / "inside.gguf").symlink_to(models / "tiny.gguf")  # a link that stays inside is fine
    assert resolve_shared(models, "inside") == (models / "tiny.gguf").resolve()


def test_symlinked_directory_component_refused(layout, tmp_path):
    models, _ = layout
    (models / "dir").symlink_to(tmp_path)
    with pytest.raises(ModelPathError):
        resolve_shared(models, "dir/secret")


def test_hard_link_refused(layout):
    models, outside = layout
    os.link(outside, models / "hard.gguf")
    with pytest.raises(ModelPathError, match="hard link"):
        resolve_shared(models, "hard")


def test_non_gguf_refused(layout, tmp_path):
    models, _ = layout
    (models / "notes.gguf").write_text("hello")
    with pytest.raises(ModelPathError, match="not a GGUF"):
        resolve_shared(models, "notes")
    (models / "passwd.gguf").symlink_to(tmp_path / "passwd")
    with pytest.raises(ModelPathError):
        resolve_shared(models, "passwd")
    with pytest.raises(ModelNotFound):
        resolve_shared(models, "absent")
    with pytest.raises(ModelPathError):
        resolve_shared(models, "")


def test_share_entry_is_signed_and_verifiable(layout, tmp_path):
    models, _ = layout
    reg = ModelRegistry(models, tmp_path / "shares.json", Identity.generate())
    entry = reg.share("tiny")
    assert verify_entry(entry)
    assert entry["size_bytes"] == len(GGUF)
    forged = dict(entry, size_bytes=1)
    assert not verify_entry(forged)
    again = ModelRegistry(models, tmp_path / "shares.json", reg.identity)
    assert [e["name"] for e in again.shared_entries()] == ["tiny"]
    again.unshare("tiny")
    assert ModelRegistry(models, tmp_path / "shares.json", reg.identity).shared_entries() == []
    with pytest.raises(ModelPathError):
        reg.share("../secret")


def test_a_changed_file_is_unshared_and_reported(layout, tmp_path):
    models, _ = layout
    reg = ModelRegistry(models, tmp_path / "shares.json", Identity.generate())
    reg.share("tiny")
    assert reg.verify_shares() == []  # untouched: still shared
    data = bytearray((models / "tiny.gguf").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (models / "tiny.gguf").write_bytes(bytes(data))
    withdrawn = reg.verify_shares()
    assert [w["model"] for w in withdrawn] == ["tiny"] and "SHA-256" in withdrawn[0]["reason"]
    assert reg.shared_entries() == [] and reg.problems == withdrawn
    assert ModelRegistry(models, tmp_path / "shares.json", reg.identity).shared_entries() == []
