"""The mesh handshake and channel, in memory: two ends driven by bytes, plus forged and malformed inputs."""

from __future__ import annotations

import json
import os
import random

import pytest

from pinkybrain.node.core import handshake as hs_mod
from pinkybrain.node.core.channel import (
    HEADER,
    Channel,
    FrameRejected,
    FrameTooLarge,
    RateLimiter,
    RateLimitExceeded,
    RateLimits,
)
from pinkybrain.node.core.handshake import PSK_FAILURE_MESSAGE, Handshake, HandshakeError, derive_psk
from pinkybrain.node.core.identity import Identity

SECRET = "correct horse battery staple, but much longer 1234"
OTHER_SECRET = "a different network secret that is also long 5678"


def run_handshake(a: Handshake, b: Handshake) -> None:
    b_reply = b.receive(a.start())
    a_reply = a.receive(b_reply)
    assert b.receive(a_reply) is None


def pair(secret_a=SECRET, secret_b=SECRET, *, hello_a=None, hello_b=None):
    ia, ib = Identity.generate(), Identity.generate()
    a = Handshake(ia, derive_psk(secret_a), initiator=True, hello=hello_a or {"name": "a"})
    b = Handshake(ib, derive_psk(secret_b), initiator=False, hello=hello_b or {"name": "b"})
    return ia, ib, a, b


# -- handshake --------------------------------------------------------------------------------------
def test_handshake_agrees_on_identities_keys_and_hello():
    ia, ib, a, b = pair(hello_a={"name": "alpha", "port": 1}, hello_b={"name": "beta", "stealth": True})
    run_handshake(a, b)
    assert a.done and b.done
    assert a.result.peer_id == ib.node_id and b.result.peer_id == ia.node_id
    assert a.result.peer_hello == {"name": "beta", "stealth": True}
    assert b.result.peer_hello == {"name": "alpha", "port": 1}
    assert a.result.send_key == b.result.recv_key and a.result.recv_key == b.result.send_key
    assert a.result.send_key != a.result.recv_key
    assert a.result.handshake_hash == b.result.handshake_hash


def test_each_handshake_has_fresh_keys():
    ia, ib = Identity.generate(), Identity.generate()
    keys = set()
    for _ in range(2):
        a = Handshake(ia, derive_psk(SECRET), initiator=True)
        b = Handshake(ib, derive_psk(SECRET), initiator=False)
        run_handshake(a, b)
        keys.add(a.result.send_key)
    assert len(keys) == 2


def test_wrong_secret_fails_at_the_responder_before_it_reveals_anything():
    _, _, a, b = pair(SECRET, OTHER_SECRET)
    with pytest.raises(HandshakeError) as info:
        b.receive(a.start())
    assert info.value.code == "wrong_secret"
    assert str(info.value) == PSK_FAILURE_MESSAGE == "wrong network secret or corrupted handshake"


def test_wrong_secret_fails_at_the_initiator_too():
    # A responder under another secret answering an initiator under that same other secret: its message 2,
    # fed to our initiator, must not decrypt.
    _, _, a, _ = pair(SECRET, SECRET)
    _, _, other_a, other_b = pair(OTHER_SECRET, OTHER_SECRET)
    a.start()
    msg2 = other_b.receive(other_a.start())
    with pytest.raises(HandshakeError) as info:
        a.receive(msg2)
    assert info.value.code == "wrong_secret"


def test_message_three_from_another_session_is_refused():
    _, _, a, b = pair()
    _, _, a2, b2 = pair()
    b.receive(a.start())
    msg3_other = a2.receive(b2.receive(a2.start()))
    with pytest.raises(HandshakeError) as info:
        b.receive(msg3_other)
    assert info.value.code == "wrong_secret"


class BadSignature(Handshake):
    def _proof(self, role, handshake_hash):
        proof = bytearray(super()._proof(role, handshake_hash))
        proof[-1] ^= 0x01
        return bytes(proof)


class ClaimsAnotherId(Handshake):
    victim: str = ""

    def _proof(self, role, handshake_hash):
        body = json.dumps(
            {"v": 1, "id": self.victim, "hello": {}}, separators=(",", ":"), sort_keys=True
        ).encode()
        return body + self.identity.sign(hs_mod._signed_bytes(role, self._static_pub, handshake_hash, body))


def test_bad_signature_from_the_responder():
    ia, ib = Identity.generate(), Identity.generate()
    a = Handshake(ia, derive_psk(SECRET), initiator=True)
    b = BadSignature(ib, derive_psk(SECRET), initiator=False)
    msg2 = b.receive(a.start())
    with pytest.raises(HandshakeError) as info:
        a.receive(msg2)
    assert info.value.code == "bad_signature"


def test_bad_signature_from_the_initiator():
    ia, ib = Identity.generate(), Identity.generate()
    a = BadSignature(ia, derive_psk(SECRET), initiator=True)
    b = Handshake(ib, derive_psk(SECRET), initiator=False)
    msg3 = a.receive(b.receive(a.start()))
    with pytest.raises(HandshakeError) as info:
        b.receive(msg3)
    assert info.value.code == "bad_signature"


