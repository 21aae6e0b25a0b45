"""The conversation store: record/list, blind-index search, export, privacy, retention, encryption at rest,
wrong key and damaged files, crash safety (SIGKILL mid-write) and concurrent writers."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pinkybrain.node.services import conversations as conv
from pinkybrain.node.services.conversations import (
    DAY_SECS,
    ConversationStore,
    ConversationStoreError,
    CorruptStoreError,
    WrongKeyError,
)

KEY = bytes(range(32))


@pytest.fixture
def store(tmp_path):
    s = ConversationStore.open(tmp_path / "conv", KEY)
    yield s
    s.close()


def rec(store, sid, prompt, answer="ok", **kw):
    kw.setdefault("mode", "single")
    kw.setdefault("specialists", [])
    kw.setdefault("model", None)
    kw.setdefault("node_id", None)
    return store.record(sid, prompt, answer, **kw)


# -- record and list ----------------------------------------------------------------------------------


def test_record_creates_session_and_lists_it(store):
    r = rec(store, None, "What is the capital of France?", "Paris.", model="gemma", node_id="NODE-1",
            specialists=["geo"], meta={"latency_ms": 42})
    assert len(r["session_id"]) >= 16 and conv._SESSION_ID.fullmatch(r["session_id"])
    assert r["new_session"] and r["privacy"] == "private"
    assert len(r["message_ids"]) == 2 and r["message_ids"][0] < r["message_ids"][1]
    r2 = rec(store, r["session_id"], "And of Italy?", "Rome.")
    assert not r2["new_session"] and r2["session_id"] == r["session_id"]

    sessions = store.list_sessions()
    assert len(sessions) == 1
    s = sessions[0]
    assert s["id"] == r["session_id"] and s["message_count"] == 4 and s["privacy"] == "private"
    assert s["title"] == "What is the capital of France?"
    assert s["created_at"] <= s["updated_at"]


def test_list_orders_by_last_update_with_paging_and_title_cut(store):
    long_prompt = "word " * 40 + "\nsecond line"
    rec(store, "a", long_prompt)
    rec(store, "b", "second")
    rec(store, "a", "a again")  # a becomes the most recent
    listed = store.list_sessions()
    assert [s["id"] for s in listed] == ["a", "b"]
    assert listed[0]["title"] == " ".join(long_prompt.split())[:60] and len(listed[0]["title"]) == 60
    assert [s["id"] for s in store.list_sessions(limit=1, offset=1)] == ["b"]
    assert store.list_sessions(offset=5) == []
    with pytest.raises(ValueError):
        store.list_sessions(limit=0)
    with pytest.raises(ValueError):
        store.list_sessions(offset=-1)


@pytest.mark.parametrize("bad", ["", "x" * 65, "a/b", "a b", "../etc", "café", "id\n", "a.b", 12])
def test_invalid_session_ids_are_refused(store, bad):
    with pytest.raises(ValueError, match="session id"):
        rec(store, bad, "hello")
    assert store.list_sessions() == []


def test_valid_session_id_forms(store):
    for sid in ["a", "x" * 64, "Az09_-", "-_-"]:
        assert rec(store, sid, "hi")["session_id"] == sid
    assert len(store.list_sessions()) == 4


def test_record_validates_arguments(store):
    with pytest.raises(ValueError, match="JSON"):
        rec(store, "s", "hi", meta={"x": object()})
    with pytest.raises(ValueError):
        rec(store, "s", b"bytes")
    with pytest.raises(ValueError):
        rec(store, "s", "hi", specialists="geo")
    with pytest.raises(ValueError):
        rec(store, "s", "hi", mode="")
    assert store.list_sessions() == []


# -- search -------------------------------------------------------------------------------------------


def test_search_finds_words_in_prompt_and_answer(store):
    r = rec(store, "phys", "Explain quantum computing", "Qubits hold superpositions of zero and one.")
    rec(store, "cook", "How do I bake bread?", "Knead the dough, let it rise.")
    hits = store.search("quantum")
    assert [(h["session_id"], h["role"], h["message_id"]) for h in hits] == [("phys", "user", r["message_ids"][0])]
    assert "quantum" in hits[0]["snippet"]
    hits = store.search("superpositions")
    assert [(h["session_id"], h["role"], h["message_id"]) for h in hits] == [
        ("phys", "assistant", r["message_ids"][1])
    ]
    hit = hits[0]
    assert set(hit) >= {"session_id", "message_id", "role", "snippet", "created_at", "score"}
    assert hit["score"] > 0 and hit["created_at"] > 0
    assert store.search("dough")[0]["session_id"] == "cook"
    assert store.search("nonexistentword") == []


def test_search_is_and_and_case_insensitive(store):
    rec(store, "s1", "red apple", "green pear")
    rec(store, "s2", "red apple and green pear", "fruit")
    both = store.search("apple pear")
    assert [h["session_id"] for h in both] == ["s2"]  # s1 has them in different messages
    assert [h["session_id"] for h in store.search("APPLE PeAr")] == ["s2"]
    assert {h["session_id"] for h in store.search("Red")} == {"s1", "s2"}
    assert store.search("apple banana") == []


def test_search_unicode_words(store):
    rec(store, "u", "Un café crème à Paris", "Привет, мир! हिन्दी भाषा. Die Straße. 量子计算机")
    assert store.search("CAFÉ")[0]["role"] == "user"
    assert store.search("cafe\u0301")  # decomposed é is the same word
    assert store.search("crème paris")
    assert store.search("привет МИР")[0]["role"] == "assistant"
    assert store.search("हिन्दी")  # combining vowel signs stay inside the word
    assert store.search("STRASSE")  # case folding: ß == ss
    assert store.search("计算")  # CJK: one token per ideograph
    assert store.search("cafe") == []  # accents matter


@pytest.mark.parametrize("query", [
    '"quantum', 'quantum"', "AND", "OR", "NOT", "NEAR", "NEAR(a b)", "*", "qu*", "-x", "^start", "a:b",
    "(", ")", "{a b}", "'; DROP TABLE sessions; --", "", "   ", "\x00", "🙂", "a" * 5000, " ".join(["w"] * 500),
    "col:quantum", "+", "\\", "%", "_",
])
def test_tricky_queries_never_raise(store, query):
    rec(store, "s", "quantum and or not near", "x")
    hits = store.search(query)
    assert isinstance(hits, list)
    assert store.list_sessions()[0]["id"] == "s"  # nothing was dropped


def test_tricky_queries_are_literal(store):
    rec(store, "s", "bread AND butter", "x")
    assert store.search('"quantum') == []
    assert store.search('"bread')[0]["role"] == "user"
    assert store.search("AND")  # searched as the word "and"
    assert store.search("-butter")  # not a NOT operator
    assert store.search("bread*")  # punctuation is ignored, the word is still searched


def test_search_ranking_limit_and_privacy_filter(store):
    rec(store, "long", "needle " + "filler " * 50 + "padding words here", "x")
    rec(store, "short", "needle haystack", "x")
    hits = store.search("needle")
    assert [h["session_id"] for h in hits] == ["short", "long"]  # BM25: shorter message first
    assert hits[0]["score"] > hits[1]["score"]
    assert len(store.search("needle", limit=1)) == 1
    store.set_privacy("long", "public")
    assert [h["session_id"] for h in store.search("needle", privacy="public")] == ["long"]
    assert {h["session_id"] for h in store.search("needle", privacy=["private", "public"])} == {"long", "short"}
    assert [s["id"] for s in store.list_sessions(privacy="public")] == ["long"]
    assert store.search("needle", privacy=[]) == [] and store.list_sessions(privacy=[]) == []
    with pytest.raises(ValueError):
        store.search("needle", privacy="secret")


def test_snippet_windows_long_text(store):
    text = "lorem ipsum " * 100 + "the needle is here " + "dolor sit " * 100
    rec(store, "s", "q", text)
    snippet = store.search("needle")[0]["snippet"]
    assert "needle" in snippet and snippet.startswith("…") and snippet.endswith("…")
    assert len(snippet) <= conv.SNIPPET_CHARS + 2


# -- export -------------------------------------------------------------------------------------------


def test_export_json_and_markdown(store):
    rec(store, "e", "First *question*", "First answer", model="gemma", specialists=["math"], node_id="N1",
        meta={"tokens": 7})
    rec(store, "e", "Second question", "Second answer", mode="vote")
    doc = json.loads(store.export("e", "json"))
    assert doc["session"]["id"] == "e" and doc["session"]["message_count"] == 4
    msgs = doc["messages"]
    assert [(m["role"], m["text"]) for m in msgs] == [
        ("user", "First *question*"), ("assistant", "First answer"),
        ("user", "Second question"), ("assistant", "Second answer"),
    ]
    assert msgs[1]["model"] == "gemma" and msgs[1]["specialists"] == ["math"] and msgs[1]["meta"] == {"tokens": 7}
    assert msgs[3]["mode"] == "vote"

    md = store.export("e", "markdown")
    assert md.startswith("# First *question*\n")
    for text in ["First *question*", "First answer", "Second question", "Second answer", "`e`", "gemma"]:
        assert text in md
    assert md.index("First answer") < md.index("Second question")


def test_export_unknown_session_and_format(store):
    with pytest.raises(KeyError, match="no conversation 'nope'"):
        store.export("nope", "json")
    rec(store, "e", "hi")
    with pytest.raises(ValueError, match="json, markdown"):
        store.export("e", "pdf")


# -- privacy ------------------------------------------------------------------------------------------


def test_set_privacy(store):
    rec(store, "p", "hi")
    for level in ["peers-only", "public", "private"]:
        assert store.set_privacy("p", level) == {"session_id": "p", "privacy": level}
        assert store.list_sessions()[0]["privacy"] == level
    with pytest.raises(ValueError, match="private, peers-only, public"):
        store.set_privacy("p", "everyone")
    with pytest.raises(KeyError, match="no conversation 'ghost'"):
        store.set_privacy("ghost", "public")


def test_default_privacy(tmp_path):
    with ConversationStore.open(tmp_path, KEY, default_privacy="peers-only") as s:
        assert rec(s, "d", "hi")["privacy"] == "peers-only"
        assert s.list_sessions()[0]["privacy"] == "peers-only"
    with pytest.raises(ValueError, match="privacy"):
        ConversationStore.open(tmp_path, KEY, default_privacy="world")


def test_delete_session(store):
    rec(store, "gone", "secret plans", "x")
    rec(store, "kept", "other plans", "x")
    assert store.delete_session("gone") == 2
    assert [s["id"] for s in store.list_sessions()] == ["kept"]
    assert store.search("secret") == []
    assert [h["session_id"] for h in store.search("plans")] == ["kept"]
    with pytest.raises(KeyError):
        store.delete_session("gone")


# -- retention ----------------------------------------------------------------------------------------


def test_retention_purge_with_fake_now(tmp_path):
    with ConversationStore.open(tmp_path, KEY, retention_days=90) as s:
        rec(s, "old", "ancient history", "x")
        rec(s, "new", "fresh news", "x")
        now = time.time()
        assert s.purge_expired(now=now + 89 * DAY_SECS) == 0
        # Only "old" is past retention: bring "new" forward by recording into it "later".
        s._conn.execute("UPDATE sessions SET updated_at = updated_at + ? WHERE id = 'new'", (30 * DAY_SECS,))
        assert s.purge_expired(now=now + 91 * DAY_SECS) == 1
        assert [x["id"] for x in s.list_sessions()] == ["new"]
        assert s.search("ancient") == []
        with pytest.raises(KeyError):
            s.export("old")
        assert s.search("fresh")


def test_retention_zero_keeps_forever(tmp_path):
    with ConversationStore.open(tmp_path, KEY, retention_days=0) as s:
        rec(s, "k", "keep me")
        assert s.purge_expired(now=time.time() + 3650 * DAY_SECS) == 0
        assert len(s.list_sessions()) == 1
    with pytest.raises(ValueError):
        ConversationStore.open(tmp_path, KEY, retention_days=-1)


def test_purge_runs_at_open(tmp_path):
    with ConversationStore.open(tmp_path, KEY) as s:
        rec(s, "stale", "old words")
        rec(s, "live", "new words")
        s._conn.execute("UPDATE sessions SET updated_at = updated_at - ? WHERE id = 'stale'", (100 * DAY_SECS,))
    with ConversationStore.open(tmp_path, KEY, retention_days=90) as s:
        assert [x["id"] for x in s.list_sessions()] == ["live"]
        assert [h["session_id"] for h in s.search("words")] == ["live"]


# -- encryption at rest -------------------------------------------------------------------------------


def _raw_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_text_is_not_on_disk(tmp_path):
    marker = "zebracornflux" + os.urandom(4).hex()
    d = tmp_path / "conv"
    s = ConversationStore.open(d, KEY)
    rec(s, "enc", f"tell me about {marker} please", f"{marker.upper()} is a {marker}",
        meta={"note": marker}, model="m")
    assert s.search(marker)  # indexed, searchable
    files = _raw_files(d)
    assert any(name.endswith("-wal") for name in files)  # the write is (at least) in the WAL now
    needles = [marker.encode(), marker.upper().encode(), marker.encode("utf-16-le"), b"tell me about"]
    for name, data in files.items():
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {name}"
    s.close()
    for name, data in _raw_files(d).items():  # after the checkpoint at close
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {name}"
    with ConversationStore.open(d, KEY) as s:
        assert s.search(marker)[0]["session_id"] == "enc"


def test_tampered_ciphertext_is_detected(tmp_path):
    with ConversationStore.open(tmp_path, KEY) as s:
        rec(s, "a", "alpha text", "x")
        rec(s, "b", "beta text", "x")
        # Swap the two prompts' ciphertexts: each is bound to its own row, so both fail to open.
        rows = s._conn.execute("SELECT id, body FROM messages WHERE role = 'user' ORDER BY id").fetchall()
        s._conn.execute("UPDATE messages SET body = ? WHERE id = ?", (rows[1][1], rows[0][0]))
        with pytest.raises(CorruptStoreError, match="fails authentication"):
            s.export("a")
        assert [h["session_id"] for h in s.search("text")] == ["b"]  # the bad row is left out, not fatal


def test_wrong_key_is_a_clear_error(tmp_path):
    with ConversationStore.open(tmp_path, KEY) as s:
        rec(s, "x", "hello")
    with pytest.raises(WrongKeyError, match=r"conversations\.db: the key does not open"):
        ConversationStore.open(tmp_path, bytes(32))
    with ConversationStore.open(tmp_path, KEY) as s:  # the store is untouched by the failed open
        assert s.list_sessions()[0]["id"] == "x"
    with pytest.raises(ValueError, match="32 bytes"):
        ConversationStore.open(tmp_path, b"short")


def test_corrupt_file_is_a_clear_error_and_not_recreated(tmp_path):
    path = tmp_path / conv.DB_NAME
    garbage = b"this is not an sqlite file at all" * 200
    path.write_bytes(garbage)
    with pytest.raises(CorruptStoreError) as info:
        ConversationStore.open(tmp_path, KEY)
    assert str(path) in str(info.value)
    assert path.read_bytes() == garbage  # left alone for inspection


def test_damaged_pages_are_a_clear_error(tmp_path):
    with ConversationStore.open(tmp_path, KEY) as s:
        for i in range(300):
            rec(s, f"s{i}", f"message number {i} " + "filler " * 50)
    path = tmp_path / conv.DB_NAME
    data = bytearray(path.read_bytes())
    data[4096:len(data)] = os.urandom(len(data) - 4096)  # keep the header page, wreck the rest
    path.write_bytes(bytes(data))
    with pytest.raises(ConversationStoreError) as info:
        with ConversationStore.open(tmp_path, KEY) as s:
            s.list_sessions(limit=1000)
            s.search("filler")
    assert str(path) in str(info.value)


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / conv.DB_NAME
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE notes (x)")
    other.commit()
    other.close()
    with pytest.raises(CorruptStoreError, match="not a conversation store"):
        ConversationStore.open(tmp_path, KEY)


def test_index_rebuilt_when_tokenizer_version_changes(tmp_path):
    with ConversationStore.open(tmp_path, KEY) as s:
        rec(s, "r", "rebuild me", "please")
        s._conn.execute("UPDATE meta SET value = 0 WHERE name = 'index_version'")
        s._conn.execute("INSERT INTO message_index(message_index) VALUES ('delete-all')")
        assert s.search("rebuild") == []
    with ConversationStore.open(tmp_path, KEY) as s:
        assert s.search("rebuild")[0]["session_id"] == "r"
        assert s._conn.execute("SELECT value FROM meta WHERE name = 'index_version'").fetchone()[0] == 1


def test_closed_store_refuses(tmp_path):
    s = ConversationStore.open(tmp_path, KEY)
    s.close()
    s.close()  # idempotent
    with pytest.raises(ConversationStoreError, match="closed"):
        s.list_sessions()


# -- durability and concurrency -----------------------------------------------------------------------

_CHILD = """
import sys
from pathlib import Path
from pinkybrain.node.services.conversations import ConversationStore

