"""The `pinkybrain` command: the skill's client commands plus the node's local ones, in one CLI.

Client commands (status, query, memory, ...) live in pinkybrain.skill and talk HTTP only; node-local
commands (serve, identity, config) live in pinkybrain.node. Heavy imports happen inside commands, so
`pinkybrain status` starts fast.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer


def build_app() -> typer.Typer:
    import typer

    from pinkybrain import __version__
    from pinkybrain.node import cli as node_cli
    from pinkybrain.skill import cli as skill_cli

    app = typer.Typer(
        name="pinkybrain",
        help="PinkyBrain: a P2P distributed AI network node and its client.",
        no_args_is_help=True,
        # `pinkybrain --install-completion` (bash, zsh, fish, PowerShell) and --show-completion.
        add_completion=True,
        pretty_exceptions_enable=False,
    )

    @app.callback(invoke_without_command=True)
    def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
        if version:
            typer.echo(__version__)
            raise typer.Exit(0)

    skill_cli.register(app)
    node_cli.register(app)
    return app


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        # The node process itself (systemd's ExecStart): a plain foreground `serve` starts without building
        # the CLI; anything else (--daemon, --help, ...) goes through typer below.
        from pinkybrain.node.server import foreground_args, serve

        args = foreground_args(sys.argv[2:])
        if args is not None:
            sys.exit(serve(*args))
    from pinkybrain.skill.cli import json_requested

    app = build_app()
    if not json_requested():
        app(prog_name="pinkybrain")
        return
    # Under --json even a usage error (unknown option, bad value) is one JSON object on stderr.
    try:
        code = app(prog_name="pinkybrain", standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - click's usage errors, whichever click (typer vendors one)
        if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        print(json.dumps({"error": exc.format_message(), "exit_code": exc.exit_code}), file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
