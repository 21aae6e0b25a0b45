"""The skill signs requests with its own code (it never imports the node); the node must agree with it."""

import pytest

from pinkybrain.node.core.auth import NONCE_HEADER, SIG_HEADER, TS_HEADER, NonceCache, RequestVerifier, sign
from pinkybrain.skill.signing import signature_headers

SECRET = "k3Yq-" + "x7Pz" * 10


@pytest.mark.parametrize(("method", "path", "query", "body"), [
    ("GET", "/api/status", "", b""),
    ("POST", "/api/memory/set", "", b'{"key":"k","value":"v"}'),
    ("POST", "/api/conversations/search", "q=quantum%20entanglement&limit=5", b""),
    ("get", "/api/memory/caf\u00e9/notes", "", b""),
])
def test_skill_signatures_verify_on_the_node(method, path, query, body):
    headers = signature_headers(SECRET, method, path, query, body)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered[SIG_HEADER] == sign(SECRET, method, path, query, lowered[TS_HEADER], lowered[NONCE_HEADER], body)
    RequestVerifier(SECRET, NonceCache()).verify(method.upper(), path, query, lowered, body)  # raises if not
