"""Every endpoint, signed and unsigned, against a real node process; replay, staleness, tampering."""

import time

import httpx
import pytest

from pinkybrain.node.api.app import describe_api
from pinkybrain.node.core.auth import sign
from pinkybrain.node.core.identity import Identity
from pinkybrain.skill.signing import signature_headers

PEER = Identity.generate().node_id
# Path parameters filled with values that exist or are at least well-formed for a fresh node.
FILL = {"{key}": "greeting", "{key:path}": "greeting", "{peer}": PEER, "{name}": "nomodel",
        "{session_id}": "nosession"}
BODIES = {
    ("POST", "/api/query"): {"prompt": "hi", "mode": "single"},
    ("POST", "/api/memory/set"): {"key": "greeting", "value": "hello"},
    ("POST", "/api/conversations/{session_id}/privacy"): {"privacy": "private"},
}
QUERY = {"/api/conversations/search": {"q": "quantum"}}


def all_endpoints():
    out = []
    for path, ops in describe_api()["paths"].items():
        for method in ops:
            out.append((method.upper(), path))
    return sorted(out)


def concrete(path: str) -> str:
    for k, v in FILL.items():
        path = path.replace(k, v)
    return path


def test_the_seed_api_reference_is_all_there():
    have = set(all_endpoints())
    seed = {
        ("GET", "/api/status"), ("GET", "/api/ping"), ("POST", "/api/query"), ("GET", "/api/peers"),
        ("GET", "/api/memory/{key}"), ("POST", "/api/memory/set"), ("GET", "/api/capabilities"),
        ("GET", "/api/score/{peer}"), ("GET", "/api/discover"), ("GET", "/api/update"), ("GET", "/api/daemon"),
        ("POST", "/api/models/{name}/share"), ("POST", "/api/models/{name}/unshare"), ("GET", "/api/models"),
        ("POST", "/api/network/mesh/join"), ("POST", "/api/conversations/search"),
        ("POST", "/api/conversations/{session_id}/export"), ("POST", "/api/conversations/{session_id}/privacy"),
        ("POST", "/api/network/mesh/leave"),
    }
    normalised = {(m, p.replace("{key:path}", "{key}")) for m, p in have}
    assert seed <= normalised, seed - normalised


def test_every_endpoint_refuses_unsigned_and_answers_signed(node):
    node.post("/api/memory/set", json={"key": "greeting", "value": "hello"}).raise_for_status()
    with httpx.Client(base_url=node.url, timeout=30) as raw, node.client() as signed:
        for method, path in all_endpoints():
            url = concrete(path)
            kwargs = {"params": QUERY.get(path)}
            if (method, path) in BODIES:
                kwargs["json"] = BODIES[(method, path)]
            unsigned = raw.request(method, url, **kwargs)
            assert unsigned.status_code == 401, (method, path, unsigned.text)
            if path.startswith("/v1/"):  # OpenAI clients get OpenAI's error shape (bearer key or signature)
                assert unsigned.json()["error"]["code"] == "invalid_api_key"
            else:
                assert unsigned.json()["error"] == "missing_signature"
            answer = signed.request(method, url, **kwargs)
            assert answer.status_code not in (401, 405, 500), (method, path, answer.status_code, answer.text)
            if path.startswith("/v1/") or path == "/api/query":
                continue  # no model on this node: those answer with a clear 4xx/5xx, covered in test_brain
            assert answer.headers["content-type"].startswith(("application/json", "text/markdown")), path


def test_signed_answers_carry_real_data(node):
    ping = node.get("/api/ping").json()
    assert ping["pong"] is True
    status = node.get("/api/status").json()
    assert status["node_id"] == ping["node_id"]
    assert status["uptime_secs"] > 0
    assert status["mesh"]["private"]["peers"] == 0
    guard = status["resource_guard"]
    assert guard["cpu_threshold"] == 100 and guard["sharing_paused"] is False
    assert node.get("/api/memory/greeting").status_code == 404
    node.post("/api/memory/set", json={"key": "greeting", "value": {"text": "hello", "n": 2}}).raise_for_status()
    assert node.get("/api/memory/greeting").json()["value"] == {"text": "hello", "n": 2}
    daemon = node.get("/api/daemon").json()
    assert daemon["pid"] == node.proc.pid and daemon["start_mode"] == "foreground"
    bad_mode = node.post("/api/query", json={"prompt": "x", "mode": "telepathy"})
    assert bad_mode.status_code == 400 and "single" in bad_mode.json()["detail"]
    bad_peer = node.get("/api/score/not-an-id")
    assert bad_peer.status_code == 400 and "node id" in bad_peer.json()["detail"]


def _raw_signed(node, method, path, body=b"", *, ts=None, nonce="n-1", secret=None, query=""):
    ts = ts if ts is not None else f"{time.time():.3f}"
    sig = sign(secret or node.secret, method, path, query, ts, nonce, body)
    headers = {"X-PinkyBrain-Sig": sig, "X-PinkyBrain-Timestamp": ts, "X-PinkyBrain-Nonce": nonce}
    if body:
        headers["content-type"] = "application/json"
    url = node.url + path + (f"?{query}" if query else "")
    return httpx.request(method, url, content=body, headers=headers, timeout=10)


def test_replayed_request_is_refused(node):
    first = _raw_signed(node, "GET", "/api/status", nonce="replay-me")
    assert first.status_code == 200
    again = _raw_signed(node, "GET", "/api/status", nonce="replay-me", ts=first.request.headers["X-PinkyBrain-Timestamp"])
    assert again.status_code == 401 and again.json()["error"] == "replayed_nonce"


