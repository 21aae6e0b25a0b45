"""The skill's commands (status, ping, query, peers, memory, models, conversations, ...): each finds a node
(skill.discovery, or --url), sends one signed request, and prints a short human summary or, with --json,
the node's answer. Failures are one `pinkybrain: ...` line on stderr (under --json, one JSON object
{"error", "exit_code"}) and exit status 1.

Mounted on the root `pinkybrain` app by register(); the node's own commands (serve, identity, config)
come from pinkybrain.node.cli, which this module never imports.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import httpx
import typer

from pinkybrain.skill import output
from pinkybrain.skill.client import NodeClient, SkillError, name_part, normalize_url, path_part
from pinkybrain.skill.signing import HmacAuth, NodeIdError, canonical_node_id

MODES = ("single", "vote", "chain", "fuse", "compare", "specialist")
PRIVACY_LEVELS = ("private", "peers-only", "public")
EXPORT_FORMATS = ("json", "markdown")
SHARE_TIMEOUT = 3600.0  # `models share`: the node reads and hashes the whole file first
QUERY_TIMEOUT = 600.0  # inference on a modest CPU can take minutes; everything else uses the client default

JsonOpt = Annotated[bool, typer.Option("--json", help="print the node's JSON answer")]
UrlOpt = Annotated[Optional[str], typer.Option("--url", help="node URL, e.g. http://host:8080 (skips discovery)")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="seconds to wait for the node", min=0.1)]
NodeOpt = Annotated[Optional[str], typer.Option("--node", help="talk only to the node with this id "
                                                               "(default: PINKYBRAIN_NODE)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="say on stderr which responders discovery skipped")]
# --node and --verbose, which every command that talks to a node takes (added by `handled`).
_target: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar("target", default=(None, False))


@dataclass
class Connection:
    client: NodeClient
    url: str
    via: str
    ping: dict
    credential: str = "mesh"  # "owner" when signed with the node's owner key


def pinned_node(flag: str | None) -> str | None:
    text = (flag or os.environ.get("PINKYBRAIN_NODE", "")).strip()
    if not text:
        return None
    try:
        return canonical_node_id(text)
    except NodeIdError as exc:
        raise SkillError(f"{'--node' if flag else 'PINKYBRAIN_NODE'}: {exc}") from None


def connect(url: str | None, timeout: float | None) -> Connection:
    # Imported here: discovery pulls in subprocess/zeroconf machinery only commands need.
    from pinkybrain.skill.discovery import discover
    from pinkybrain.skill.localconfig import credential_choice, load_local_config, owner_keys

    node_flag, verbose = _target.get()
    pinned = pinned_node(node_flag)
    local = load_local_config()
    choice = credential_choice()
    keys = {} if choice == "mesh" else owner_keys()
    if url:
        base, via, proven_id = normalize_url(url), "url-flag", None
        # Unproven: it only says which owner key to try; the node must then prove itself with that key.
        ping = identify(base, local.secret, keys, timeout) if keys else {}
    else:
        found = discover(local, local.require_secret(), pinned, verbose)
        base, via, ping, proven_id = found.url, found.via, found.info, found.node_id
    # Every answer is checked against the node id discovery proved (or the pinned one).
    node_id = proven_id or pinned
    # The owner key of the node that answered, when this user holds it (PINKYBRAIN_CREDENTIAL=mesh: never).
    key = keys.get(str(ping.get("node_id")))
    if key is not None:
        client = NodeClient(base, None, timeout, auth=HmacAuth(key, credential="owner"), node_id=node_id,
                            proven=proven_id is not None)
        return Connection(client, client.base_url, via, ping, "owner")
    if choice == "owner":
        raise SkillError(f"no owner key for the node at {base}: copy it from that node's machine "
                         "(`pinkybrain owner-key export`, then `pinkybrain owner-key import`)")
    client = NodeClient(base, local.require_secret(), timeout, node_id=node_id, proven=proven_id is not None)
    return Connection(client, client.base_url, via, ping)


def identify(base: str, secret: str | None, keys: dict[str, str], timeout: float | None) -> dict:
    """The --url node's ping answer, to know whether we hold its owner key: signed with the secret, or
    (no secret here) with each owner key in turn. {} when it does not answer; the real call then says why."""
    attempts = [HmacAuth(secret)] if secret else [HmacAuth(k, credential="owner") for k in keys.values()]
    for auth in attempts:
        try:
            with httpx.Client(auth=auth, timeout=timeout or 5.0) as http:
                response = http.get(f"{base}/api/ping")
        except httpx.HTTPError:
            return {}
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError:
                return {}
            return body if isinstance(body, dict) else {}
    return {}


def json_requested(argv: list[str] | None = None) -> bool:
    """Whether this command line asks for --json (before a `--`, after which words are arguments). Read
    from the command line, not the parsed options: an error can come before or without them."""
    args = (sys.argv if argv is None else argv)[1:]
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def fail(message: str, code: int = 1) -> None:
    """One line on stderr and exit `code`; under --json that line is {"error": ..., "exit_code": ...}."""
    if json_requested():
        typer.echo(json.dumps({"error": message, "exit_code": code}, ensure_ascii=False), err=True)
    else:
        typer.echo(f"pinkybrain: {message}", err=True)
    raise typer.Exit(code)


def handled(fn: Callable) -> Callable:
    """Every failure becomes one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _target.set((kwargs.pop("node", None), kwargs.pop("verbose", False)))
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
        finally:
            _target.reset(token)

    signature = inspect.signature(fn, eval_str=True)
    if "url" in signature.parameters:  # a command that talks to a node also takes --node and --verbose
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint)
                 for name, default, hint in (("node", None, NodeOpt), ("verbose", False, VerboseOpt))]
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        # The objects, not their names: a command defined in another module (skill.dashboard) has no NodeOpt.
        wrapper.__annotations__ = {**fn.__annotations__, "node": NodeOpt, "verbose": VerboseOpt}
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


