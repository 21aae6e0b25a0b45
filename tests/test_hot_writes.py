"""The fast memory write (node/api/hot_writes.py) answers exactly as the FastAPI route, on a real node.

Each write goes twice: as the plain body the fast path takes, and with an extra field, which the fast path
leaves to FastAPI (MemorySetRequest ignores extra fields, so both mean the same write). Status and body
must be the same for accepted writes and for every refusal; requests the fast path does not take (the
public network, malformed JSON, a body that is not an object) keep FastAPI's answers.
"""

from __future__ import annotations

import json

import pytest

from nodes import start_node
from pinkybrain.node.api.hot_writes import plain_private_write

BIG = "x" * (64 * 1024 + 1)
DEEP = json.loads("[" * 70 + "]" * 70)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = start_node(tmp_path_factory.mktemp("hotwrites") / "node")
    try:
        yield n
    finally:
        n.stop()


def post(node, body: bytes, content_type: str = "application/json"):
    return node.post("/api/memory/set", content=body, headers={"content-type": content_type})


@pytest.mark.parametrize("key, value", [
    ("notes/plain", "hello"),
    ("notes/object", {"a": [1, 2.5, None, True], "b": {"c": "d"}}),
    ("notes/null", None),
    ("", "empty key"),
    ("k" * 300, "key over the limit"),
    ("notes/big", BIG),
    ("notes/deep", DEEP),
])
def test_the_fast_path_answers_as_fastapi_does(node, key, value):
    fast = post(node, json.dumps({"key": key, "value": value}).encode())
    slow = post(node, json.dumps({"key": key, "value": value, "via": "fastapi"}).encode())
    assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    if fast.status_code == 200:
        assert fast.json() == {"key": key, "stored": True, "network": "private"}
        assert node.get(f"/api/memory/{key}").json()["value"] == value
    else:
        assert fast.status_code in (400, 413) and fast.json()["error"] in ("bad_key", "bad_value", "too_large")
        assert node.get(f"/api/memory/{key}").status_code in (400, 404)  # nothing was stored


def test_a_fast_write_is_committed_before_its_answer(node):
    before = node.get("/api/status").json()["memory"]["commits"]
    assert post(node, b'{"key": "notes/durable", "value": 7}').status_code == 200
    assert node.get("/api/status").json()["memory"]["commits"] == before + 1  # no snapshot older than the write
    assert node.get("/api/memory/notes/durable").json()["value"] == 7


@pytest.mark.parametrize("body, content_type, status, error", [
    (b'{"key": "x", "value": 1e400}', "application/json", 400, "bad_value"),  # orjson refuses; the store does
    (b'{"key": "x"', "application/json", 422, "invalid_request"),  # not JSON: FastAPI's own answer
    (b'["key", "value"]', "application/json", 422, "invalid_request"),
    (b'{"key": 5, "value": 1}', "application/json", 422, "invalid_request"),
    (b'{"key": "x"}', "application/json", 422, "invalid_request"),
    (b'{"key": "x", "value": 1, "network": "public"}', "application/json", 409, "not_joined"),
    (b'{"key": "x", "value": 1, "network": "elsewhere"}', "application/json", 422, "invalid_request"),
])
def test_what_the_fast_path_leaves_keeps_fastapis_answer(node, body, content_type, status, error):
    r = post(node, body, content_type)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    assert node.get("/api/memory/x").status_code == 404


def test_only_the_plain_private_write_takes_the_fast_path():
    json_type = [(b"content-type", b"application/json; charset=utf-8")]
    assert plain_private_write(json_type, b'{"key": "k", "value": [1]}') == ("k", [1])
    assert plain_private_write(json_type, b'{"key": "k", "value": null, "network": "private"}') == ("k", None)
    for body in (b'{"key": "k", "value": 1, "network": "public"}', b'{"key": "k", "value": 1, "x": 0}',
                 b'{"key": "k"}', b'{"key": 1, "value": 1}', b'[1]', b'{"key": "k", "value": NaN}', b""):
        assert plain_private_write(json_type, body) is None, body
    assert plain_private_write([(b"content-type", b"text/plain")], b'{"key": "k", "value": 1}') is None
    assert plain_private_write([], b'{"key": "k", "value": 1}') is None
