"""A small synchronous client for one node's HTTP API: signed requests, JSON in and out, and every
failure turned into a SkillError whose message is one line a user can act on."""

from __future__ import annotations

import codecs
import ipaddress
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx

from pinkybrain.skill.signing import (
    SEAL_HEADER,
    SEALED_HEADER,
    HmacAuth,
    ProofError,
    RequestSeal,
    check_proof,
)

DEFAULT_TIMEOUT = 30.0
AUTH_REFUSALS = (401, 403)  # answered by the node's auth layer, before any proof


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


def is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def should_seal(url: str) -> bool:
    """Seal every request that leaves this machine; PINKYBRAIN_SEAL=always seals on loopback too."""
    return os.environ.get("PINKYBRAIN_SEAL", "").strip().lower() == "always" or not is_loopback(url)


def unproven(url: str, why: str) -> str:
    return f"the responder at {url} is not a proven node of your network ({why}); its answer is refused"


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
    """Every answer must carry the node's proof (check_proof), from one node id throughout: `node_id` (pinned
    with --node, or proven by discovery) fixes it, else the first proven answer does. Nothing is sent to a
    node that has not proven itself: unless `proven`, a signed ping (holding nothing secret) goes first.
    Off loopback, bodies go sealed to the proven node id."""

    def __init__(self, base_url: str, secret: str | None, timeout: float | None = None, *,
                 auth: httpx.Auth | None = None, node_id: str | None = None, proven: bool = False,
                 seal: bool | None = None):
        """`auth` signs instead of the secret (the owner key: skill.localconfig.Credentials picks it); the
        node proves itself with whichever key signed."""
        self.base_url = normalize_url(base_url)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.auth = auth or HmacAuth(secret or "")
        self.secret = getattr(self.auth, "secret", secret or "")  # the key the answer's proof is made with
        self.node_id = node_id
        self.proven = proven
        self.seal = should_seal(self.base_url) if seal is None else seal
        self._http = httpx.Client(base_url=self.base_url, auth=self.auth, timeout=self.timeout,
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
        content = json.dumps(json_body).encode() if json_body is not None else None
        with self._errors(method, path, timeout):
            response, seal = self._send(method, path, params, content, timeout, stream=False)
            opened = b"".join(_pieces(response, seal)) if SEALED_HEADER in response.headers else None
        return self._answer(method, path, response, raw, opened)

    @contextmanager
    def stream_lines(self, method: str, path: str, content: bytes, timeout: float | None = None
                     ) -> Iterator[Iterator[str]]:
        """A signed, proven (and off loopback sealed) request whose answer is read line by line as it comes;
        an error answer raises SkillError before any line. Transport errors while reading are httpx's."""
        with self._errors(method, path, timeout):
            response, seal = self._send(method, path, None, content, timeout, stream=True)
        try:
            if response.status_code >= 400:
                with self._errors(method, path, timeout):
                    opened = b"".join(_pieces(response, seal))
                self._answer(method, path, response, False, opened)
            yield self._lines(response, seal)
        finally:
            response.close()

    def _send(self, method: str, path: str, params: dict | None, content: bytes | None, timeout: float | None,
              stream: bool) -> tuple[httpx.Response, RequestSeal | None]:
        """Send one request (sealed off loopback) and check the proof on its answer."""
        query = str(httpx.QueryParams({k: v for k, v in (params or {}).items() if v is not None}))
        headers = {"Content-Type": "application/json"} if content is not None else {}
        seal = None
        if not self.proven and path != "/api/ping":
            self._prove_node(timeout)
        if self.seal:
            seal = RequestSeal(self._prove_node(timeout))
            # The query travels inside the seal; the signature covers the sealed bytes.
            content, query = seal.seal(query, content or b""), ""
            headers[SEAL_HEADER] = seal.header
        request = self._http.build_request(method, path + (f"?{query}" if query else ""), content=content,
                                           headers=headers, timeout=self.timeout if timeout is None else timeout)
        response = self._http.send(request, stream=stream)
        try:
            self._prove(response, seal)
        except BaseException:
            response.close()
            raise
        return response, seal

    @contextmanager
    def _errors(self, method: str, path: str, timeout: float | None):
        """Transport failures and a missing or wrong proof become one-line SkillErrors."""
        try:
            yield
        except ProofError as exc:
            raise SkillError(unproven(self.base_url, str(exc))) from None
        except httpx.ConnectError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or "cannot connect"
            raise SkillError(f"cannot reach the node at {self.base_url}: {reason}") from None
        except httpx.TimeoutException:
            waited = timeout if timeout is not None else self.timeout
            raise SkillError(f"the node at {self.base_url} did not answer {method} {path} within {waited:g}s "
                             f"(raise it with --timeout)") from None
        except httpx.HTTPError as exc:
            raise SkillError(f"request to {self.base_url}{path} failed: {exc or type(exc).__name__}") from None

    def _lines(self, response: httpx.Response, seal: RequestSeal | None) -> Iterator[str]:
        """Text lines of a streamed answer (server-sent events), each as soon as it is complete."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            for piece in _pieces(response, seal):
                pending += decoder.decode(piece)
                *complete, pending = pending.split("\n")
                for line in complete:
                    yield line.removesuffix("\r")
        except ProofError as exc:
            raise SkillError(unproven(self.base_url, str(exc))) from None
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending.removesuffix("\r")

    def _prove_node(self, timeout: float | None) -> str:
        """The proven node id (to seal to): from discovery, or proven now by a signed ping (not sealed: it
        carries nothing and its answer holds nothing secret)."""
        if not self.proven:
            request = self._http.build_request("GET", "/api/ping", timeout=self.timeout if timeout is None else timeout)
            response = self._http.send(request)
            if response.status_code in AUTH_REFUSALS:
                self._answer("GET", "/api/ping", response, False)  # raises its one line
            self._prove(response, None)
        return self.node_id

    def _prove(self, response: httpx.Response, seal: RequestSeal | None) -> None:
        if response.status_code in AUTH_REFUSALS:
            # The auth layer's refusal comes before the proof is made: reported by _answer as a refusal,
            # and nothing in it is trusted (the node stays unproven).
            return
        nonce = response.request.headers.get("X-PinkyBrain-Nonce", "")
        self.node_id = check_proof(self.secret, nonce, response.headers, self.node_id,
                                   getattr(self.auth, "proof_key", None))
        self.proven = True
        if seal is not None and response.status_code < 400 and SEALED_HEADER not in response.headers:
            raise ProofError("it answered a sealed request in clear text")

    def _answer(self, method: str, path: str, response: httpx.Response, raw: bool, content: bytes | None = None
                ) -> Any:
        if content is not None:  # read from a stream (opened from sealed frames when it was sealed)
            response = httpx.Response(response.status_code, headers=response.headers, content=content,
                                      request=response.request)
        if response.status_code == 401:
            body = _json_or_none(response)
            if getattr(self.auth, "credential", "mesh") == "owner" and isinstance(body, dict) \
                    and body.get("error") == "bad_signature":
                raise SkillError(f"the node at {self.base_url} refused this machine's owner key for it (replaced "
                                 "since? run `pinkybrain owner-key export` on its machine and import it again)")
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


def _pieces(response: httpx.Response, seal: RequestSeal | None) -> Iterator[bytes]:
    """The answer's body as it comes: opened frame by frame when the node sealed it."""
    if seal is None or SEALED_HEADER not in response.headers:
        yield from response.iter_bytes()
        return
    try:
        chunks = [response.content]  # already read (not streamed)
    except httpx.ResponseNotRead:
        chunks = response.iter_raw()
    for chunk in chunks:
        yield from seal.open_frames(chunk)
    seal.check_complete()
