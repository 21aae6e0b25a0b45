"""PinkyBrain: a P2P distributed AI network.

The installed layout is one namespace: `pinkybrain.skill` (the light client, from `skill/`) and
`pinkybrain.node` (the node service, from `node/`). This root package only dispatches commands.
"""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("pinkybrain")
except PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0.0.0+unknown"
