"""`pinkybrain chat`: an interactive conversation with the node, kept as one session.

Each line typed is a query with the session's id, so the node sends the model the earlier turns (newest
first within its context); each answer streams as it is generated. Line editing and a history of the
lines typed come from the standard library's readline (kept in $PINKYBRAIN_HOME/chat_history) where
Python has it; piped input works too, a line per turn. Commands: /exit, /reset (a new session),
/model [NAME], /specialist [NAME], /help.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pinkybrain.skill import output
from pinkybrain.skill.cli import QUERY_TIMEOUT, JsonOpt, TimeoutOpt, UrlOpt, connect, handled, stream_over
from pinkybrain.skill.client import SkillError

HELP = ("/exit ends the chat · /reset starts a new conversation · /model [NAME] sets or shows the model "
        "(/model - lets the node choose) · /specialist [NAME] likewise · anything else is sent")
HISTORY_LINES = 1000


def _history_file() -> Path:
    home = os.environ.get("PINKYBRAIN_HOME") or str(Path.home() / ".pinkybrain")
    return Path(home) / "chat_history"


def _line_editing() -> Path | None:
    """Turn on readline editing and history for a terminal; the history file, or None without one."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return None
    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # the first chat: no history yet
    readline.set_history_length(HISTORY_LINES)
    return path


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass  # history is a convenience; losing it must not fail the chat


class ChatState:
    def __init__(self, session: str | None, specialist: str | None, model: str | None):
        self.session, self.specialist, self.model = session, specialist, model

    def body(self, prompt: str, max_tokens: int | None, temperature: float | None) -> dict:
        return {"prompt": prompt, "mode": "specialist" if self.specialist else "single",
                "specialist": self.specialist, "specialists": [], "model": self.model, "session_id": self.session,
                "max_tokens": max_tokens, "temperature": temperature}

    def command(self, line: str) -> bool:
        """Handle a /command; False when the chat should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit", "bye"):
            return False
        if name == "reset":
            self.session = None
            typer.echo("(a new conversation starts: earlier turns are no longer sent)", err=True)
        elif name in ("model", "specialist"):
            if arg:
                setattr(self, name, None if arg == "-" else arg)
            typer.echo(f"({name}: {getattr(self, name) or 'chosen by the node'})", err=True)
        else:
            typer.echo(HELP, err=True)
        return True


@handled
def chat(
    specialist: Annotated[Optional[str], typer.Option("--specialist", help="answer as this specialist")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="this model for every answer")] = None,
    session: Annotated[Optional[str], typer.Option("--session", help="continue this conversation")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="cap each answer")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0, max=2)] = None,
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Talk with the node: each answer streams, and the model sees the conversation so far. With --json (for
    agents: one line in, one JSON answer out per line), nothing streams and each answer is one JSON line."""
    state = ChatState(session, specialist, model)
    wait = timeout if timeout is not None else QUERY_TIMEOUT
    conn = connect(url, wait)
    interactive = sys.stdin.isatty()
    history = _line_editing()
    if interactive:
        typer.echo(f"chatting with {conn.url} · /help for commands, /exit or Ctrl-D to end", err=True)
    try:
        with conn.client:
            while True:
                try:
                    line = input("you> " if interactive else "")
                except EOFError:
                    break
                except KeyboardInterrupt:  # Ctrl-C drops the line being typed, as shells do
                    typer.echo("", err=True)
                    continue
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if not state.command(line):
                        break
                    continue
                try:
                    if as_json:
                        end = conn.client.request("POST", "/api/query", timeout=wait,
                                                  json_body={**state.body(line, max_tokens, temperature),
                                                             "stream": False})
                        typer.echo(json.dumps(end, ensure_ascii=False))
                    else:
                        end = stream_over(conn, state.body(line, max_tokens, temperature), wait, describe=False)
                except SkillError as exc:  # one failed turn does not end the conversation
                    typer.echo(json.dumps({"error": exc.message}) if as_json else f"pinkybrain: {exc.message}",
                               err=True)
                    continue
                state.session = end.get("session_id") or state.session
                if as_json:
                    continue
                note = output.context_note(end)
                typer.echo(f"({end.get('model') or '?'}" + (f" · {note}" if note else "") + ")", err=True)
    finally:
        _save_history(history)
    if state.session:
        typer.echo(f"(session {state.session}: continue with pinkybrain chat --session {state.session})", err=True)
