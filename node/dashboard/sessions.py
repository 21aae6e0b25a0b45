"""One-time login links and cookie sessions for the dashboard, as pure logic (no sockets, no clock of
its own: callers pass `now`).

The owner asks the node (an owner-signed API call) for a login link. Its token is good once, for a short
time, and the node keeps only its SHA-256. Exchanging it opens a session: a random id for an HttpOnly,
SameSite=Strict cookie plus a CSRF token that the page sends back in a header with every API call, so a
request another site makes the browser send (cookie attached or not) is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

LOGIN_TTL_SECS = 120.0
SESSION_IDLE_SECS = 12 * 3600.0
MAX_PENDING_LOGINS = 32
MAX_SESSIONS = 64


class LoginRefused(Exception):
    """The link was never issued, was already used, or expired."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    csrf: str
    expires_at: float


class DashboardSessions:
    def __init__(self, login_ttl: float = LOGIN_TTL_SECS, idle_secs: float = SESSION_IDLE_SECS):
        self.login_ttl = login_ttl
        self.idle_secs = idle_secs
        self._logins: OrderedDict[str, float] = OrderedDict()  # token digest -> expiry
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # session-id digest -> session

    def issue_login(self, now: float) -> str:
        self._expire(now)
        while len(self._logins) >= MAX_PENDING_LOGINS:
            self._logins.popitem(last=False)  # the oldest unused link stops working
        token = secrets.token_urlsafe(32)
        self._logins[_digest(token)] = now + self.login_ttl
        return token

    def exchange(self, token: str, now: float) -> tuple[str, Session]:
        """Spend a login token (once) for a new session: (session id for the cookie, session)."""
        self._expire(now)
        expires = self._logins.pop(_digest(token or ""), None)
        if expires is None:
            raise LoginRefused("this login link is not valid: it was used already or has expired "
                               "(run `pinkybrain dashboard` for a new one)")
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(24), expires_at=now + self.idle_secs)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def session(self, session_id: str | None, now: float) -> Session | None:
        """The live session for a cookie value, its idle expiry pushed back; None if there is none."""
        if not session_id:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None or session.expires_at <= now:
            self._sessions.pop(key, None)
            return None
        session.expires_at = now + self.idle_secs
        self._sessions.move_to_end(key)
        return session

    def authorise(self, session_id: str | None, csrf: str | None, now: float) -> bool:
        """A state-changing or data call from the page: the cookie's session and its CSRF token."""
        session = self.session(session_id, now)
        return bool(session and csrf and hmac.compare_digest(session.csrf.encode(), csrf.encode()))

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def _expire(self, now: float) -> None:
        for digest in [d for d, expires in self._logins.items() if expires <= now]:
            del self._logins[digest]


# -- for the API's auth middleware (kept free of FastAPI: the node answers its first requests before
# FastAPI is imported, see node/api/front.py) ---------------------------------------------------------
COOKIE = "pb_dashboard"
CSRF_HEADER = "x-pinkybrain-csrf"


def is_dashboard_page(path: str) -> bool:
    return path == "/dashboard" or path.startswith("/dashboard/")


def cookie_principal(app, headers: dict[str, str], now: float | None = None) -> bool:
    """For the API's auth middleware: does this unsigned request come from a live dashboard session
    (its cookie) of this node's owner, with the session's CSRF token in the header?"""
    store = getattr(getattr(app, "state", None), "dashboard_sessions", None)
    if store is None:
        return False  # no login was ever issued (or no app yet, or a bare ASGI test): nothing to check
    cookie = _cookie(headers.get("cookie", ""))
    return store.authorise(cookie, headers.get(CSRF_HEADER), time.time() if now is None else now)


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None