def read_prompt(prompt: str | None) -> str:
    """The prompt argument; stdin when it is `-`, or when there is none and stdin is not a terminal."""
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif prompt is None:
        raise SkillError("give a prompt (or `-` to read it from stdin)")
    else:
        text = prompt
    if not text.strip():
        raise SkillError("the prompt is empty")
    return text


@handled
def query(
    prompt: Annotated[Optional[str], typer.Argument(help="the question or task; `-` reads it from stdin (so does "
                                                         "no argument with piped input)")] = None,
    mode: Annotated[str, typer.Option("--mode", help="|".join(MODES))] = "single",
    specialist: Annotated[Optional[str], typer.Option("--specialist", help="one specialist, e.g. coder")] = None,
    specialists: Annotated[Optional[str], typer.Option("--specialists", help="comma-separated, e.g. a,b")] = None,
    session: Annotated[Optional[str], typer.Option("--session", help="continue this conversation")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="cap the answer length")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0, max=2,
                                                         help="sampling temperature (0: greedy)")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="print the answer as it is generated "
                                         "(default), or wait for all of it")] = True,
    split: Annotated[bool, typer.Option("--split", help="run the model split over this node and the mesh's "
                                        "lending peers (owner only; `models ps` shows who holds what)")] = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Ask the network: single, vote, chain, fuse, compare or specialist mode.

    The answer goes to stdout as it is generated; the load line, each specialist's progress, votes, steps,
    sources and the status line go to stderr, so the answer alone can be piped. --json waits and prints
    one JSON document (with finish_reason: "length" when --max-tokens cut the answer)."""
    choice(mode, MODES, "mode")
    text = read_prompt(prompt)
    names = [specialist] if specialist else []
    for name in (specialists or "").split(","):
        if name.strip() and name.strip() not in names:
            names.append(name.strip())
    body = {"prompt": text, "mode": mode, "specialists": names, "specialist": specialist,
            "session_id": session, "max_tokens": max_tokens, "temperature": temperature}
    if split:
        body["split"] = True
    wait = timeout if timeout is not None else QUERY_TIMEOUT
    if stream and not as_json:
        conn = connect(url, wait)
        with conn.client:
            data = stream_over(conn, body, wait)
    else:
        data, _ = call(url, wait, "POST", "/api/query", json_body=body)
        if as_json:
            emit(data, True, "")
            return
        data = data if isinstance(data, dict) else {}
        for chunk, to_stderr in output.render_query(data):
            typer.echo(chunk, err=to_stderr)
        cut = output.cut_marker(data)
        if cut:
            typer.echo(cut, err=True)
    if isinstance(data, dict) and data.get("split"):
        typer.echo(output.split_line(data["split"]), err=True)
    if isinstance(data, dict) and data.get("session_id") and not session:
        # On stderr, so the answer alone can be piped; the id is what --session needs next time.
        typer.echo(f"(session {data['session_id']}: continue with --session {data['session_id']})", err=True)


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) pairs from server-sent-event lines; data is parsed JSON."""
    event, data = "message", []

    def parsed() -> Any:
        try:
            return json.loads("\n".join(data))
        except ValueError:
            raise SkillError(f"the node sent an unreadable {event!r} event") from None

    for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield event, parsed()
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:  # a stream cut short without its final blank line
        yield event, parsed()


