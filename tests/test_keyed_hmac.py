"""KeyedHmac (node/core/keyed_hmac.py) is HMAC-SHA256 exactly as the standard library computes it."""

import hashlib
import hmac
import secrets

import pytest

from pinkybrain.node.core.keyed_hmac import KeyedHmac


@pytest.mark.parametrize("key_len", [0, 1, 32, 43, 63, 64, 65, 128, 1000])
def test_matches_the_standard_library_for_every_key_length(key_len):
    key = secrets.token_bytes(key_len)
    mac = KeyedHmac(key)
    for message in (b"", b"x", secrets.token_bytes(55), secrets.token_bytes(64), secrets.token_bytes(5000)):
        expected = hmac.new(key, message, hashlib.sha256)
        assert mac.digest(message) == expected.digest()
        assert mac.hexdigest(message) == expected.hexdigest()


def test_one_key_serves_many_messages_independently():
    mac = KeyedHmac(b"network secret")
    first = mac.hexdigest(b"first")
    assert mac.hexdigest(b"second") == hmac.new(b"network secret", b"second", "sha256").hexdigest()
    assert mac.hexdigest(b"first") == first  # no state carried from one message to the next
    assert KeyedHmac(b"another key").hexdigest(b"first") != first