def test_claiming_another_nodes_id_is_a_key_mismatch():
    victim, evil, honest = Identity.generate(), Identity.generate(), Identity.generate()
    a = ClaimsAnotherId(evil, derive_psk(SECRET), initiator=True)
    a.victim = victim.node_id
    b = Handshake(honest, derive_psk(SECRET), initiator=False)
    msg3 = a.receive(b.receive(a.start()))
    with pytest.raises(HandshakeError) as info:
        b.receive(msg3)
    assert info.value.code == "key_mismatch"


def test_static_key_not_derived_from_the_identity_is_refused(monkeypatch):
    # Proof and signature are the node's own, but the Noise static key is some other X25519 key.
    ia, ib = Identity.generate(), Identity.generate()
    monkeypatch.setattr(hs_mod, "static_private_key", lambda _identity: os.urandom(32))
    b = Handshake(ib, derive_psk(SECRET), initiator=False)
    monkeypatch.undo()
    a = Handshake(ia, derive_psk(SECRET), initiator=True)
    with pytest.raises(HandshakeError) as info:
        a.receive(b.receive(a.start()))
    assert info.value.code == "key_mismatch"


def test_dialling_yourself_is_recognised():
    me = Identity.generate()
    a = Handshake(me, derive_psk(SECRET), initiator=True)
    b = Handshake(me, derive_psk(SECRET), initiator=False)
    with pytest.raises(HandshakeError) as info:
        a.receive(b.receive(a.start()))
    assert info.value.code == "self"


def test_other_protocol_version_is_named():
    _, ib, _, _ = pair()
    ia = Identity.generate()
    a = Handshake(ia, derive_psk(SECRET), initiator=True)
    a._step = 1
    msg1 = bytes(a._noise.write_message(b'{"v":2}'))
    b = Handshake(ib, derive_psk(SECRET), initiator=False)
    with pytest.raises(HandshakeError) as info:
        b.receive(msg1)
    assert info.value.code == "version" and "2" in str(info.value)


@pytest.mark.parametrize("data", [b"", b"\x00", b"x" * 31, b"x" * 47, b"\xff" * 70000])
def test_malformed_first_messages(data):
    _, _, _, b = pair()
    with pytest.raises(HandshakeError) as info:
        b.receive(data)
    assert info.value.code in ("malformed", "wrong_secret")


def test_truncated_later_messages():
    _, _, a, b = pair()
    msg2 = b.receive(a.start())
    with pytest.raises(HandshakeError) as info:
        a.receive(msg2[:60])
    assert info.value.code == "malformed"
    _, _, a, b = pair()
    msg3 = a.receive(b.receive(a.start()))
    with pytest.raises(HandshakeError):
        b.receive(msg3[: len(msg3) // 2])


def test_bit_flips_anywhere_in_messages_two_and_three_are_caught():
    _, _, a, b = pair()
    length2 = len(b.receive(a.start()))
    for i in range(0, length2, 5):
        _, _, a, b = pair()
        forged = bytearray(b.receive(a.start()))
        forged[i] ^= 0x40
        with pytest.raises(HandshakeError):
            a.receive(bytes(forged))
    for i in range(0, length2, 9):
        _, _, a, b = pair()
        forged = bytearray(a.receive(b.receive(a.start())))
        if i >= len(forged):
            break
        forged[i] ^= 0x02
        with pytest.raises(HandshakeError):
            b.receive(bytes(forged))


def test_random_garbage_never_escapes_as_another_exception():
    rng = random.Random(1234)
    for _ in range(150):
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 32, 48, 64, 100, 160, 400])))
        _, _, a, b = pair()
        with pytest.raises(HandshakeError):
            b.receive(data)
        a.start()
        with pytest.raises(HandshakeError):
            a.receive(data)


def test_a_failed_handshake_is_spent():
    _, _, a, b = pair(SECRET, OTHER_SECRET)
    msg1 = a.start()
    with pytest.raises(HandshakeError):
        b.receive(msg1)
    with pytest.raises(HandshakeError) as info:
        b.receive(msg1)
    assert info.value.code == "misuse"


# -- channel ----------------------------------------------------------------------------------------
def channels(**kw) -> tuple[Channel, Channel]:
    _, _, a, b = pair()
    run_handshake(a, b)
    return (
        Channel(a.result.send_key, a.result.recv_key, **kw),
        Channel(b.result.send_key, b.result.recv_key, **kw),
    )


def test_channel_round_trip_both_ways():
    a, b = channels()
    for i in range(50):
        assert b.open(a.seal(f"to b {i}".encode())) == (1, f"to b {i}".encode())
        assert a.open(b.seal(f"to a {i}".encode()))[1] == f"to a {i}".encode()
    frame = a.seal(b"hello")
    assert b"hello" not in frame


