"""CRDT memory: the pure document (limits, convergence, refusal of bad updates) and its SQLite store
(durable acks across SIGKILL, compaction, corruption detection, namespaces)."""

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from pycrdt import Doc, Map, Text

from pinkybrain.node.core.memory_doc import MemoryDoc, MemoryLimitError, MemoryUpdateError
from pinkybrain.node.services.memory_store import (
    MemoryStore,
    MemoryStoreCorrupt,
    MemoryStoreError,
    MemoryStoreLocked,
    store_path,
)

JSON_VALUES = [
    "plain text",
    "",
    '"already quoted"',
    "ünïcødé ✓ 🧠",
    {"a": 1, "nested": {"list": [1, 2.5, None, True, False, "x"]}},
    [],
    [1, [2, [3]]],
    {},
    0,
    -17,
    2**60,
    3.14159,
    True,
    False,
    None,
]


def exchange(a: MemoryDoc, b: MemoryDoc) -> None:
    """Two-way Yjs sync by state vectors (steps 1 and 2 in both directions)."""
    b.apply_remote(a.diff(b.state_vector()))
    a.apply_remote(b.diff(a.state_vector()))


# -- the document ------------------------------------------------------------------------------------
def test_set_get_delete_and_prefix_listing():
    doc = MemoryDoc()
    for key in ["user/name", "user/lang", "project/x", "userland", "a"]:
        doc.set(key, key.upper())
    assert doc.get("user/name") == "USER/NAME"
    assert doc.list() == ["a", "project/x", "user/lang", "user/name", "userland"]
    assert doc.list("user/") == ["user/lang", "user/name"]
    assert doc.list("nothing") == []
    assert doc.items("user/") == [("user/lang", "USER/LANG"), ("user/name", "USER/NAME")]
    doc.set("user/name", "changed")
    assert doc.get("user/name") == "changed"
    assert len(doc) == 5 and "a" in doc
    doc.delete("user/name")
    assert "user/name" not in doc
    with pytest.raises(KeyError):
        doc.get("user/name")
    with pytest.raises(KeyError):
        doc.delete("user/name")
    assert doc.list("user/") == ["user/lang"]


@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
def test_json_and_string_values_round_trip(value):
    doc = MemoryDoc()
    doc.set("k", value)
    got = doc.get("k")
    assert got == value and type(got) is type(value)
    # ...and through a peer, which only sees the stored JSON text.
    peer = MemoryDoc()
    peer.apply_remote(doc.full_update())
    assert peer.get("k") == value and type(peer.get("k")) is type(value)


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), float("nan"), float("inf")], ids=repr)
def test_non_json_values_refused_without_changing_anything(value):
    doc = MemoryDoc()
    doc.set("k", "old")
    before = doc.full_update()
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        doc.set("k", value)
    assert doc.get("k") == "old" and doc.full_update() == before


def test_key_limit_counts_utf8_bytes():
    doc = MemoryDoc()
    doc.set("k" * 256, 1)
    assert doc.get("k" * 256) == 1
    with pytest.raises(MemoryLimitError, match=r"257 bytes.*limit is 256 bytes"):
        doc.set("k" * 257, 1)
    doc.set("é" * 128, 2)  # 128 characters, 256 bytes
    with pytest.raises(MemoryLimitError, match="257 bytes"):
        doc.set("é" * 128 + "a", 2)
    with pytest.raises(MemoryLimitError, match="258 bytes"):
        doc.set("€" * 86, 3)  # only 86 characters, but 3 bytes each
    with pytest.raises(ValueError, match="empty"):
        doc.set("", 1)
    with pytest.raises(TypeError):
        doc.set(7, 1)
    assert doc.list() == ["k" * 256, "é" * 128]  # code-point order
    small = MemoryDoc(max_key_bytes=4)
    small.set("abcd", 1)
    with pytest.raises(MemoryLimitError, match=r"5 bytes.*limit is 4 bytes"):
        small.set("abcde", 1)


