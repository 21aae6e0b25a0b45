"""A small synchronous client for one node's HTTP API: signed requests, JSON in and out, and every
failure turned into a SkillError whose message is one line a user can act on."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

from pinkybrain.skill.signing import HmacAuth

DEFAULT_TIMEOUT = 30.0


class SkillError(Exception):
    """A failure to show the user as one line (no traceback); exit_code is the process status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def secret_mismatch(url: str) -> str:
    return f"found a node at {url}, but the secret does not match (P2P_SECRET)"


def normalize_url(url: str) -> str:
    """Accept `host:port`, `http://host:port/`, or a URL ending in /api: return the node's base URL."""
    url = url.strip()
    if not url:
        raise SkillError("empty node URL")
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    if url.endswith("/api"):
        url = url[: -len("/api")]
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        raise SkillError(f"not a valid node URL: {url!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise SkillError(f"not a valid node URL: {url!r} (expected http://host:port)")
    return url


def path_part(value: str) -> str:
    """One path segment: keys and names may hold '/', '?', '#' or spaces. A key that is '.' or '..' is sent
    percent-encoded, or the HTTP client would read it as a dot segment and ask another route."""
    if value and set(value) == {"."} and len(value) <= 2:
        return "%2E" * len(value)
    return quote(value, safe="")


def name_part(value: str, what: str) -> str:
    """The segment of a route that takes one name (a model, a session, a node id): a value that cannot be
    one is refused here with its reason, not sent to come back as a bare "Not Found"."""
    if not value:
        raise SkillError(f"the {what} must not be empty")
    if "/" in value or value in (".", ".."):
        raise SkillError(f"{value[:80]!r} cannot be a {what}: it may not contain '/' or be '.' or '..'")
    return quote(value, safe="")


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def describe_refusal(url: str, response: httpx.Response) -> str:
    """The one line for a 401: a wrong secret, or (less often) the clock or a malformed signature."""
    body = _json_or_none(response)
    code = body.get("error") if isinstance(body, dict) else None
    if code in (None, "bad_signature"):
        return secret_mismatch(url)
    detail = body.get("detail") or code
    return f"the node at {url} refused the request: {detail}"


class NodeClient:
    def __init__(self, base_url: str, secret: str, timeout: float | None = None):
        self.base_url = normalize_url(base_url)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._http = httpx.Client(base_url=self.base_url, auth=HmacAuth(secret), timeout=self.timeout,
                                  headers={"User-Agent": "pinkybrain-skill"})

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None,
                timeout: float | None = None, raw: bool = False) -> Any:
        """Send a signed request; return the parsed JSON (or the text when raw), else raise SkillError."""
        kwargs: dict = {"params": {k: v for k, v in (params or {}).items() if v is not None}}
        if json_body is not None:
            # Serialised here, so the bytes signed are the bytes sent.
            kwargs["content"] = json.dumps(json_body).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or "cannot connect"
            raise SkillError(f"cannot reach the node at {self.base_url}: {reason}") from None
        except httpx.TimeoutException:
            waited = timeout if timeout is not None else self.timeout
            raise SkillError(f"the node at {self.base_url} did not answer {method} {path} within {waited:g}s "
                             f"(raise it with --timeout)") from None
        except httpx.HTTPError as exc:
            raise SkillError(f"request to {self.base_url}{path} failed: {exc or type(exc).__name__}") from None
        return self._answer(method, path, response, raw)

    def _answer(self, method: str, path: str, response: httpx.Response, raw: bool) -> Any:
        if response.status_code == 401:
            raise SkillError(describe_refusal(self.base_url, response))
        if response.status_code >= 400:
            body = _json_or_none(response)
            if isinstance(body, dict) and body.get("error") == "http_error" and response.status_code in (404, 405):
                # FastAPI's own "Not Found": the route itself is missing, not the thing asked for.
                raise SkillError(f"the node at {self.base_url} does not support {method} {path.split('?')[0]} "
                                 f"(an older node version?)")
            if isinstance(body, dict) and body.get("detail"):
                detail = body["detail"]
                raise SkillError(detail if isinstance(detail, str) else json.dumps(detail))
            text = " ".join(response.text.split())[:200]
            raise SkillError(f"HTTP {response.status_code} from {self.base_url}{path}" + (f": {text}" if text else ""))
        if raw:
            return response.text
        body = _json_or_none(response)
        if body is None and response.content:
            raise SkillError(f"the node at {self.base_url} sent an answer that is not JSON for {method} {path}")
        return body

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> Any:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw) -> Any:
        return self.request("DELETE", path, **kw)
