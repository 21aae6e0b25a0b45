"""PinkyBrain: a P2P distributed AI network.

The installed layout is one namespace: `pinkybrain.skill` (the light client, from `skill/`) and
`pinkybrain.node` (the node service, from `node/`). This root package only dispatches commands.
"""

import pkgutil

# Run from a source checkout (python -m pinkybrain.v5 in the repo), ./pinkybrain/ comes first on sys.path
# and holds only this file's siblings: merge in the installed package's folder so pinkybrain.node and
# pinkybrain.skill are still found.
__path__ = pkgutil.extend_path(__path__, __name__)

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("pinkybrain")
except PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0.0.0+unknown"
