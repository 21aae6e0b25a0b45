"""Who may call what: the three principals, the route -> principal table, and the object-level rules
(conversation privacy, cloud models) that depend on the principal. Pure logic, no I/O.

The table below is the one place the HTTP API's access rules live: the auth middleware
(node/api/auth.py) refuses a request whose principal ranks below its route's before reading its body,
and README.md shows the same table, rendered by render_route_table() (a test keeps them equal).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Principal(enum.IntEnum):
    """Ranked: a principal may do whatever a lower-ranked one may."""

    PUBLIC = 1  # a public-mesh peer, known by its Ed25519 id and valid in this node's Web of Trust
    MEMBER = 2  # holds the network secret: uses what the node shares, never owns it
    OWNER = 3  # holds the owner key that only the node's own machine creates: full control

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class AuthContext:
    """What the auth middleware learned about a request, stored as scope["pinkybrain.auth"]."""

    principal: Principal
    # The key that verified the request: the owner key or the network secret (as bytes). Empty for a
    # bearer-key /v1 request and for a public peer (whose Ed25519 id is in peer_id).
    credential: bytes
    nonce: str | None  # the signed request's nonce (None for a bearer key)
    key_name: str | None = None  # the /v1 API key's name, for a bearer-key request
    peer_id: str | None = None  # the public peer's node id, for a PUBLIC request


AUTH_SCOPE_KEY = "pinkybrain.auth"

KIB = 1024
SMALL_BODY = 64 * KIB  # routes that take no body or a few fields


@dataclass(frozen=True)
class RouteRule:
    method: str
    path: str  # FastAPI's template, e.g. /api/memory/{key:path}
    principal: Principal  # the lowest principal allowed
    body_limit: int = SMALL_BODY
    note: str = ""  # what else applies inside the route (shown in the README table)

    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\{[^}:]+:path\}", "(.+)", re.escape(self.path).replace(r"\{", "{").replace(r"\}", "}"))
        regex = re.sub(r"\{[^}]+\}", "([^/]+)", regex)
        return re.compile(f"^{regex}$")


OWN, MEM, PUB = Principal.OWNER, Principal.MEMBER, Principal.PUBLIC
PRIVACY_NOTE = "owner: every conversation; member: peers-only and public; public peer: public"
CLOUD_NOTE = "cloud models: owner only (unless shared with --force); members always under the resource guard"

ROUTES: tuple[RouteRule, ...] = (
    RouteRule("GET", "/api/ping", PUB),
    RouteRule("GET", "/api/openapi.json", MEM),
    RouteRule("GET", "/api/status", MEM),
    RouteRule("GET", "/api/capabilities", MEM),
    RouteRule("GET", "/api/peers", MEM),
    RouteRule("GET", "/api/discover", OWN, note="lists this machine's LAN and tailnet neighbours"),
    RouteRule("GET", "/api/daemon", OWN),
    RouteRule("GET", "/api/update", OWN),
    RouteRule("POST", "/api/update/apply", OWN),
    RouteRule("POST", "/api/network/mesh/join", OWN),
    RouteRule("POST", "/api/network/mesh/leave", OWN),
    RouteRule("POST", "/api/query", MEM, body_limit=1024 * KIB, note=CLOUD_NOTE),
    RouteRule("GET", "/api/memory", MEM),
    RouteRule("GET", "/api/memory/{key:path}", MEM),
    RouteRule("POST", "/api/memory/set", MEM, body_limit=1024 * KIB),
    RouteRule("DELETE", "/api/memory/{key:path}", MEM),
    RouteRule("GET", "/api/models", MEM, note="members see local models and shared cloud models only"),
    RouteRule("GET", "/api/models/ps", MEM, note="loaded models: memory, device, idle time"),
    RouteRule("GET", "/api/specialists", MEM),
    RouteRule("POST", "/api/models/{name}/share", OWN),
    RouteRule("POST", "/api/models/{name}/unshare", OWN),
    RouteRule("GET", "/api/conversations", PUB, note=PRIVACY_NOTE),
    RouteRule("POST", "/api/conversations/search", PUB, note=PRIVACY_NOTE),
    RouteRule("POST", "/api/conversations/{session_id}/export", PUB, note=PRIVACY_NOTE),
    RouteRule("POST", "/api/conversations/{session_id}/privacy", OWN),
    RouteRule("POST", "/api/trust/vouch", OWN),
    RouteRule("POST", "/api/trust/revoke", OWN),
    RouteRule("POST", "/api/trust/set", OWN),
    RouteRule("GET", "/api/trust/{node_id}", MEM),
    RouteRule("GET", "/api/score/{peer}", MEM),
    RouteRule("GET", "/api/credits", OWN),
    RouteRule("GET", "/api/keys", OWN),
    RouteRule("POST", "/api/keys", OWN),
    RouteRule("DELETE", "/api/keys/{name}", OWN),
    RouteRule("POST", "/api/dashboard/login", OWN, note="a one-time dashboard login link"),
    RouteRule("GET", "/api/events", OWN, note="recent operational log lines (the dashboard's events)"),
    RouteRule("GET", "/v1/models", MEM, note="members and query keys do not see unshared cloud models"),
    RouteRule("POST", "/v1/chat/completions", MEM, body_limit=4096 * KIB, note=CLOUD_NOTE),
    RouteRule("GET", "/v1/models/{model_id:path}", MEM, note="members see what /v1/models lists for them"),
    RouteRule("POST", "/v1/completions", MEM, body_limit=4096 * KIB, note="local models only; " + CLOUD_NOTE),
    RouteRule("POST", "/v1/embeddings", MEM, body_limit=4096 * KIB, note="a local GGUF in embedding mode"),
)
# An unknown path still needs a member's signature (FastAPI then answers 404) and gets no room for a body.
UNKNOWN_ROUTE = RouteRule("ANY", "(a route this node does not have)", MEM)


class RouteTable:
    """Exact paths by dict, templated ones by regex: one lookup per request."""

    def __init__(self, rules: tuple[RouteRule, ...] = ROUTES):
        self._exact: dict[tuple[str, str], RouteRule] = {}
        self._templated: list[tuple[str, re.Pattern[str], RouteRule]] = []
        for rule in rules:
            if "{" in rule.path:
                self._templated.append((rule.method, rule.pattern(), rule))
            else:
                self._exact[(rule.method, rule.path)] = rule

    def rule(self, method: str, path: str) -> RouteRule:
        if method == "HEAD":  # answered like GET by the router: the same rule
            method = "GET"
        found = self._exact.get((method, path))
        if found is not None:
            return found
        for rule_method, pattern, rule in self._templated:
            if rule_method == method and pattern.match(path):
                return rule
        return UNKNOWN_ROUTE


def refusal(rule: RouteRule, principal: Principal) -> str:
    """The one line a 403 carries."""
    who = {Principal.MEMBER: "a mesh member (network secret)", Principal.PUBLIC: "a public peer"}[principal]
    needs = "this node's owner (owner key: `pinkybrain owner-key export`/`import`)" \
        if rule.principal is Principal.OWNER else "a mesh member (network secret)"
    return f"{rule.method} {rule.path} is for {needs}; this request comes from {who}"


# -- object-level rules -------------------------------------------------------------------------------
def visible_privacy(principal: Principal) -> tuple[str, ...]:
    """The conversation privacy levels a principal may list, search and export."""
    if principal is Principal.OWNER:
        return ("private", "peers-only", "public")
    if principal is Principal.MEMBER:
        return ("peers-only", "public")
    return ("public",)


def may_use_cloud_model(principal: Principal, shared_with_force: bool) -> bool:
    """Cloud models spend the owner's money: the owner's alone, unless the owner shared one with force."""
    return principal is Principal.OWNER or shared_with_force


# -- CLI commands -> the route each one calls (local ones act on this machine's files) ------------------
CLI_COMMANDS: tuple[tuple[str, str], ...] = (
    ("ping", "GET /api/ping"),
    ("status", "GET /api/status"),
    ("capabilities", "GET /api/capabilities"),
    ("peers", "GET /api/peers"),
    ("discover", "GET /api/discover"),
    ("score", "GET /api/score/{peer}"),
    ("credits", "GET /api/credits"),
    ("query", "POST /api/query"),
    ("chat", "POST /api/query"),
    ("specialists", "GET /api/specialists"),
    ("models ps", "GET /api/models/ps"),
    ("memory get/set/delete/list", "GET /api/memory"),
    ("models list", "GET /api/models"),
    ("models share/unshare", "POST /api/models/{name}/share"),
    ("conversations list/search/export", "GET /api/conversations"),
    ("conversations set-privacy", "POST /api/conversations/{session_id}/privacy"),
    ("trust show", "GET /api/trust/{node_id}"),
    ("trust vouch/revoke/set", "POST /api/trust/vouch"),
    ("mesh join/leave", "POST /api/network/mesh/join"),
    ("update check/apply", "GET /api/update"),
    ("daemon status", "GET /api/daemon"),
    ("keys create/list/revoke", "GET /api/keys"),
    ("openai-key", "POST /api/keys"),
    ("dashboard", "POST /api/dashboard/login"),
)
LOCAL_COMMANDS = ("serve", "identity", "config", "owner-key", "release", "tracker", "service")


def cli_principal(route: str) -> Principal:
    """The principal a command needs: its route's, but at least a member's (the skill signs as the owner
    or as a mesh member; public peers reach the HTTP API with their own Ed25519 signatures, not the CLI)."""
    method, path = route.split(" ", 1)
    return max(MEM, next(r.principal for r in ROUTES if r.method == method and r.path == path))


WHO = {OWN: "owner", MEM: "owner, member", PUB: "owner, member, public peer"}


def render_route_table() -> str:
    """The Markdown table README.md carries (routes, then CLI commands)."""
    lines = ["| Route | Who may call it | Also |", "|---|---|---|"]
    for rule in ROUTES:
        who = WHO[rule.principal]
        lines.append(f"| `{rule.method} {rule.path}` | {who} | {rule.note} |")
    lines += ["", "| Command | Who may run it |", "|---|---|"]
    for command, route in CLI_COMMANDS:
        who = WHO[cli_principal(route)]
        lines.append(f"| `pinkybrain {command}` | {who} |")
    lines.append(f"| `pinkybrain {'`, `'.join(LOCAL_COMMANDS)}` | this machine's user (local files) |")
    return "\n".join(lines)
