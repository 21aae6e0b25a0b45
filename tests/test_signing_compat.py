"""The skill signs requests, checks the node's proof and seals with its own code (it never imports the node);
the node must agree with it."""

import pytest

from pinkybrain.node.core.auth import NONCE_HEADER, SIG_HEADER, TS_HEADER, NonceCache, RequestVerifier, sign
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.skill_link import (
    NODE_HEADER,
    NODE_MAC_HEADER,
    NODE_SIG_HEADER,
    PROOF_HEADER,
    SealFault,
    SkillLink,
)
from pinkybrain.skill.signing import ProofError, ProofKey, RequestSeal, check_proof, signature_headers

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


# -- the node's proof on its answers, and sealing (node/core/skill_link.py vs skill/signing.py) -------------

def proof_headers(identity: Identity, credential: bytes, nonce: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in SkillLink(identity).proof_headers(credential, nonce)}


def test_node_proof_verifies_in_the_skill_and_binds_secret_nonce_and_identity():
    node = Identity.generate()
    headers = proof_headers(node, SECRET.encode(), "nonce-1")
    assert check_proof(SECRET, "nonce-1", headers) == node.node_id
    assert check_proof(SECRET, "nonce-1", headers, expected_node=node.node_id) == node.node_id
    with pytest.raises(ProofError, match="does not match our secret"):
        check_proof(SECRET, "nonce-2", headers)  # an old answer's proof for a new request
    with pytest.raises(ProofError, match="does not match our secret"):
        check_proof(SECRET, "nonce-1", proof_headers(node, b"another secret", "nonce-1"))
    with pytest.raises(ProofError, match="no node proof"):
        check_proof(SECRET, "nonce-1", {})

    # A mesh member holds the secret, so its HMAC is right, but it cannot sign for another node's id.
    member = Identity.generate()
    forged = {**proof_headers(member, SECRET.encode(), "nonce-1"), NODE_HEADER: node.node_id}
    forged[PROOF_HEADER] = proof_headers(node, SECRET.encode(), "nonce-1")[PROOF_HEADER]
    with pytest.raises(ProofError, match="signature does not verify"):
        check_proof(SECRET, "nonce-1", forged, expected_node=node.node_id)
    # Its own honest proof names itself, which a pin on the other node refuses.
    with pytest.raises(ProofError, match=f"it is node {member.node_id}, not {node.node_id}"):
        check_proof(SECRET, "nonce-1", proof_headers(member, SECRET.encode(), "nonce-1"), expected_node=node.node_id)


def test_the_cheap_node_mac_proves_the_node_id_to_the_client_that_named_its_key():
    node, member = Identity.generate(), Identity.generate()
    client, other_client = ProofKey(), ProofKey()

    def mac_proof(identity, nonce, key=client, link=None):
        link = link or SkillLink(identity)
        return {k.decode(): v.decode() for k, v in link.proof_headers(SECRET.encode(), nonce, key.public.encode())}

    link = SkillLink(node)
    headers = mac_proof(node, "nonce-1", link=link)
    assert NODE_MAC_HEADER in headers and NODE_SIG_HEADER not in headers
    assert check_proof(SECRET, "nonce-1", headers, node.node_id, proof_key=client) == node.node_id
    # The same link proves the next answer from its cached shared key: still bound to that answer's nonce.
    again = mac_proof(node, "nonce-2", link=link)
    assert check_proof(SECRET, "nonce-2", again, node.node_id, proof_key=client) == node.node_id
    with pytest.raises(ProofError):
        check_proof(SECRET, "nonce-2", headers, node.node_id, proof_key=client)
    # A MAC made for another client's key does not verify for this client.
    with pytest.raises(ProofError, match="signature does not verify"):
        check_proof(SECRET, "nonce-1", mac_proof(node, "nonce-1", key=other_client), node.node_id, proof_key=client)
    # A mesh member holds the secret but not the node's key: its MAC, claiming the node's id, fails.
    forged = {**mac_proof(member, "nonce-1"), NODE_HEADER: node.node_id}
    forged[PROOF_HEADER] = headers[PROOF_HEADER]
    with pytest.raises(ProofError, match="signature does not verify"):
        check_proof(SECRET, "nonce-1", forged, node.node_id, proof_key=client)
    # A client that named no key cannot check a MAC, and a MAC alone is no proof for it.
    with pytest.raises(ProofError, match="no node proof"):
        check_proof(SECRET, "nonce-1", headers, node.node_id)
    # A malformed client key gets the signature instead.
    odd = {k.decode(): v.decode() for k, v in SkillLink(node).proof_headers(SECRET.encode(), "nonce-1", b"%%")}
    assert NODE_SIG_HEADER in odd and check_proof(SECRET, "nonce-1", odd, node.node_id) == node.node_id


def test_sealed_request_and_answer_round_trip():
    node = Identity.generate()
    link = SkillLink(node)
    seal = RequestSeal(node.node_id)
    sealer, query, body = link.open_request(seal.header, seal.seal("q=caf%C3%A9&limit=5", b'{"value":"x"}'))
    assert (query, body) == (b"q=caf%C3%A9&limit=5", b'{"value":"x"}')
    frames = sealer.frame(b"event: token\n", last=False) + sealer.frame(b"", last=False) + sealer.frame(b"end", True)
    assert b"token" not in frames
    opened = [piece for i in range(len(frames)) for piece in seal.open_frames(frames[i : i + 1])]  # byte by byte
    assert opened == [b"event: token\n", b"", b"end"]
    seal.check_complete()


def test_sealed_request_is_refused_when_altered_or_sealed_to_another_node():
    node = Identity.generate()
    seal = RequestSeal(node.node_id)
    sealed = bytearray(seal.seal("", b"secret prompt"))
    assert b"secret prompt" not in sealed
    sealed[-1] ^= 1
    with pytest.raises(SealFault, match="does not open"):
        SkillLink(node).open_request(seal.header, bytes(sealed))
    other = RequestSeal(Identity.generate().node_id)
    with pytest.raises(SealFault, match="does not open"):
        SkillLink(node).open_request(other.header, other.seal("", b"x"))
    with pytest.raises(SealFault, match="not a base64 X25519"):
        SkillLink(node).open_request("!!", b"x" * 40)


@pytest.mark.parametrize("fault", ["reordered", "replayed", "dropped", "altered", "cut short", "after the last",
                                   "another request's"])
def test_a_tampered_sealed_answer_is_refused(fault):
    node = Identity.generate()
    seal = RequestSeal(node.node_id)
    sealer, _, _ = SkillLink(node).open_request(seal.header, seal.seal("", b""))
    a, b, c = sealer.frame(b"one", False), sealer.frame(b"two", False), sealer.frame(b"three", True)
    stream = {"reordered": b + a + c, "replayed": a + a + b + c, "dropped": a + c,
              "altered": a + b[:-1] + bytes([b[-1] ^ 1]) + c, "cut short": a + b,
              "after the last": a + b + c + c}.get(fault)
    if fault == "another request's":
        other = RequestSeal(node.node_id)  # the same node answering another request of ours
        other_sealer, _, _ = SkillLink(node).open_request(other.header, other.seal("", b""))
        stream = other_sealer.frame(b"one", True)
    with pytest.raises(ProofError):
        seal.open_frames(stream)
        seal.check_complete()