def test_a_frame_sealed_from_parts_is_the_frame_seal_makes():
    # The link's writer seals a message's header and body without joining them first: the wire must not
    # change (older peers open these frames), and the counter, replay check and tag still apply.
    a1, b = channels()
    a2, _ = channels()
    a2._send, a2.send_counter = a1._send, 0
    parts = [b"\x00\x00\x00\x02{}", memoryview(b"body"), b""]
    frame = a1.seal_parts(parts)
    assert bytes(frame) == a2.seal(b"".join(parts))
    assert b.open(frame) == (1, b"".join(parts))
    with pytest.raises(FrameRejected) as replay:
        b.open(frame)
    assert replay.value.reason == "replay"
    tampered = bytearray(a1.seal_parts([b"x" * 100]))
    tampered[-1] ^= 1
    with pytest.raises(FrameRejected) as forged:
        b.open(tampered)
    assert forged.value.reason == "auth"


def test_tampered_ciphertext_is_rejected_and_the_next_frame_still_opens():
    a, b = channels()
    good = a.seal(b"first")
    tampered = bytearray(good)
    tampered[-1] ^= 0x01
    with pytest.raises(FrameRejected) as info:
        b.open(bytes(tampered))
    assert info.value.reason == "auth"
    assert b.open(good)[1] == b"first"  # the genuine frame was not lost to the forgery
    assert b.open(a.seal(b"second"))[1] == b"second"


def test_tampered_header_is_rejected_without_advancing_the_counter():
    a, b = channels()
    good = a.seal(b"payload")
    version, kind, counter = HEADER.unpack_from(good)
    forged = HEADER.pack(version, kind, counter + 1000) + good[HEADER.size :]
    with pytest.raises(FrameRejected) as info:
        b.open(forged)
    assert info.value.reason == "auth"
    assert b.open(good)[1] == b"payload"  # a forged high counter did not make genuine frames "stale"


def test_replayed_frame_is_rejected():
    a, b = channels()
    frame = a.seal(b"pay me once")
    b.open(frame)
    with pytest.raises(FrameRejected) as info:
        b.open(frame)
    assert info.value.reason == "replay"
    assert b.open(a.seal(b"next"))[1] == b"next"


def test_reordered_frames_are_rejected():
    a, b = channels()
    first, second = a.seal(b"1"), a.seal(b"2")
    assert b.open(second)[1] == b"2"
    with pytest.raises(FrameRejected) as info:
        b.open(first)
    assert info.value.reason == "replay"


def test_frame_from_the_other_direction_does_not_open():
    a, b = channels()
    with pytest.raises(FrameRejected) as info:
        a.open(a.seal(b"reflected"))
    assert info.value.reason == "auth"


def test_oversize_messages_are_refused_at_the_sender_and_receiver():
    a, b = channels(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        a.seal(b"x" * 1025)
    assert b.open(a.seal(b"x" * 1024))[1] == b"x" * 1024
    big = Channel(os.urandom(32), os.urandom(32), max_frame=4096).seal(b"y" * 2000)
    with pytest.raises(FrameRejected) as info:
        b.open(big)
    assert info.value.reason == "oversize"


@pytest.mark.parametrize("frame", [b"", b"\x01", b"\x01\x01" + b"\x00" * 20, b"\x09\x01" + b"\x00" * 30])
def test_malformed_frames(frame):
    _, b = channels()
    with pytest.raises(FrameRejected) as info:
        b.open(frame)
    assert info.value.reason in ("malformed", "auth")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_limit_drops_then_disconnects_a_flood():
    clock = FakeClock()
    limits = RateLimits(frames_per_sec=10, bytes_per_sec=1e9, burst_secs=1, drops_per_sec=1, drop_burst=5)
    a, b = channels(limiter=RateLimiter(limits, clock=clock))
    for _ in range(10):
        b.open(a.seal(b"ok"))
    with pytest.raises(FrameRejected) as info:
        b.open(a.seal(b"over"))
    assert info.value.reason == "rate_limited"
    clock.now += 0.5  # five frames' worth of refill
    for _ in range(5):
        b.open(a.seal(b"ok again"))
    with pytest.raises(RateLimitExceeded):
        for _ in range(10):
            with pytest.raises(FrameRejected):
                b.open(a.seal(b"flood"))


def test_rate_limit_counts_bytes():
    clock = FakeClock()
    limits = RateLimits(frames_per_sec=1e6, bytes_per_sec=100_000, burst_secs=1)
    a, b = channels(max_frame=65536, limiter=RateLimiter(limits, max_frame=65536, clock=clock))
    b.open(a.seal(b"z" * 60000))
    with pytest.raises(FrameRejected) as info:
        b.open(a.seal(b"z" * 60000))
    assert info.value.reason == "rate_limited"
    clock.now += 1
    b.open(a.seal(b"z" * 60000))