def test_value_limit_is_on_the_json_encoding():
    doc = MemoryDoc()
    doc.set("fits", "x" * (65536 - 2))  # plus the two quotes: exactly 64 KiB
    with pytest.raises(MemoryLimitError, match=r"65537 bytes as JSON; the limit is 65536 bytes"):
        doc.set("over", "x" * (65536 - 1))
    with pytest.raises(MemoryLimitError, match="65538 bytes"):
        doc.set("over", "é" * 32768)  # 32768 characters, 65536 bytes + quotes
    assert doc.list() == ["fits"]
    small = MemoryDoc(max_value_bytes=10)
    small.set("k", [1, 2, 3, 4])  # "[1,2,3,4]" is 9 bytes
    with pytest.raises(MemoryLimitError, match=r"11 bytes as JSON; the limit is 10"):
        small.set("k", [1, 2, 3, 4, 5])
    assert small.get("k") == [1, 2, 3, 4]


def test_incremental_updates_converge():
    a, b = MemoryDoc(), MemoryDoc()
    for i in range(5):
        assert b.apply_remote(a.set(f"a{i}", i)) is True
    assert a.apply_remote(b.set("from-b", {"x": 1})) is True
    assert b.apply_remote(a.delete("a0")) is True
    assert a.items() == b.items()
    assert a.list() == ["a1", "a2", "a3", "a4", "from-b"]
    # Each update is only that write: it is small, and re-applying it changes nothing.
    update = a.set("a1", "new")
    assert len(update) < 100
    assert b.apply_remote(update) is True
    assert b.apply_remote(update) is False
    assert b.get("a1") == "new"


def test_concurrent_writes_to_one_key_converge_in_any_order():
    base = MemoryDoc()
    base.set("shared", "initial")
    a, b = MemoryDoc(), MemoryDoc()
    a.apply_remote(base.full_update())
    b.apply_remote(base.full_update())
    ua = a.set("shared", "from a")
    ub = b.set("shared", {"from": "b"})
    # Two more replicas receive the two writes in opposite orders.
    c, d = MemoryDoc(), MemoryDoc()
    for doc in (c, d):
        doc.apply_remote(base.full_update())
    c.apply_remote(ua)
    c.apply_remote(ub)
    d.apply_remote(ub)
    d.apply_remote(ua)
    a.apply_remote(ub)
    b.apply_remote(ua)
    winner = a.get("shared")
    assert winner in ("from a", {"from": "b"})
    assert [x.get("shared") for x in (b, c, d)] == [winner] * 3
    assert a.items() == b.items() == c.items() == d.items()


def test_state_vector_diff_sync():
    a, b = MemoryDoc(), MemoryDoc()
    for i in range(20):
        a.set(f"k{i:02}", {"i": i, "pad": "p" * 200})
    a.delete("k03")
    b.set("only-b", "b")
    exchange(a, b)
    assert a.items() == b.items()
    assert len(a) == 20 and b.get("k19")["i"] == 19 and a.get("only-b") == "b"
    # A peer that is up to date is sent nothing new.
    assert b.apply_remote(a.diff(b.state_vector())) is False
    # The diff only carries what the peer lacks.
    a.set("late", "x")
    assert len(a.full_update()) > 4000 and len(a.diff(b.state_vector())) < 100
    b.apply_remote(a.diff(b.state_vector()))
    assert b.get("late") == "x"
    with pytest.raises(MemoryUpdateError):
        a.diff(b"\xff\xff\xff")


def _raw_doc_update(write) -> bytes:
    """An update made with pycrdt directly, bypassing MemoryDoc's checks (what a bad peer could send)."""
    raw = Doc()
    write(raw)
    return raw.get_update()


