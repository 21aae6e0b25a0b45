"""Refuse weak network secrets before a node starts.

Strength is estimated with zxcvbn (Dropbox's estimator: dictionaries, keyboard patterns, repeats,
sequences, dates), on top of three hard rules: present, not the seed's default, at least 32 chars.
"""

from __future__ import annotations

import secrets as _secrets

from zxcvbn import zxcvbn

SEED_DEFAULT_SECRET = "CHANGE_ME_STRONG_SECRET"  # noqa: S105 (the value we refuse, not a credential)
MIN_LENGTH = 32
# ~2^80 guesses: far beyond an offline attack on a captured HMAC, far below a random 32-char secret.
MIN_GUESSES_LOG10 = 24.0
_FIX = (
    "set a generated one: pinkybrain config set p2p.secret "
    "\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\""
)


class WeakSecretError(ValueError):
    """The secret must not be used; str() is one line saying why and how to fix it."""


def generate_secret() -> str:
    return _secrets.token_urlsafe(32)  # 43 chars, 256 bits


def check_secret(secret: str | None) -> None:
    if secret is None or not secret.strip():
        raise WeakSecretError(
            f"no P2P secret is set: set p2p.secret in pinkybrain.yaml or P2P_SECRET; {_FIX}"
        )
    if secret.strip() == SEED_DEFAULT_SECRET or SEED_DEFAULT_SECRET in secret.upper():
        raise WeakSecretError(f"the P2P secret is still the default {SEED_DEFAULT_SECRET!r}; {_FIX}")
    if len(secret) < MIN_LENGTH:
        raise WeakSecretError(
            f"the P2P secret is {len(secret)} characters, at least {MIN_LENGTH} are required; {_FIX}"
        )
    if len(set(secret)) < 6:
        raise WeakSecretError(f"the P2P secret uses only {len(set(secret))} distinct characters; {_FIX}")
    # zxcvbn is quadratic in length; the first 100 characters decide as well as the whole.
    guesses_log10 = float(zxcvbn(secret[:100])["guesses_log10"])
    if guesses_log10 < MIN_GUESSES_LOG10:
        raise WeakSecretError(
            f"the P2P secret is guessable (about 10^{guesses_log10:.0f} guesses: dictionary words, "
            f"repeats or sequences); {_FIX}"
        )
