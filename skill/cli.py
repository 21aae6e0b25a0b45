"""The skill's commands (status, ping, query, peers, memory, models, conversations, ...): each finds a node
(skill.discovery, or --url), sends one signed request, and prints a short human summary or, with --json,
the node's answer. Failures are one `pinkybrain: ...` line on stderr and exit status 1.

Mounted on the root `pinkybrain` app by register(); the node's own commands (serve, identity, config)
come from pinkybrain.node.cli, which this module never imports.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from pinkybrain.skill import output
from pinkybrain.skill.client import NodeClient, SkillError, normalize_url, path_part

MODES = ("single", "vote", "chain", "fuse", "compare", "specialist")
PRIVACY_LEVELS = ("private", "peers-only", "public")
EXPORT_FORMATS = ("json", "markdown")
QUERY_TIMEOUT = 600.0  # inference on a modest CPU can take minutes; everything else uses the client default

JsonOpt = Annotated[bool, typer.Option("--json", help="print the node's JSON answer")]
UrlOpt = Annotated[Optional[str], typer.Option("--url", help="node URL, e.g. http://host:8080 (skips discovery)")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="seconds to wait for the node", min=0.1)]


@dataclass
class Connection:
    client: NodeClient
    url: str
    via: str
    ping: dict


def connect(url: str | None, timeout: float | None) -> Connection:
    # Imported here: discovery pulls in subprocess/zeroconf machinery only commands need.
    from pinkybrain.skill.discovery import discover
    from pinkybrain.skill.localconfig import load_local_config

    local = load_local_config()
    secret = local.require_secret()
    if url:
        base, via, ping = normalize_url(url), "url-flag", {}
    else:
        found = discover(local, secret)
        base, via, ping = found.url, found.via, found.info
    return Connection(NodeClient(base, secret, timeout), base, via, ping)


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"pinkybrain: {message}", err=True)
    raise typer.Exit(code)


def handled(fn: Callable) -> Callable:
    """Every failure becomes one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SkillError as exc:
            fail(exc.message, exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except OSError as exc:  # e.g. --output into a folder that does not exist
            fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        except Exception as exc:  # noqa: BLE001 - the user gets one line; PINKYBRAIN_DEBUG=1 shows the rest
            if os.environ.get("PINKYBRAIN_DEBUG"):
                raise
            fail(f"unexpected error: {type(exc).__name__}: {exc} (PINKYBRAIN_DEBUG=1 shows the traceback)")

    return wrapper


def emit(data: Any, as_json: bool, human: Callable[[], str] | str) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        typer.echo(human() if callable(human) else human)


def call(url: str | None, timeout: float | None, method: str, path: str, **kw) -> tuple[Any, Connection]:
    conn = connect(url, timeout)
    with conn.client:
        return conn.client.request(method, path, **kw), conn


def choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise SkillError(f"unknown {what} {value!r}; valid {what}s: {', '.join(allowed)}")
    return value


# -- node -------------------------------------------------------------------------------------------

@handled
def status(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """This node: name, id, version, uptime, mesh, resource guard."""
    data, conn = call(url, timeout, "GET", "/api/status")
    emit(data, as_json, lambda: output.render_status(data, conn.url, conn.via))


@handled
def ping(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Check that a node answers (and which discovery step found it)."""
    conn = connect(url, timeout)
    with conn.client:
        started = time.perf_counter()
        data = conn.client.get("/api/ping")
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
    result = {**(data or {}), "url": conn.url, "discovered_via": conn.via, "latency_ms": latency_ms}
    emit(result, as_json, lambda: f"pong from {result.get('name', '?')} ({result.get('node_id', '?')}) "
                                  f"v{result.get('version', '?')} at {conn.url} in {latency_ms:g} ms "
                                  f"(found via {conn.via})")


@handled
def capabilities(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """The node's hardware: CPU, RAM, disk, GPUs, llama.cpp."""
    data, _ = call(url, timeout, "GET", "/api/capabilities")
    emit(data, as_json, lambda: output.render_capabilities(data))


@handled
def query(
    prompt: Annotated[str, typer.Argument(help="the question or task")],
    mode: Annotated[str, typer.Option("--mode", help="|".join(MODES))] = "single",
    specialist: Annotated[Optional[str], typer.Option("--specialist", help="one specialist, e.g. coder")] = None,
    specialists: Annotated[Optional[str], typer.Option("--specialists", help="comma-separated, e.g. a,b")] = None,
    session: Annotated[Optional[str], typer.Option("--session", help="continue this conversation")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="cap the answer length")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Ask the network: single, vote, chain, fuse, compare or specialist mode."""
    choice(mode, MODES, "mode")
    names = [specialist] if specialist else []
    for name in (specialists or "").split(","):
        if name.strip() and name.strip() not in names:
            names.append(name.strip())
    body = {"prompt": prompt, "mode": mode, "specialists": names, "specialist": specialist,
            "session_id": session, "max_tokens": max_tokens}
    data, _ = call(url, timeout if timeout is not None else QUERY_TIMEOUT, "POST", "/api/query", json_body=body)
    if as_json:
        emit(data, True, "")
        return
    typer.echo(output.answer_text(data or {}))
    if isinstance(data, dict) and data.get("session_id") and not session:
        # On stderr, so the answer alone can be piped; the id is what --session needs next time.
        typer.echo(f"(session {data['session_id']}: continue with --session {data['session_id']})", err=True)


@handled
def peers(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Peers this node is connected to."""
    data, _ = call(url, timeout, "GET", "/api/peers")
    emit(data, as_json, lambda: output.render_peers(data))


@handled
def discover(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Nodes the node has found by itself (mDNS, Tailscale)."""
    data, _ = call(url, timeout, "GET", "/api/discover")
    emit(data, as_json, lambda: output.render_discover(data))


@handled
def score(
    peer_id: Annotated[str, typer.Argument(help="the peer's node id")],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """A peer's credit score, with its inputs."""
    data, _ = call(url, timeout, "GET", f"/api/score/{path_part(peer_id)}")
    emit(data, as_json, lambda: output.render_score(data))


# -- mesh -------------------------------------------------------------------------------------------
mesh_app = typer.Typer(help="The public mesh: join or leave.", no_args_is_help=True)


@mesh_app.command("join")
@handled
def mesh_join(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Join the public mesh."""
    data, _ = call(url, timeout, "POST", "/api/network/mesh/join")
    emit(data, as_json, lambda: (data or {}).get("detail") or "joined the public mesh")


@mesh_app.command("leave")
@handled
def mesh_leave(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Leave the public mesh."""
    data, _ = call(url, timeout, "POST", "/api/network/mesh/leave")
    emit(data, as_json, lambda: (data or {}).get("detail") or "left the public mesh")


# -- memory -----------------------------------------------------------------------------------------
memory_app = typer.Typer(help="Shared CRDT memory: get, set, delete, list.", no_args_is_help=True)
KeyArg = Annotated[str, typer.Argument(help="memory key")]


def memory_value(text: str, force_json: bool, force_string: bool) -> Any:
    """JSON objects and arrays are sent as structures, anything else as the string typed."""
    if force_json and force_string:
        raise SkillError("--json-value and --string exclude each other")
    if force_string:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        if force_json:
            raise SkillError(f"--json-value: not valid JSON: {text[:60]!r}") from None
        return text
    return parsed if force_json or isinstance(parsed, (dict, list)) else text


@memory_app.command("get")
@handled
def memory_get(key: KeyArg, as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Print a key's value (strings bare, structures as JSON)."""
    data, _ = call(url, timeout, "GET", f"/api/memory/{path_part(key)}")
    emit(data, as_json, lambda: output.value_text((data or {}).get("value")))


@memory_app.command("set")
@handled
def memory_set(
    key: KeyArg,
    value: Annotated[str, typer.Argument(help="a string, or a JSON object/array")],
    json_value: Annotated[bool, typer.Option("--json-value", help="parse VALUE as any JSON (42, true, null)")] = False,
    string: Annotated[bool, typer.Option("--string", help="store VALUE as a string even if it looks like JSON")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Write a key."""
    parsed = memory_value(value, json_value, string)
    data, _ = call(url, timeout, "POST", "/api/memory/set", json_body={"key": key, "value": parsed})
    emit(data, as_json, f"stored {key}")


@memory_app.command("delete")
@handled
def memory_delete(key: KeyArg, as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Delete a key."""
    data, _ = call(url, timeout, "DELETE", f"/api/memory/{path_part(key)}")
    emit(data, as_json, f"deleted {key}")


@memory_app.command("list")
@handled
def memory_list(
    prefix: Annotated[str, typer.Option("--prefix", help="only keys starting with this")] = "",
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """List keys."""
    data, _ = call(url, timeout, "GET", "/api/memory", params={"prefix": prefix or None})
    keys = (data or {}).get("keys") or []
    emit(data, as_json, lambda: "\n".join(str(k) for k in keys) if keys else
         ("no keys" + (f" starting with {prefix!r}" if prefix else "")))


# -- models -----------------------------------------------------------------------------------------
models_app = typer.Typer(help="Models in the shared folder: list, share, unshare.", no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="model name (file name without .gguf)")]


@models_app.command("list")
@handled
def models_list(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Models this node has, and which are shared."""
    data, _ = call(url, timeout, "GET", "/api/models")
    emit(data, as_json, lambda: output.render_models(data or {}))


@models_app.command("share")
@handled
def models_share(
    name: NameArg,
    force: Annotated[bool, typer.Option("--force", help="required to share a cloud model")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Share a model with the mesh."""
    data, _ = call(url, timeout, "POST", f"/api/models/{path_part(name)}/share",
                   params={"force": "true" if force else None})
    entry = (data or {}).get("entry") or {}

    def human() -> str:
        digest = str(entry.get("sha256") or "")[:12]
        return (f"shared {entry.get('name', name)}"
                + (f" ({output.size(entry.get('size_bytes'))}, sha256 {digest}…)" if digest else ""))

    emit(data, as_json, human)


@models_app.command("unshare")
@handled
def models_unshare(name: NameArg, as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Stop sharing a model."""
    data, _ = call(url, timeout, "POST", f"/api/models/{path_part(name)}/unshare")
    emit(data, as_json, f"stopped sharing {(data or {}).get('name', name)}")


# -- daemon, update ---------------------------------------------------------------------------------
daemon_app = typer.Typer(help="The node process (start and stop it with `pinkybrain serve`).", no_args_is_help=True)


@daemon_app.command("status")
@handled
def daemon_status(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """The node process: pid, mode, uptime, memory, log file."""
    data, _ = call(url, timeout, "GET", "/api/daemon")
    emit(data, as_json, lambda: output.render_daemon(data or {}))


update_app = typer.Typer(help="Node updates: check, apply.", no_args_is_help=True)


@update_app.command("check")
@handled
def update_check(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Is a newer version available?"""
    data, _ = call(url, timeout, "GET", "/api/update")
    emit(data, as_json, lambda: output.render_update(data or {}))


@update_app.command("apply")
@handled
def update_apply(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Install the available update on the node."""
    data, _ = call(url, timeout, "POST", "/api/update/apply")
    emit(data, as_json, lambda: (data or {}).get("detail") or f"updated to {(data or {}).get('version', '?')}")


# -- conversations ----------------------------------------------------------------------------------
conversations_app = typer.Typer(help="Conversation history: list, search, export, privacy.", no_args_is_help=True)
SessionArg = Annotated[str, typer.Argument(help="conversation (session) id")]


@conversations_app.command("list")
@handled
def conversations_list(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Recent conversations."""
    data, _ = call(url, timeout, "GET", "/api/conversations", params={"limit": limit, "offset": offset})
    emit(data, as_json, lambda: output.render_conversations((data or {}).get("conversations") or []))


@conversations_app.command("search")
@handled
def conversations_search(
    text: Annotated[str, typer.Argument(metavar="QUERY", help="words to look for")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=200)] = 20,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Search conversation history."""
    if not text.strip():
        raise SkillError("give some words to search for")
    data, _ = call(url, timeout, "POST", "/api/conversations/search", params={"q": text, "limit": limit})
    emit(data, as_json, lambda: output.render_search(data or {}))


@conversations_app.command("export")
@handled
def conversations_export(
    session_id: SessionArg,
    fmt: Annotated[str, typer.Option("--format", help="json|markdown")] = "json",
    out: Annotated[Optional[Path], typer.Option("--output", "-o", help="write to this file, not stdout")] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Export one conversation as JSON or Markdown."""
    choice(fmt, EXPORT_FORMATS, "format")
    text, _ = call(url, timeout, "POST", f"/api/conversations/{path_part(session_id)}/export",
                   params={"format": fmt}, raw=True)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        emit({"session_id": session_id, "format": fmt, "output": str(out), "bytes": len(text.encode())},
             as_json, f"wrote {out} ({len(text.encode())} bytes)")
        return
    if as_json:
        content: Any = text
        if fmt == "json":
            try:
                content = json.loads(text)
            except ValueError:
                pass  # shown as the text the node sent
        emit({"session_id": session_id, "format": fmt, "content": content}, True, "")
        return
    typer.echo(text, nl=not text.endswith("\n"))


@conversations_app.command("set-privacy")
@handled
def conversations_set_privacy(
    session_id: SessionArg,
    level: Annotated[str, typer.Argument(metavar="LEVEL", help="private|peers-only|public")],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Set who may see a conversation: private, peers-only or public."""
    choice(level, PRIVACY_LEVELS, "privacy level")
    data, _ = call(url, timeout, "POST", f"/api/conversations/{path_part(session_id)}/privacy",
                   json_body={"privacy": level})
    emit(data, as_json, f"{session_id} is now {level}")


def register(app: typer.Typer) -> None:
    for name, fn in (("status", status), ("ping", ping), ("query", query), ("peers", peers),
                     ("discover", discover), ("score", score), ("capabilities", capabilities)):
        app.command(name)(fn)
    app.add_typer(mesh_app, name="mesh")
    app.add_typer(memory_app, name="memory")
    app.add_typer(models_app, name="models")
    app.add_typer(daemon_app, name="daemon")
    app.add_typer(update_app, name="update")
    app.add_typer(conversations_app, name="conversations")