store = ConversationStore.open(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
i = int(sys.argv[3])
while True:
    r = store.record("crash", f"prompt {i} mark{i}x", "answer " * 200 + f"ans{i}x", mode="single",
                     specialists=[], model=None, node_id=None)
    print(i, *r["message_ids"], flush=True)
    i += 1
"""


def test_sigkill_mid_write_keeps_every_acknowledged_record(tmp_path):
    d = tmp_path / "conv"
    acked: dict[int, list[int]] = {}
    rng = random.Random(7)

    def take_ack(line: str) -> None:
        # An acknowledgement is a whole line "i user_id answer_id"; one the kill cut short was never received.
        fields = line.split()
        if line.endswith("\n") and len(fields) == 3:
            i, *ids = map(int, fields)
            acked[i] = ids

    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(d), KEY.hex(), str(round_ * 100_000)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            target = len(acked) + rng.randint(5, 25)
            deadline = time.monotonic() + 60
            while len(acked) < target and time.monotonic() < deadline:
                line = child.stdout.readline()
                if not line:
                    break
                take_ack(line)
            time.sleep(rng.random() * 0.01)  # land the kill at an arbitrary point of a write
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            for line in child.stdout.read().splitlines(keepends=True):  # acked before the kill, still in the pipe
                take_ack(line)
        finally:
            if child.poll() is None:
                child.kill()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 15

    with ConversationStore.open(d, KEY) as s:
        session = s.get_session("crash")
        by_id = {m["id"]: m for m in session["messages"]}
        for i, (uid, aid) in acked.items():
            assert by_id[uid]["text"] == f"prompt {i} mark{i}x"
            assert by_id[aid]["text"].endswith(f"ans{i}x")
        # No half-written exchange: every stored prompt has its answer and the count agrees.
        assert session["message_count"] == len(session["messages"])
        assert len(session["messages"]) % 2 == 0
        assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * (len(session["messages"]) // 2)
        i = max(acked)
        assert [h["message_id"] for h in s.search(f"mark{i}x")] == [acked[i][0]]
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        s._conn.execute("INSERT INTO message_index(message_index) VALUES ('integrity-check')")  # raises if bad


def test_concurrent_writers_and_readers(store):
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for j in range(25):
                rec(store, f"t{n}", f"thread {n} item {j} common", "shared answer")
                store.search("common")
                store.list_sessions()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    sessions = store.list_sessions()
    assert len(sessions) == 6 and all(s["message_count"] == 50 for s in sessions)
    assert len(store.search("common", limit=1000)) == 150
    assert store._conn.execute("SELECT value FROM meta WHERE name = 'docs'").fetchone()[0] == 300
