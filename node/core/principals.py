"""Who a request to the node's API comes from, as the auth middleware established it.

The auth middleware stores an AuthContext in the ASGI scope under SCOPE_KEY; middleware and routes
inside it read that entry instead of re-checking the request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SCOPE_KEY = "pinkybrain.auth"


class Principal(enum.Enum):
    OWNER = "owner"
    MEMBER = "member"
    PUBLIC = "public"


@dataclass(frozen=True)
class AuthContext:
    principal: Principal
    credential: bytes  # the key that verified the request (owner key or network secret); b"" for a /v1 bearer key
    nonce: str | None  # the signed request's nonce; None for a bearer-key request
    key_name: str | None = None  # the /v1 API key's name, when one was used
