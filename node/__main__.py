"""`python -m pinkybrain.node <serve|identity|config>`: the node's own commands (what the daemon runs)."""

import sys

if sys.argv[1:2] == ["serve"]:
    # A plain foreground `serve` (how the daemon and the updater start the node) skips building the CLI:
    # see server.foreground_args. Anything else (--daemon, --stop, --help, ...) goes through typer.
    from pinkybrain.node.server import foreground_args, serve

    args = foreground_args(sys.argv[2:])
    if args is not None:
        sys.exit(serve(*args))

from pinkybrain.node.cli import main

main()
