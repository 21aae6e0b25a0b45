"""Refuse weak network secrets before a node starts.

Rules, in order: present; not the seed's default nor a placeholder (compared after normalising: case,
separators and punctuation removed, so `change-me_STRONG secret` is the default too); at least 32
characters; not built on a well-known string (pangrams, lorem ipsum, documentation UUIDs and keys,
hashes of the empty string and of common words: what is left once those are taken out must pass the
estimate alone); and zxcvbn's estimate (Dropbox's estimator: dictionaries, keyboard patterns, repeats,
sequences, dates) of at least 10^24 guesses.

No message here ever contains the secret or any part of it.
"""

from __future__ import annotations

import hashlib
import re
import secrets as _secrets
import sys

SEED_DEFAULT_SECRET = "CHANGE_ME_STRONG_SECRET"  # noqa: S105 (the value we refuse, not a credential)
MIN_LENGTH = 32
# The stated threshold: ~2^80 guesses, far beyond an offline attack on a captured HMAC, far below a
# random 32-character secret (~10^57).
MIN_GUESSES_LOG10 = 24.0
_FIX = (
    "set a generated one: pinkybrain config set p2p.secret "
    "\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\""
)

# Placeholders people leave in configs; any secret containing one (normalised) is refused.
PLACEHOLDERS = ("changeme", "replaceme", "yoursecret", "secrethere", "secretgoeshere", "insertsecret",
                "placeholder", "examplekey", "examplesecret", "notasecret", "dummysecret", "testsecret")

# Strings that appear in documentation, tutorials and test suites: random-looking to an estimator,
# first on an attacker's list.
WELL_KNOWN = (
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "sphinx of black quartz, judge my vow",
    "jackdaws love my big sphinx of quartz",
    "how vexingly quick daft zebras jump",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
    "fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt "
    "mollit anim id est laborum.",
    "correct horse battery staple",
    # UUIDs from RFC 4122/9562, Wikipedia and database manuals; the nil and max UUIDs.
    "123e4567-e89b-12d3-a456-426614174000",
    "123e4567-e89b-42d3-a456-556642440000",
    "550e8400-e29b-41d4-a716-446655440000",
    "f47ac10b-58cc-4372-a567-0e02b2c3d479",
    "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
    "6ba7b811-9dad-11d1-80b4-00c04fd430c8",
    "6ba7b812-9dad-11d1-80b4-00c04fd430c8",
    "6ba7b814-9dad-11d1-80b4-00c04fd430c8",
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    # Keys printed in vendors' documentation.
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AKIAIOSFODNN7EXAMPLE",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "192b9bdd22ab9ed4d12e236c78afcb9a393ec15f71bbf5dc987d54727823bcbf",
    "your-256-bit-secret",
    "0123456789abcdef0123456789abcdef",
    "deadbeefdeadbeefdeadbeefdeadbeef",
)
# Hex digests of the empty string and of words people hash to make a "random" secret.
_HASHED_WORDS = ("", "password", "secret", "changeme", "admin", "test", "123456", "pinkybrain")
_DIGESTS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_256", "blake2b")
# A known string shorter than this is too common a fragment to search for inside a secret.
_MIN_FRAGMENT = 12


class WeakSecretError(ValueError):
    """The secret must not be used; str() is one line saying why and how to fix it."""


def generate_secret() -> str:
    return _secrets.token_urlsafe(32)  # 43 chars, 256 bits


def normalise(text: str) -> str:
    """Lower case, letters and digits only: separators, spaces and punctuation do not make a secret new."""
    return re.sub(r"[\W_]+", "", text.casefold())


def _known_fragments() -> tuple[str, ...]:
    hashes = [hashlib.new(name, word.encode()).hexdigest() for word in _HASHED_WORDS for name in _DIGESTS]
    fragments = {normalise(s) for s in (*WELL_KNOWN, *hashes)}
    return tuple(sorted((f for f in fragments if len(f) >= _MIN_FRAGMENT), key=len, reverse=True))


KNOWN_FRAGMENTS = _known_fragments()


def _guesses_log10(text: str) -> float:
    if not text:
        return 0.0
    # Imported here: its dictionaries hold ~12 MiB that a node needs once, at start (release_estimator()).
    from zxcvbn import zxcvbn

    # zxcvbn is quadratic in length; the first 100 characters decide as well as the whole.
    return float(zxcvbn(text[:100])["guesses_log10"])


def release_estimator() -> None:
    """Forget zxcvbn's modules, so a long-running process that has checked its secret can give their
    dictionaries back (after a gc.collect(): modules sit in reference cycles). A later check imports
    them again."""
    for name in [n for n in sys.modules if n == "zxcvbn" or n.startswith("zxcvbn.")]:
        del sys.modules[name]


def _without_known(flat: str) -> tuple[str, bool]:
    """The normalised secret with every well-known string cut out, and whether any was there. A secret that
    is itself a piece of a well-known string (half a hash, a few words of lorem ipsum) is all known."""
    if len(flat) >= 16 and any(flat in known for known in KNOWN_FRAGMENTS):
        return "", True
    rest, found = flat, False
    for known in KNOWN_FRAGMENTS:
        if known in rest:
            rest, found = rest.replace(known, " "), True
    return rest.replace(" ", ""), found


def check_secret(secret: str | None) -> None:
    if secret is None or not secret.strip():
        raise WeakSecretError(
            f"no P2P secret is set: set p2p.secret in pinkybrain.yaml or P2P_SECRET; {_FIX}"
        )
    flat = normalise(secret)
    if normalise(SEED_DEFAULT_SECRET) in flat:
        raise WeakSecretError(f"the P2P secret is still the default {SEED_DEFAULT_SECRET!r}; {_FIX}")
    if any(p in flat for p in PLACEHOLDERS):
        raise WeakSecretError(f"the P2P secret is still a placeholder (like 'CHANGE-ME'), not a secret; {_FIX}")
    if len(secret) < MIN_LENGTH:
        raise WeakSecretError(
            f"the P2P secret is {len(secret)} characters, at least {MIN_LENGTH} are required; {_FIX}"
        )
    if len(set(secret)) < 6:
        raise WeakSecretError(f"the P2P secret uses only {len(set(secret))} distinct characters; {_FIX}")
    rest, known = _without_known(flat)
    if known and _guesses_log10(rest) < MIN_GUESSES_LOG10:
        raise WeakSecretError(
            "the P2P secret is built on a well-known string (a pangram, lorem ipsum, an example UUID or key "
            f"from documentation, or a hash of an empty or common word); {_FIX}"
        )
    guesses_log10 = _guesses_log10(secret)
    if guesses_log10 < MIN_GUESSES_LOG10:
        raise WeakSecretError(
            f"the P2P secret is guessable (about 10^{guesses_log10:.0f} guesses: dictionary words, "
            f"repeats or sequences); {_FIX}"
        )