class StatusLine:
    """One line on stderr that the next update replaces (on a terminal), e.g. while a model loads; off a
    terminal, only its first text is written, as a whole line."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = False
        self.written = False

    def show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            self.shown = True
        elif not self.written:
            sys.stderr.write(text + "\n")
        self.written = True
        sys.stderr.flush()

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def stream_over(conn: Connection, body: dict, timeout: float, *, describe: bool = True) -> dict:
    """POST /api/query with stream=true on an open connection: the load line while a model loads, the
    answer's pieces on stdout as they come (or, in multi-specialist modes, each specialist's progress as it
    finishes and then the result), the cut marker and the status line. Returns the `end` event.
    `describe=False` leaves out the status line (the chat prints its own)."""
    payload = json.dumps({**body, "stream": True}).encode()  # serialised once: the bytes signed are the bytes sent
    start: dict = {}
    printed = False
    status = StatusLine()
    try:
        # Signed, proven by the node (and off loopback sealed); an error answer raises its one line first.
        with conn.client.stream_lines("POST", "/api/query", payload, timeout) as lines:
            for event, data in sse_events(lines):
                data = data if isinstance(data, dict) else {}
                if event == "start":
                    start = data
                elif event == "loading":
                    status.show(output.loading_line(data))
                elif event == "answer":
                    status.clear()
                    typer.echo(output.answer_progress(data), err=True)
                elif event == "token":
                    piece = str(data.get("text", ""))
                    if not printed:  # the final answer is stripped; so is what is shown of it
                        piece = piece.lstrip()
                    if piece:
                        status.clear()
                        typer.echo(piece, nl=False)  # echo flushes: each piece shows as it comes
                        printed = True
                elif event == "error":
                    status.clear()
                    if printed:
                        typer.echo("")
                    raise SkillError(f"the answer stopped: {data.get('detail') or 'unknown error'}")
                elif event == "end":
                    status.clear()
                    if "mode" in data and "answers" in data:  # a multi-specialist result, whole
                        for chunk, to_stderr in output.render_query(data):
                            typer.echo(chunk, err=to_stderr)
                    else:
                        typer.echo("" if printed else output.answer_text(data))
                    cut = output.cut_marker(data)
                    if cut:
                        typer.echo(cut, err=True)
                    if describe and "answers" not in data:
                        score = (start.get("routing") or {}).get("score")
                        typer.echo(output.status_line(data, score=score), err=True)
                    return data
    except httpx.TimeoutException:
        raise SkillError(f"the node at {conn.url} stopped sending the answer for {timeout:g}s "
                         "(raise it with --timeout)") from None
    except httpx.ConnectError as exc:
        raise SkillError(f"cannot reach the node at {conn.url}: {exc or 'cannot connect'}") from None
    except httpx.HTTPError as exc:
        raise SkillError(f"streaming from {conn.url} failed: {exc or type(exc).__name__}") from None
    except KeyboardInterrupt:
        # Closing the response tells the node to stop generating; no traceback for a Ctrl-C.
        status.clear()
        if printed:
            typer.echo("", err=True)
        raise typer.Exit(130) from None
    status.clear()
    if printed:
        typer.echo("")
    raise SkillError("the node closed the stream before the end of the answer")


def stream_query(url: str | None, timeout: float, body: dict, as_json: bool = False) -> dict:
    """Connect, stream one query (see stream_over) and return its `end` event; with `as_json`, print it."""
    conn = connect(url, timeout)
    with conn.client:
        if as_json:
            data = conn.client.request("POST", "/api/query", json_body={**body, "stream": False})
            emit(data, True, "")
            return data
        return stream_over(conn, body, timeout)


@handled
def specialists_cmd(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """The specialist profiles: what each is for, the hints that route to it, the models it prefers."""
    data, _ = call(url, timeout, "GET", "/api/specialists")
    emit(data, as_json, lambda: output.render_specialists(data or {}))


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
    data, _ = call(url, timeout, "GET", f"/api/score/{name_part(peer_id, 'node id')}")
    emit(data, as_json, lambda: output.render_score(data))


# -- trust and credits ------------------------------------------------------------------------------
trust_app = typer.Typer(help="The Web of Trust: vouch for, revoke and inspect public peers.", no_args_is_help=True)


@trust_app.command("vouch")
@handled
def trust_vouch(
    peer_id: Annotated[str, typer.Argument(help="the node id to vouch for")],
    level: Annotated[str, typer.Option("--level", help="how carefully you checked: full or marginal (a note "
                                                        "for others; it does not weigh the vouch)")] = "full",
    ttl_days: Annotated[float, typer.Option("--ttl-days", help="how long the vouch holds")] = 90,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Sign an expiring attestation that a node is who it says: it becomes valid for this node (validity).
    Whether it may introduce others is separate: `trust set ID --introducer`."""
    if level not in ("full", "marginal"):
        raise SkillError(f"--level must be full or marginal, got {level!r}")
    data, _ = call(url, timeout, "POST", "/api/trust/vouch",
                   json_body={"node_id": peer_id, "level": level, "ttl_days": ttl_days})
    emit(data, as_json, lambda: f"vouched ({level}) for {peer_id}\n" + output.render_trust(data))


