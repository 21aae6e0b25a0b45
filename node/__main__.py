"""`python -m pinkybrain.node <serve|identity|config>`: the node's own commands (what the daemon runs)."""

from pinkybrain.node.cli import main

main()