@pytest.mark.parametrize("offset", [-61, 61, -3600])
def test_stale_or_future_timestamp_is_refused(node, offset):
    r = _raw_signed(node, "GET", "/api/status", ts=f"{time.time() + offset:.3f}", nonce=f"stale{offset}")
    assert r.status_code == 401 and r.json()["error"] == "stale_timestamp"


def test_wrong_secret_tampered_body_path_or_query_is_refused(node):
    wrong = _raw_signed(node, "GET", "/api/status", secret="another-secret-" + "z" * 30, nonce="w1")
    assert wrong.status_code == 401 and wrong.json()["error"] == "bad_signature"

    body = b'{"key":"k","value":"v"}'
    headers = signature_headers(node.secret, "POST", "/api/memory/set", "", body)
    tampered = httpx.post(node.url + "/api/memory/set", content=b'{"key":"k","value":"EVIL"}',
                          headers={**headers, "content-type": "application/json"}, timeout=10)
    assert tampered.status_code == 401 and tampered.json()["error"] == "bad_signature"

    headers = signature_headers(node.secret, "GET", "/api/memory/k", "", b"")
    moved = httpx.get(node.url + "/api/memory/other", headers=headers, timeout=10)
    assert moved.status_code == 401

    headers = signature_headers(node.secret, "POST", "/api/conversations/search", "q=a", b"")
    requery = httpx.post(node.url + "/api/conversations/search?q=b", headers=headers, timeout=10)
    assert requery.status_code == 401
    assert node.get("/api/memory/k").status_code == 404  # the tampered write did not land


def test_missing_pieces_are_named(node):
    r = httpx.get(node.url + "/api/ping", headers={"X-PinkyBrain-Sig": "00"}, timeout=10)
    assert r.status_code == 401 and "x-pinkybrain-timestamp" in r.json()["detail"]
    r = _raw_signed(node, "GET", "/api/ping", ts="yesterday", nonce="t1")
    assert r.status_code == 401 and r.json()["error"] == "bad_timestamp"


def test_oversized_body_is_refused_before_reading_it_all(node):
    big = b"x" * (5 * 1024 * 1024)
    unsigned = httpx.post(node.url + "/api/memory/set", content=big, timeout=30)
    assert unsigned.status_code == 401  # not even signed: refused before the body matters
    headers = signature_headers(node.secret, "POST", "/api/memory/set", "", big)
    signed = httpx.post(node.url + "/api/memory/set", content=big, headers=headers, timeout=30)
    assert signed.status_code == 413 and "/api/memory/set" in signed.json()["detail"]
    assert node.get("/api/ping").status_code == 200  # the node is fine


def test_openapi_description_is_published_and_committed(node):
    import json
    from pathlib import Path

    live = node.get("/api/openapi.json").json()
    assert "/api/status" in live["paths"]
    committed = json.loads((Path(__file__).parents[1] / "docs" / "openapi.json").read_text())
    assert committed == describe_api() == live, "docs/openapi.json is stale: run `pinkybrain openapi > docs/openapi.json`"


def test_every_signed_answer_carries_the_node_proof_and_bad_seals_are_refused(node):
    """Success and error answers alike prove the node (checked the skill's way); auth's refusals and bearer-key
    answers carry no proof (their clients have no credential to check one with)."""
    from pinkybrain.skill.signing import RequestSeal, check_proof

    node_id = node.get("/api/ping").json()["node_id"]
    api_key = node.post("/api/keys", json={"name": "proof-test", "scope": "query"}).json()["api_key"]
    with node.client(node.secret) as signed:  # a mesh member: the proof is made with the network secret
        for method, path in [("GET", "/api/status"), ("GET", "/api/ping"), ("GET", "/api/memory/no-such-key"),
                             ("POST", "/api/memory/set")]:
            answer = signed.request(method, path, json={"bad": 1} if method == "POST" else None)
            nonce = answer.request.headers["x-pinkybrain-nonce"]
            assert check_proof(node.secret, nonce, answer.headers, expected_node=node_id,
                               proof_key=signed.auth.proof_key) == node_id, path
        assert signed.get("/api/memory/no-such-key").status_code == 404

        # A seal header that is not a key, or a body sealed to another node: 400, still with the proof.
        for header, body in [("not base64!", b"x" * 64),
                             (RequestSeal(Identity.generate().node_id).header, b"y" * 64)]:
            answer = signed.post("/api/memory/set", content=body, headers={"x-pinkybrain-seal": header})
            assert answer.status_code == 400 and answer.json()["error"] == "bad_seal", answer.text
            check_proof(node.secret, answer.request.headers["x-pinkybrain-nonce"], answer.headers, node_id,
                        signed.auth.proof_key)
        # A client that names no key of its own gets the Ed25519 signature instead of the MAC.
        from pinkybrain.skill.signing import signature_headers

        plain = httpx.get(f"{node.url}/api/status", headers=signature_headers(node.secret, "GET", "/api/status", "", b""))
        assert "x-pinkybrain-node-sig" in plain.headers and "x-pinkybrain-node-mac" not in plain.headers
        assert check_proof(node.secret, plain.request.headers["x-pinkybrain-nonce"], plain.headers, node_id) == node_id
    with httpx.Client(base_url=node.url, timeout=30) as raw:
        assert "x-pinkybrain-proof" not in raw.get("/api/status").headers  # 401: no proof
        bearer = raw.get("/v1/models", headers={"authorization": f"Bearer {api_key}"})
        assert bearer.status_code == 200 and "x-pinkybrain-proof" not in bearer.headers