@trust_app.command("set")
@handled
def trust_set(
    peer_id: Annotated[str, typer.Argument(help="the node id whose introducer trust to set")],
    introducer: Annotated[str, typer.Option("--introducer", help="none, marginal or full")],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """How far this node trusts a key to introduce others (owner-trust, GnuPG style; never shared)."""
    if introducer not in ("none", "marginal", "full"):
        raise SkillError(f"--introducer must be none, marginal or full, got {introducer!r}")
    data, _ = call(url, timeout, "POST", "/api/trust/set", json_body={"node_id": peer_id, "introducer": introducer})
    emit(data, as_json, lambda: f"introducer trust for {peer_id}: {introducer}\n" + output.render_trust(data))


@trust_app.command("revoke")
@handled
def trust_revoke(
    peer_id: Annotated[str, typer.Argument(help="the node id whose vouches to withdraw")],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Withdraw this node's vouches for a node (a signed revocation peers also learn)."""
    data, _ = call(url, timeout, "POST", "/api/trust/revoke", json_body={"node_id": peer_id})
    emit(data, as_json, lambda: f"revoked vouches for {peer_id}\n" + output.render_trust(data))


@trust_app.command("show")
@handled
def trust_show(
    peer_id: Annotated[str, typer.Argument(help="the node id to check")],
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Whether this node finds a key valid, by which path, and the attestations it holds about it."""
    data, _ = call(url, timeout, "GET", f"/api/trust/{name_part(peer_id, 'node id')}")
    emit(data, as_json, lambda: output.render_trust(data))


@handled
def credits(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """This node's credit balance and ledger."""
    data, _ = call(url, timeout, "GET", "/api/credits")
    emit(data, as_json, lambda: "\n".join(f"{k:<12} {v}" for k, v in (data or {}).items()))


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
PublicOpt = Annotated[bool, typer.Option("--public", help="the public mesh's memory instead of the private network's")]


def _network(public: bool) -> dict:
    return {"network": "public"} if public else {}


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
def memory_get(key: KeyArg, public: PublicOpt = False, as_json: JsonOpt = False, url: UrlOpt = None,
               timeout: TimeoutOpt = None) -> None:
    """Print a key's value (strings bare, structures as JSON)."""
    data, _ = call(url, timeout, "GET", f"/api/memory/{path_part(key)}", params=_network(public))
    emit(data, as_json, lambda: output.value_text((data or {}).get("value")))


@memory_app.command("set")
@handled
def memory_set(
    key: KeyArg,
    value: Annotated[str, typer.Argument(help="a string, or a JSON object/array")],
    json_value: Annotated[bool, typer.Option("--json-value", help="parse VALUE as any JSON (42, true, null)")] = False,
    string: Annotated[bool, typer.Option("--string", help="store VALUE as a string even if it looks like JSON")] = False,
    public: PublicOpt = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Write a key."""
    parsed = memory_value(value, json_value, string)
    data, _ = call(url, timeout, "POST", "/api/memory/set",
                   json_body={"key": key, "value": parsed, **_network(public)})
    emit(data, as_json, f"stored {key}")


@memory_app.command("delete")
@handled
def memory_delete(key: KeyArg, public: PublicOpt = False, as_json: JsonOpt = False, url: UrlOpt = None,
                  timeout: TimeoutOpt = None) -> None:
    """Delete a key."""
    data, _ = call(url, timeout, "DELETE", f"/api/memory/{path_part(key)}", params=_network(public))
    emit(data, as_json, f"deleted {key}")


@memory_app.command("list")
@handled
def memory_list(
    prefix: Annotated[str, typer.Option("--prefix", help="only keys starting with this")] = "",
    public: PublicOpt = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """List keys."""
    data, _ = call(url, timeout, "GET", "/api/memory", params={"prefix": prefix or None, **_network(public)})
    keys = (data or {}).get("keys") or []
    emit(data, as_json, lambda: "\n".join(str(k) for k in keys) if keys else
         ("no keys" + (f" starting with {prefix!r}" if prefix else "")))


# -- models -----------------------------------------------------------------------------------------
models_app = typer.Typer(help="Models in the shared folder: list, ps, share, unshare.", no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="model name (file name without .gguf)")]


@models_app.command("list")
@handled
def models_list(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Models this node has, and which are shared."""
    data, _ = call(url, timeout, "GET", "/api/models")
    emit(data, as_json, lambda: output.render_models(data or {}))


@models_app.command("ps")
@handled
def models_ps(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Loaded models: where they live (CPU/GPU), RAM and VRAM, idle time, when keep-alive unloads them."""
    data, _ = call(url, timeout, "GET", "/api/models/ps")
    emit(data, as_json, lambda: output.render_models_ps(data or {}))


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
    # The node hashes the whole file before it signs the share: minutes for a large model.
    data, _ = call(url, SHARE_TIMEOUT if timeout is None else timeout, "POST", f"/api/models/{name_part(name, 'model name')}/share",
                   params={"force": "true" if force else None})
    entry = (data or {}).get("entry") or {}
    warning = (data or {}).get("cost_warning")
    if warning:
        # First and on stderr, even with --json: it is the one thing a human must not miss.
        typer.secho(warning, err=True, fg=typer.colors.RED, bold=True)

    def human() -> str:
        digest = str(entry.get("sha256") or "")[:12]
        return (f"shared {entry.get('name', name)}"
                + (f" ({output.size(entry.get('size_bytes'))}, sha256 {digest}…)" if digest else ""))

    emit(data, as_json, human)


@models_app.command("unshare")
@handled
def models_unshare(name: NameArg, as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Stop sharing a model."""
    data, _ = call(url, timeout, "POST", f"/api/models/{name_part(name, 'model name')}/unshare")
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
def update_apply(
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade", help="install the release even if it is older")
    ] = False,
    wait: Annotated[bool, typer.Option(help="wait for the restarted node's outcome")] = True,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Download, verify and install the feed's release; the node restarts, and rolls back if it fails."""
    import sys
    import threading

    conn = connect(url, timeout)
    with conn.client:
        # The node downloads and verifies inside the POST; meanwhile GET ?fetch=false reports its progress.
        result: dict = {}

        def post() -> None:
            try:
                result["data"] = conn.client.request(
                    "POST", "/api/update/apply", json_body={"allow_downgrade": allow_downgrade}, timeout=1800
                )
            except SkillError as exc:
                result["error"] = exc

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        bar, shown = None, 0
        while poster.is_alive():
            poster.join(0.3)
            if as_json or not poster.is_alive():
                continue
            try:
                status = conn.client.request("GET", "/api/update", params={"fetch": "false"}) or {}
            except SkillError:
                continue
            progress = status.get("progress")
            if progress and progress.get("total"):
                if bar is None:
                    bar = click.progressbar(length=progress["total"], label="downloading", file=sys.stderr)
                bar.update(progress["done"] - shown)
                shown = progress["done"]
        if bar is not None:
            bar.render_finish()
        if "error" in result:
            raise result["error"]
        data = result["data"] or {}
        if not as_json:
            typer.echo(data.get("detail", "update accepted"))
        outcome = None
        deadline = time.monotonic() + float(data.get("health_timeout_secs") or 60) * 2 + 120
        while wait and time.monotonic() < deadline:
            time.sleep(0.5)
            try:  # the node is down for a while during the restart
                status = conn.client.request("GET", "/api/update", params={"fetch": "false"}) or {}
            except SkillError:
                continue
            last = status.get("last_attempt")
            if last and last.get("id") == data.get("attempt") and last.get("final"):
                outcome = last
                break
    if as_json:
        emit({**data, "outcome": outcome}, True, "")
    elif wait and outcome is None:
        fail("no outcome yet; `pinkybrain update check` shows it once the node answers again")
    if outcome and outcome.get("state") != "succeeded":
        what = str(outcome.get("state", "failed")).replace("_", " ")
        fail(f"update to {outcome.get('to')} {what}: {outcome.get('reason')}")
    if outcome and not as_json:
        typer.echo(f"updated {outcome.get('from')} -> {outcome.get('to')}; the node runs {outcome.get('to')}")


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
    text, _ = call(url, timeout, "POST", f"/api/conversations/{name_part(session_id, 'session id')}/export",
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
    data, _ = call(url, timeout, "POST", f"/api/conversations/{name_part(session_id, 'session id')}/privacy",
                   json_body={"privacy": level})
    emit(data, as_json, f"{session_id} is now {level}")


# -- owner key, /v1 API keys --------------------------------------------------------------------------
owner_key_app = typer.Typer(help="The owner key: this machine's proof that it owns its node.", no_args_is_help=True)


@owner_key_app.command("export")
@handled
def owner_key_export(as_json: JsonOpt = False) -> None:
    """Print this machine's owner key as a token, to import on another machine you drive the node from.
    Anyone holding it owns the node: move it only over a channel you trust."""
    from pinkybrain.skill.localconfig import export_owner_key

    token = export_owner_key()
    emit({"token": token, "node_id": token.split(":")[1]}, as_json, token)


@owner_key_app.command("import")
@handled
def owner_key_import(
    token: Annotated[str, typer.Argument(help="what `owner-key export` printed ('-': read it from stdin)")],
    as_json: JsonOpt = False,
) -> None:
    """Keep another machine's owner key here (mode 0600): commands to that node then run as its owner."""
    import sys

    from pinkybrain.skill.localconfig import IMPORTED_KEYS_FILE, import_owner_key, pinkybrain_home

    node_id = import_owner_key(sys.stdin.readline() if token == "-" else token)  # noqa: S105 - "-" means stdin
    path = pinkybrain_home() / IMPORTED_KEYS_FILE
    emit({"node_id": node_id, "file": str(path)}, as_json, f"imported the owner key of {node_id} into {path}")


keys_app = typer.Typer(help="API keys for the OpenAI-compatible /v1 endpoints (owner only).", no_args_is_help=True)


@keys_app.command("create")
@handled
def keys_create(
    name: Annotated[str, typer.Argument(help="a name for the key, e.g. the app that uses it")],
    scope: Annotated[str, typer.Option("--scope", help="owner (cloud models too) or query (what a mesh member "
                                                       "may use)")] = "query",
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Create a key; it is printed this once (the node keeps only its hash)."""
    choice(scope, ("owner", "query"), "scope")
    data, conn = call(url, timeout, "POST", "/api/keys", json_body={"name": name, "scope": scope})
    emit({**data, "base_url": f"{conn.url}/v1"}, as_json,
         f"OPENAI_API_KEY={data['api_key']}\nOPENAI_BASE_URL={conn.url}/v1\n"
         f"(key {name!r}, scope {scope}: shown only now)")


@keys_app.command("list")
@handled
def keys_list(as_json: JsonOpt = False, url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Names, scopes and creation dates of the keys (never the keys)."""
    data, _ = call(url, timeout, "GET", "/api/keys")
    items = (data or {}).get("keys") or []
    emit(data, as_json, lambda: "\n".join(
        f"{k['name']:<24} {k['scope']:<6} created {time.strftime('%Y-%m-%d %H:%M', time.localtime(k['created_at']))}"
        for k in items) or "no API keys")


@keys_app.command("revoke")
@handled
def keys_revoke(name: Annotated[str, typer.Argument(help="the key's name")], as_json: JsonOpt = False,
                url: UrlOpt = None, timeout: TimeoutOpt = None) -> None:
    """Revoke a key: clients using it get 401 from now on."""
    data, _ = call(url, timeout, "DELETE", f"/api/keys/{path_part(name)}")
    emit(data, as_json, f"revoked {name}")


DEFAULT_OPENAI_KEY = "default"
OPENAI_KEYS_FILE = "openai-keys.json"


@handled
def openai_key(
    rotate: Annotated[bool, typer.Option("--rotate", help="replace the default key (the old one stops working)")]
    = False,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """The owner's default /v1 key and the URL of the node it is for (creates the key the first time).

    The node keeps only the key's hash; this machine keeps the key in $PINKYBRAIN_HOME/openai-keys.json
    (mode 0600) to show it again."""
    from pinkybrain.skill.localconfig import _read_json, pinkybrain_home, write_private

    conn = connect(url, timeout)
    with conn.client:
        if conn.credential != "owner":
            raise SkillError(f"only the owner of the node at {conn.url} issues its API keys, and this machine has "
                             "no owner key for it (`pinkybrain owner-key import`)")
        node_id = str(conn.ping.get("node_id"))
        cache_file = pinkybrain_home() / OPENAI_KEYS_FILE
        cache = (_read_json(cache_file) or {}).get("keys") or {}
        key = None if rotate else cache.get(node_id)
        if key is not None:
            try:  # still valid? (revoked or replaced elsewhere: make a new one)
                check = httpx.get(f"{conn.url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                                  timeout=conn.client.timeout)
                key = key if check.status_code == 200 else None
            except httpx.HTTPError as exc:
                raise SkillError(f"cannot reach the node at {conn.url}: {exc or type(exc).__name__}") from None
        if key is None:
            created = conn.client.post("/api/keys", json_body={"name": DEFAULT_OPENAI_KEY, "scope": "owner",
                                                               "replace": True})
            key = created["api_key"]
            write_private(cache_file, json.dumps({"keys": {**cache, node_id: key}}, indent=2).encode())
    base = f"{conn.url}/v1"
    emit({"api_key": key, "base_url": base, "name": DEFAULT_OPENAI_KEY, "node_id": node_id}, as_json,
         f"OPENAI_API_KEY={key}\nOPENAI_BASE_URL={base}")


def register(app: typer.Typer) -> None:
    for name, fn in (("status", status), ("ping", ping), ("query", query), ("peers", peers),
                     ("discover", discover), ("score", score), ("capabilities", capabilities),
                     ("specialists", specialists_cmd)):
        app.command(name)(fn)
    from pinkybrain.skill.chat import chat  # its own module: it imports this one

    app.command("chat")(chat)
    app.add_typer(mesh_app, name="mesh")
    app.add_typer(trust_app, name="trust")
    app.command("credits")(credits)
    app.add_typer(memory_app, name="memory")
    app.add_typer(models_app, name="models")
    app.add_typer(daemon_app, name="daemon")
    app.add_typer(update_app, name="update")
    app.add_typer(conversations_app, name="conversations")
    app.add_typer(keys_app, name="keys")
    app.add_typer(owner_key_app, name="owner-key")
    app.command("openai-key")(openai_key)
    from pinkybrain.skill.dashboard import dashboard

    app.command("dashboard")(dashboard)
