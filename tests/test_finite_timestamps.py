"""Every freshness check refuses non-finite timestamps: nan compares false with every bound (so a message
stamped nan would never go stale) and inf would never expire. One test per place a time is checked."""

from __future__ import annotations

import json
import math
import secrets
import time

import httpx
import pytest

from pinkybrain.node.core.auth import (
    NONCE_HEADER,
    SIG_HEADER,
    TS_HEADER,
    AuthError,
    NonceCache,
    RequestVerifier,
)
from pinkybrain.node.core.auth import sign as sign_request
from pinkybrain.node.core.config import KEYS, ConfigError, coerce, parse_cli_value
from pinkybrain.node.core.credits import InvalidCommitment, InvalidReceipt, PaymentCommitment, Receipt
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.sealed import REQUEST, ReplayGuard, Sealer, SealError, new_query_id
from pinkybrain.node.core.tracker_protocol import AnnounceRecord, ProtocolError, parse_record
from pinkybrain.node.core.trust import Attestation, InvalidAttestation, Revocation, TrustError
from pinkybrain.node.services.peer_link import _number

NON_FINITE = [math.nan, math.inf, -math.inf]
NON_FINITE_TEXT = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400"]
SECRET = secrets.token_urlsafe(32)


def _verify(ts: str, now: float = 1_000_000.0) -> None:
    nonce = secrets.token_hex(8)
    headers = {SIG_HEADER: sign_request(SECRET, "GET", "/api/status", "", ts, nonce, b""), TS_HEADER: ts,
               NONCE_HEADER: nonce}
    RequestVerifier(SECRET, NonceCache()).verify("GET", "/api/status", "", headers, b"", now=now)


@pytest.mark.parametrize("ts", NON_FINITE_TEXT)
def test_signed_request_with_non_finite_timestamp_is_refused(ts):
    # Correctly signed over the bad timestamp: only the freshness rule can refuse it.
    with pytest.raises(AuthError) as info:
        _verify(ts)
    assert info.value.code == "bad_timestamp"
    _verify("1000000.000")  # the same request with a real timestamp passes


def test_node_refuses_a_request_stamped_nan(node):
    for ts in ("nan", "inf"):
        nonce = secrets.token_hex(8)
        headers = {SIG_HEADER: sign_request(node.secret, "GET", "/api/status", "", ts, nonce, b""),
                   TS_HEADER: ts, NONCE_HEADER: nonce}
        answer = httpx.get(f"{node.url}/api/status", headers=headers, timeout=30)
        assert answer.status_code == 401, (ts, answer.text)
        assert "finite" in answer.text


@pytest.mark.parametrize("ts", [*NON_FINITE, 10**400])
def test_sealed_query_with_non_finite_timestamp_is_refused(ts):
    guard = ReplayGuard(window_secs=120)
    qid = new_query_id()
    with pytest.raises(SealError) as info:
        guard.check("alice", qid, ts, now=1000.0)
    assert info.value.code == "malformed"
    assert len(guard) == 0  # nothing remembered for ever
    guard.check("alice", qid, 1000.0, now=1000.0)


def test_sealed_envelope_body_carrying_nan_is_refused_after_opening():
    """JSON from a peer may spell NaN and Infinity: what the serving node opens is checked as parsed."""
    alice, bob = Identity.generate(), Identity.generate()
    for literal in ("NaN", "Infinity", "-Infinity"):
        sealer = Sealer(alice)
        envelope = sealer.seal(bob.node_id, REQUEST, {"qid": new_query_id(), "ts": 0})
        # Re-seal by hand with a body the honest sealer refuses to write.
        body = f'{{"qid":"{new_query_id()}","ts":{literal}}}'.encode()
        box = bytes(sealer._box(bob.public_key).encrypt(body))
        from pinkybrain.node.core.sealed import _HEAD, KINDS, _signed_part

        sig = alice.sign(_signed_part(KINDS[REQUEST], alice.public_key, bob.public_key, box))
        envelope = _HEAD.pack(1, KINDS[REQUEST], alice.public_key, bob.public_key, sig) + box
        opened = Sealer(bob).open(envelope, REQUEST)
        assert not math.isfinite(opened.body["ts"])
        with pytest.raises(SealError) as info:
            ReplayGuard().check(opened.sender, opened.body["qid"], opened.body["ts"])
        assert info.value.code == "malformed"


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("field", ["issued_at", "expires_at"])
def test_trust_attestation_with_non_finite_time_is_refused(bad, field):
    issuer, subject = Identity.generate(), Identity.generate()
    att = Attestation.sign(issuer, subject.node_id, "full", now=time.time())
    data = att.to_dict()
    data[field] = bad
    with pytest.raises(InvalidAttestation):
        Attestation.from_dict(data).check()
    Attestation.from_dict(att.to_dict()).check()


@pytest.mark.parametrize("bad", NON_FINITE)
def test_trust_revocation_with_non_finite_time_is_refused(bad):
    issuer, subject = Identity.generate(), Identity.generate()
    rev = Revocation.sign(issuer, subject.node_id, now=time.time())
    data = rev.to_dict()
    data["issued_at"] = bad
    with pytest.raises(TrustError):
        Revocation.from_dict(data).check()


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("field", ["issued_at", "expires_at"])
def test_credit_commitment_with_non_finite_time_is_refused(bad, field):
    asker, server = Identity.generate(), Identity.generate()
    commitment = PaymentCommitment.create(asker, server.node_id, 10, now=time.time())
    data = commitment.to_dict()
    data[field] = bad
    with pytest.raises(InvalidCommitment):
        PaymentCommitment.from_dict(data).check()


@pytest.mark.parametrize("bad", NON_FINITE)
def test_credit_receipt_with_non_finite_delivery_time_is_refused(bad):
    asker, server = Identity.generate(), Identity.generate()
    commitment = PaymentCommitment.create(asker, server.node_id, 10, now=time.time())
    receipt = Receipt.deliver(server, commitment, success=True, latency_ms=5, response_sha256="0" * 64,
                              now=time.time())
    data = receipt.to_dict()
    data["delivered_at"] = bad
    with pytest.raises(InvalidReceipt):
        Receipt.from_dict(data).check()


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("field", ["issued_at", "expires_at"])
def test_tracker_record_with_non_finite_time_is_refused(bad, field):
    record = AnnounceRecord.build(Identity.generate(), seq=1, ttl=60)
    wire = json.loads(json.dumps(record.to_wire()))
    parse_record(wire)  # the honest record passes
    wire[field] = bad
    with pytest.raises(ProtocolError):
        parse_record(json.loads(json.dumps(wire)))  # JSON from the wire may spell NaN / Infinity


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1.0e+400"])
def test_config_durations_must_be_finite_when_set(text):
    with pytest.raises(ConfigError, match="finite"):
        parse_cli_value(KEYS["p2p.remote_timeout_secs"], text)


@pytest.mark.parametrize("bad", [*NON_FINITE, 10**400])
def test_config_durations_must_be_finite_in_the_file(bad):
    with pytest.raises(ConfigError, match="finite"):
        coerce(KEYS["p2p.remote_timeout_secs"], bad)
    assert coerce(KEYS["p2p.remote_timeout_secs"], 30) == 30.0


@pytest.mark.parametrize("bad", [*NON_FINITE, 10**400, True, "5"])
def test_peer_given_rpc_timeout_must_be_finite(bad):
    # A caller's stream idle timeout ("to") of nan or inf would hold a served handler for ever.
    assert _number(bad) is None
    assert _number(2.5) == 2.5 and _number(3) == 3.0
