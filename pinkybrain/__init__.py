"""PinkyBrain: a P2P distributed AI network.

The installed layout is one namespace: `pinkybrain.skill` (the light client, from `skill/`) and
`pinkybrain.node` (the node service, from `node/`). This root package only dispatches commands.
"""

import pkgutil

# Run from a source checkout (python -m pinkybrain.v5 in the repo), ./pinkybrain/ comes first on sys.path
# and holds only this file's siblings: merge in the installed package's folder so pinkybrain.node and
# pinkybrain.skill are still found.
__path__ = pkgutil.extend_path(__path__, __name__)


def _installed_version() -> str | None:
    """The Version line of the first pinkybrain-*.dist-info on sys.path (the one importlib.metadata finds),
    read directly: importing importlib.metadata (with email, zipfile, csv) is a tenth of a node's start."""
    import os
    import sys

    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            if not (name.startswith("pinkybrain-") and name.endswith(".dist-info")):
                continue
            try:
                with open(os.path.join(entry or ".", name, "METADATA"), encoding="utf-8") as fh:
                    for line in fh:
                        if line.startswith("Version:"):
                            return line[8:].strip()
                        if not line.strip():  # the headers end at the first blank line
                            break
            except OSError:
                continue
    return None


__version__ = _installed_version()
if __version__ is None:  # an egg-info or other layout: the standard lookup
    try:
        from importlib.metadata import PackageNotFoundError, version

        __version__ = version("pinkybrain")
    except PackageNotFoundError:  # running from a tree that was never installed
        __version__ = "0.0.0+unknown"