def _bad_updates() -> dict[str, bytes]:
    good = MemoryDoc()
    good.set("pre", 1)
    valid = good.set("key", {"hello": "world"})
    rng = random.Random(7)
    bad = {f"random-{n}": rng.randbytes(n) for n in (1, 2, 5, 16, 64, 300)}
    bad.update({f"truncated-{n}": valid[:n] for n in range(1, len(valid), 3)})
    bad["not-json"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k", "not json {"))
    bad["nan-constant"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k", "NaN"))
    bad["number-not-text"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k", 42))
    bad["null-not-text"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k", None))
    bad["nested-map"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k", Map({"a": "1"})))
    bad["long-key"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k" * 257, '"v"'))
    bad["empty-key"] = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("", '"v"'))
    bad["huge-value"] = _raw_doc_update(
        lambda d: d.get("memory", type=Map).__setitem__("k", json.dumps("x" * 70000))
    )
    bad["other-root"] = _raw_doc_update(lambda d: d.get("elsewhere", type=Text).insert(0, "sneaky"))
    bad["memory-as-text"] = _raw_doc_update(lambda d: d.get("memory", type=Text).insert(0, "sneaky"))

    def valid_and_invalid(d: Doc) -> None:  # one good entry must not smuggle in a bad one
        m = d.get("memory", type=Map)
        m["fine"] = '"ok"'
        m["bad"] = "{{{"

    bad["mixed"] = _raw_doc_update(valid_and_invalid)
    return bad


@pytest.mark.parametrize("name", sorted(_bad_updates()))
def test_bad_remote_updates_refused_and_document_unchanged(name):
    update = _bad_updates()[name]
    doc = MemoryDoc()
    # Not "k": a concurrent bad write to a key the document holds may lose the Yjs conflict and stay
    # invisible, which is harmless but would not exercise the refusal.
    doc.set("existing", {"keep": True})
    doc.set("mine", "mine")
    before_state, before_items = doc.full_update(), doc.items()
    with pytest.raises(MemoryUpdateError):
        doc.apply_remote(update)
    assert doc.full_update() == before_state
    assert doc.items() == before_items
    # The document still works and still syncs after the refusal.
    peer = MemoryDoc()
    peer.apply_remote(doc.set("after", 1))
    assert peer.get("after") == 1


def test_raw_update_with_valid_json_is_accepted():
    # The same raw path with proper JSON text is fine: the refusals above are about content, not origin.
    update = _raw_doc_update(lambda d: d.get("memory", type=Map).__setitem__("k", '{"a":[1,2]}'))
    doc = MemoryDoc()
    assert doc.apply_remote(update) is True
    assert doc.get("k") == {"a": [1, 2]}


# -- the store ---------------------------------------------------------------------------------------
def test_store_round_trip_and_reopen(tmp_path):
    with MemoryStore.open(tmp_path, "private") as store:
        for i, value in enumerate(JSON_VALUES):
            store.set(f"v/{i:02}", value)
        store.set("gone", 1)
        store.delete("gone")
        with pytest.raises(KeyError):
            store.get("gone")
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.items("v/") == [(f"v/{i:02}", v) for i, v in enumerate(JSON_VALUES)]
        assert "gone" not in store
        assert store.update_count == len(JSON_VALUES) + 2


def test_store_enforces_configured_limits(tmp_path):
    with MemoryStore.open(tmp_path, "private", max_key_bytes=8, max_value_bytes=16) as store:
        store.set("12345678", "x" * 14)
        with pytest.raises(MemoryLimitError, match="limit is 8 bytes"):
            store.set("123456789", 1)
        with pytest.raises(MemoryLimitError, match="17 bytes as JSON; the limit is 16"):
            store.set("k", "x" * 15)
        assert store.update_count == 1  # refused writes are not logged
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.list() == ["12345678"]


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pinkybrain.node.services.memory_store import MemoryStore

    store = MemoryStore.open(Path(sys.argv[1]), "private", compact_every=int(sys.argv[2]))
    i = 0
    while True:
        store.set(f"key{i:05}", {"i": i, "pad": "p" * 200})
        print(f"ACK {i}", flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("compact_every", [1000, 7])
def test_acked_writes_survive_sigkill(tmp_path, compact_every):
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(compact_every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked = -1
    try:
        for line in proc.stdout:
            acked = int(line.split()[1])
            if acked >= 40:
                break
        proc.send_signal(signal.SIGKILL)  # right after the ACK: no chance to close or checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert acked >= 40, proc.stderr.read()
    with MemoryStore.open(tmp_path, "private") as store:
        for i in range(acked + 1):
            assert store.get(f"key{i:05}") == {"i": i, "pad": "p" * 200}
        # The write in flight at the kill is either all there or not at all; nothing else appeared.
        assert set(store.list()) - {f"key{i:05}" for i in range(acked + 2)} == set()


def _log_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM updates").fetchone()[0]
    finally:
        conn.close()


def test_compaction_keeps_data_and_shrinks_the_log(tmp_path):
    with MemoryStore.open(tmp_path, "private") as store:
        for i in range(60):
            store.set(f"k{i % 20:02}", {"round": i // 20, "i": i})
        store.delete("k00")
        expected = store.items()
        assert store.update_count == 61
        store.compact()
        assert store.update_count == 0
        assert store.items() == expected
        store.set("after", True)
        expected = store.items()
    path = store_path(tmp_path, "private")
    assert _log_rows(path) == 1
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.items() == expected
        assert len(store) == 20


def test_compaction_runs_automatically(tmp_path):
    with MemoryStore.open(tmp_path, "private", compact_every=10) as store:
        for i in range(25):
            store.set(f"k{i:02}", i)
        assert store.update_count == 5
    assert _log_rows(store_path(tmp_path, "private")) == 5
    with MemoryStore.open(tmp_path, "private", compact_every=10) as store:
        assert store.items() == [(f"k{i:02}", i) for i in range(25)]


def _filled_store(directory: Path) -> Path:
    with MemoryStore.open(directory, "private") as store:
        for i in range(200):
            store.set(f"key/{i:03}", {"i": i, "text": f"value {i} " * 60})
    path = store_path(directory, "private")
    assert not Path(f"{path}-wal").exists()  # closed cleanly: everything is in the main file
    return path


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = random.Random(99).randbytes(4096)
    path.write_bytes(bytes(data))


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _truncate_odd(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1000)


def _truncate_empty(path: Path) -> None:
    os.truncate(path, 0)


def _garbage_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\x00" * 64)


@pytest.mark.parametrize("damage", [_overwrite_middle, _truncate_half, _truncate_odd, _truncate_empty,
                                    _garbage_header], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_store_detected_and_left_untouched(tmp_path, damage):
    path = _filled_store(tmp_path)
    damage(path)
    damaged = path.read_bytes()
    with pytest.raises(MemoryStoreCorrupt) as info:
        MemoryStore.open(tmp_path, "private")
    message = str(info.value)
    assert str(path) in message
    assert f"mv {path} {path}.corrupt" in message and "restart" in message and "peers will resync" in message
    assert info.value.path == path
    assert path.read_bytes() == damaged  # not repaired, emptied or replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # The way out works: moved aside, a fresh store opens and the damaged copy is still there.
    path.rename(f"{path}.corrupt")
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.list() == []
    assert Path(f"{path}.corrupt").read_bytes() == damaged


def _tamper(path: Path, sql: str, *params) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def test_checksum_mismatch_detected(tmp_path):
    path = _filled_store(tmp_path)
    conn = sqlite3.connect(path)
    flipped = bytearray(conn.execute("SELECT data FROM updates WHERE seq = 50").fetchone()[0])
    conn.close()
    flipped[len(flipped) // 2] ^= 0x01  # one bit: still a decodable update, so only the digest can tell
    _tamper(path, "UPDATE updates SET data = ? WHERE seq = 50", bytes(flipped))
    with pytest.raises(MemoryStoreCorrupt, match=r"update #50 fails its SHA-256 check.*peers will resync"):
        MemoryStore.open(tmp_path, "private")
    # A row whose type changed (it reads back as text SQLite cannot even decode) is damage too.
    _tamper(path, "UPDATE updates SET data = CAST(x'ff00fe' AS TEXT) WHERE seq = 50")
    with pytest.raises(MemoryStoreCorrupt, match=r"update #50 fails its SHA-256 check"):
        MemoryStore.open(tmp_path, "private")


def test_update_that_does_not_apply_detected(tmp_path):
    path = _filled_store(tmp_path)
    junk = b"\x07\x07 definitely not a yjs update"
    _tamper(path, "INSERT INTO updates (data, sha256, origin) VALUES (?, ?, 'remote')",
            junk, hashlib.sha256(junk).digest())
    with pytest.raises(MemoryStoreCorrupt, match="do not form a valid document"):
        MemoryStore.open(tmp_path, "private")


def test_orphaned_wal_refused(tmp_path):
    wal = Path(f"{store_path(tmp_path, 'private')}-wal")
    wal.write_bytes(b"leftover log")
    with pytest.raises(MemoryStoreCorrupt, match="write-ahead log"):
        MemoryStore.open(tmp_path, "private")
    assert wal.read_bytes() == b"leftover log"
    assert not store_path(tmp_path, "private").exists()


def test_namespaces_are_separate_files(tmp_path):
    private = MemoryStore.open(tmp_path, "private")
    public = MemoryStore.open(tmp_path, "public")
    try:
        assert private.path != public.path
        private.set("secret", "only here")
        public.set("shared", "everyone")
        assert private.list() == ["secret"] and public.list() == ["shared"]
        with pytest.raises(KeyError):
            public.get("secret")
    finally:
        private.close()
        public.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory-private.sqlite3", "memory-public.sqlite3"]
    with MemoryStore.open(tmp_path, "public") as public:
        assert public.list() == ["shared"]
    for bad in ("../x", "", "Private", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="namespace"):
            MemoryStore.open(tmp_path, bad)


def test_second_open_is_refused_while_in_use(tmp_path):
    with MemoryStore.open(tmp_path, "private") as store:
        store.set("k", 1)
        with pytest.raises(MemoryStoreLocked, match="already running"):
            MemoryStore.open(tmp_path, "private")
        store.set("k", 2)  # the owner is unaffected
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.get("k") == 2


def test_listeners_get_each_durable_local_update(tmp_path):
    peer = MemoryDoc()
    seen: list[bytes] = []
    with MemoryStore.open(tmp_path, "private") as store:
        remove = store.add_listener(seen.append)
        store.add_listener(lambda update: 1 / 0)  # a failing listener neither breaks writes nor others
        update = store.set("a", 1)
        store.delete("a")
        store.set("b", 2)
        assert seen[0] == update and len(seen) == 3
        for u in seen:
            peer.apply_remote(u)
        assert peer.items() == store.items() == [("b", 2)]
        other = MemoryDoc()
        store.apply_remote(other.set("remote", 1))
        assert len(seen) == 3  # remote updates are not echoed to listeners
        remove()
        store.set("c", 3)
        assert len(seen) == 3


def test_store_apply_remote_persists_and_refuses_garbage(tmp_path):
    a = MemoryDoc()
    with MemoryStore.open(tmp_path, "private") as store:
        update = a.set("from-peer", {"x": 1})
        assert store.apply_remote(update) is True
        assert store.apply_remote(update) is False  # a duplicate is neither applied nor logged twice
        assert store.update_count == 1
        with pytest.raises(MemoryUpdateError):
            store.apply_remote(b"\x01\x02garbage")
        with pytest.raises(MemoryUpdateError):
            store.apply_remote(_bad_updates()["not-json"])
        assert store.update_count == 1
        b = MemoryDoc()
        b.apply_remote(store.diff(b.state_vector()))
        assert b.items() == [("from-peer", {"x": 1})]
        assert store.state_vector() == a.state_vector()
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.get("from-peer") == {"x": 1}
        assert MemoryDoc().apply_remote(store.full_update()) is True


def test_concurrent_writers_from_threads(tmp_path):
    with MemoryStore.open(tmp_path, "private", compact_every=25) as store:
        errors: list[BaseException] = []

        def writer(t: int) -> None:
            try:
                for i in range(30):
                    store.set(f"t{t}/{i:02}", i)
                    store.get(f"t{t}/{i:02}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert len(store) == 120
    with MemoryStore.open(tmp_path, "private") as store:
        assert len(store) == 120 and store.get("t3/29") == 29


def test_closed_store_refuses_use(tmp_path):
    store = MemoryStore.open(tmp_path, "private")
    store.close()
    store.close()  # idempotent
    with pytest.raises(MemoryStoreError, match="closed"):
        store.get("k")



class _FailingInserts:
    """Connection stand-in whose log appends fail, as on a full or failing disk."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, *args):
        if sql.startswith("INSERT INTO updates"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_failed_append_is_not_acked_or_visible(tmp_path):
    seen: list[bytes] = []
    with MemoryStore.open(tmp_path, "private") as store:
        store.set("kept", 1)
        store.add_listener(seen.append)
        real = store._conn
        store._conn = _FailingInserts(real)
        with pytest.raises(MemoryStoreError, match="disk is full"):
            store.set("lost", 2)
        with pytest.raises(MemoryStoreError, match="disk is full"):
            store.apply_remote(MemoryDoc().set("remote-lost", 3))
        # Readers never see what a restart would not bring back, and peers were not told about it.
        assert store.items() == [("kept", 1)]
        assert seen == []
        store._conn = real
        store.set("later", 4)
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.items() == [("kept", 1), ("later", 4)]


# -- group commit -------------------------------------------------------------------------------------
def test_write_batch_is_one_commit_and_refuses_ops_one_by_one(tmp_path):
    with MemoryStore.open(tmp_path, "private", max_value_bytes=64) as store:
        before = store.commits
        results = store.write_batch([
            ("set", "a", 1), ("set", "big", "x" * 500), ("delete", "absent", None), ("set", "b", 2),
        ])
        assert isinstance(results[0], bytes) and isinstance(results[3], bytes)
        assert isinstance(results[1], ValueError) and isinstance(results[2], KeyError)
        assert store.commits == before + 1
        assert store.items() == [("a", 1), ("b", 2)]
    with MemoryStore.open(tmp_path, "private") as store:
        assert store.items() == [("a", 1), ("b", 2)]


def test_concurrent_api_writes_share_commits(tmp_path):
    import asyncio

    from pinkybrain.node.services.memory_writes import committer_for

    async def burst(store):
        committer = committer_for(store)
        await asyncio.gather(*(committer.set(f"k{i:03}", i) for i in range(200)))
        with pytest.raises(KeyError):
            await committer.delete("never-there")

    with MemoryStore.open(tmp_path, "private") as store:
        asyncio.run(burst(store))
        assert len(store.list()) == 200
        assert store.commits < 200  # writes that waited for a commit in flight went in together
    with MemoryStore.open(tmp_path, "private") as store:
        assert [store.get(f"k{i:03}") for i in range(200)] == list(range(200))


_BURST_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from pinkybrain.node.services.memory_store import MemoryStore
    from pinkybrain.node.services.memory_writes import committer_for

    store = MemoryStore.open(Path(sys.argv[1]), "private")
    committer = committer_for(store)

    async def writer(w):
        i = 0
        while True:
            await committer.set(f"w{w:02}-{i:05}", {"w": w, "i": i})
            print(f"ACK {w} {i}", flush=True)
            i += 1

    async def main():
        await asyncio.gather(*(writer(w) for w in range(16)))

    asyncio.run(main())
    """
)


def test_acked_writes_survive_sigkill_in_a_concurrent_burst(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _BURST_CHILD, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: set[tuple[int, int]] = set()
    try:
        for line in proc.stdout:
            parts = line.split()
            if len(parts) != 3 or parts[0] != "ACK":
                continue  # a line the kill cut short acknowledges nothing
            acked.add((int(parts[1]), int(parts[2])))
            if len(acked) >= 400:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 400, proc.stderr.read()
    with MemoryStore.open(tmp_path, "private") as store:
        lost = [(w, i) for w, i in acked
                if f"w{w:02}-{i:05}" not in store or store.get(f"w{w:02}-{i:05}") != {"w": w, "i": i}]
        assert lost == []
