import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nodes import RunningNode, start_node  # noqa: E402


@pytest.fixture
def node_factory(tmp_path):
    """Start real node processes; all are stopped (SIGTERM, then SIGKILL) when the test ends."""
    started: list[RunningNode] = []
    counter = iter(range(1000))

    def factory(**kw) -> RunningNode:
        home = kw.pop("home", None) or tmp_path / f"node{next(counter)}"
        node = start_node(home, **kw)
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory) -> RunningNode:
    return node_factory()
