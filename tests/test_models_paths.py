"""The mesh reads nothing outside shared_models/: each escape attempt is refused on its own."""

import logging
import os
import threading
import time

import pytest

from model import write_tiny_gguf
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services import gguf_facts
from pinkybrain.node.services.gguf_facts import GgufFactsCache, GgufUnreadable
from pinkybrain.node.services.models import (
    ModelNotFound,
    ModelPathError,
    ModelRegistry,
    ShareChanged,
    open_model,
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


# -- reads never leave shared_models/, never block, never re-parse a broken file ------------------------
def _in_thread(fn, timeout: float = 10.0):
    """Run fn in a daemon thread: a read that blocks (a FIFO) fails the test instead of hanging it."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the read blocked"
    return out


def test_a_fifo_named_like_a_model_is_refused_without_blocking(layout, tmp_path):
    models, _ = layout
    os.mkfifo(models / "x.gguf")
    out = _in_thread(lambda: resolve_shared(models, "x"))
    assert isinstance(out.get("error"), ModelPathError) and "regular file" in str(out["error"])
    # Opened directly (as if swapped in after a check), it is refused on fstat, not waited on.
    out = _in_thread(lambda: open_model(models / "x.gguf"))
    assert isinstance(out.get("error"), ModelPathError)
    facts = GgufFactsCache(tmp_path / "facts.json")
    out = _in_thread(lambda: facts.get(models / "x.gguf"))
    assert isinstance(out.get("error"), ModelPathError)
    reg = ModelRegistry(models, tmp_path / "shares.json", Identity.generate(), facts=facts)
    listed = {m["name"]: m for m in _in_thread(reg.list)["value"]}
    assert listed["x"]["usable"] is False and "regular file" in listed["x"]["problem"]


def test_open_model_never_follows_a_symlink(layout):
    models, outside = layout
    (models / "escape.gguf").symlink_to(outside)
    with pytest.raises(ModelPathError, match="cannot be opened as a plain file"):
        open_model(models / "escape.gguf")  # O_NOFOLLOW: even a path that skipped resolve_shared


def test_a_broken_gguf_is_parsed_once_until_it_changes(layout, tmp_path, monkeypatch):
    models, _ = layout
    (models / "tiny.gguf").unlink()  # only the broken file in the folder: every parse counted is its own
    good = write_tiny_gguf(tmp_path / "good.gguf").read_bytes()
    broken = models / "broken.gguf"
    broken.write_bytes(good[: len(good) // 2])  # truncated: right magic, header cut short
    calls = []
    real = gguf_facts.read_gguf_facts
    monkeypatch.setattr(gguf_facts, "read_gguf_facts", lambda src: calls.append(src) or real(src))
    facts = GgufFactsCache(tmp_path / "facts.json")
    reg = ModelRegistry(models, tmp_path / "shares.json", Identity.generate(), facts=facts)
    for _ in range(3):
        listed = {m["name"]: m for m in reg.list()}
        assert listed["broken"]["usable"] is False and "unreadable GGUF header" in listed["broken"]["problem"]
    assert len(calls) == 1  # remembered: listings do not parse it again
    again = GgufFactsCache(tmp_path / "facts.json")  # remembered across restarts too
    with pytest.raises(GgufUnreadable):
        again.get(broken.resolve())
    assert len(calls) == 1
    broken.write_bytes(good)  # fixed: parsed again, now readable
    listed = {m["name"]: m for m in reg.list()}
    assert listed["broken"]["usable"] is True and listed["broken"]["architecture"] == "llama"
    assert len(calls) == 2


def test_a_parse_that_hangs_gives_up_at_its_deadline(layout, monkeypatch):
    models, _ = layout
    release = threading.Event()
    monkeypatch.setattr(gguf_facts, "read_gguf_facts", lambda src: release.wait(30))
    with open_model(models / "tiny.gguf") as fh:
        started = time.monotonic()
        with pytest.raises(GgufUnreadable, match="longer than"):
            gguf_facts.parse_with_deadline(os.fdopen(os.dup(fh.fileno()), "rb"), timeout=0.5)
    assert time.monotonic() - started < 10
    release.set()


def _flip_same_size(path, *, keep_mtime: bool):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the size and mtime say nothing changed
    assert path.stat().st_size == st.st_size


def _wait_until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("how", ["in place, mtime restored", "renamed over"])
def test_a_same_size_swap_is_never_served_and_withdraws_the_share(layout, tmp_path, caplog, how):
    models, _ = layout
    reg = ModelRegistry(models, tmp_path / "shares.json", Identity.generate())
    reg.share("tiny")
    assert reg.served_path("tiny") == (models / "tiny.gguf").resolve()
    if how == "renamed over":
        data = bytearray((models / "tiny.gguf").read_bytes())
        data[-1] ^= 0xFF
        st = (models / "tiny.gguf").stat()
        (models / "new.tmp").write_bytes(bytes(data))
        os.utime(models / "new.tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(models / "new.tmp", models / "tiny.gguf")  # same size, same mtime, another inode
    else:
        _flip_same_size(models / "tiny.gguf", keep_mtime=True)
    with caplog.at_level(logging.WARNING, logger="pinkybrain.models"):
        with pytest.raises(ShareChanged):
            reg.served_path("tiny")  # noticed before it is served again
        assert _wait_until(lambda: not reg.shared_entries())  # the re-hash withdraws it
        # ...and says so in the log, a moment after the entry is gone (the re-hash's thread writes both).
        assert _wait_until(lambda: any("unshared model tiny" in r.getMessage() for r in caplog.records))
    assert reg.problems[-1]["model"] == "tiny" and "SHA-256" in reg.problems[-1]["reason"]
    with pytest.raises(ModelNotFound):
        reg.served_path("tiny")
    assert ModelRegistry(models, tmp_path / "shares.json", reg.identity).shared_entries() == []


def test_a_touched_but_unchanged_file_stays_shared(layout, tmp_path):
    models, _ = layout
    reg = ModelRegistry(models, tmp_path / "shares.json", Identity.generate())
    reg.share("tiny")
    os.utime(models / "tiny.gguf", ns=(0, 10**18))  # a new stamp, the same bytes
    with pytest.raises(ShareChanged):
        reg.served_path("tiny")
    assert _wait_until(lambda: _serves(reg, "tiny"))  # re-hashed: same content, served again
    assert reg.problems == [] and [e["name"] for e in reg.shared_entries()] == ["tiny"]


def _serves(reg, name) -> bool:
    try:
        reg.served_path(name)
    except ShareChanged:
        return False
    return True
