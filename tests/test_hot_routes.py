"""The status snapshot of node/api/hot_routes.py: shared under load, never older than a caller's own change.

Pure ASGI (no sockets): the snapshot logic is about ordering between requests, which a real node's
timing would only make flaky. The hot routes on real nodes (auth, proof, principal table) are covered
by test_api_auth, test_principals and test_signing_compat.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pinkybrain.node.api import hot_routes
from pinkybrain.node.api.hot_routes import HotRoutes


class World:
    """What the status answer reports: a counter the 'app' behind the hot routes changes."""

    def __init__(self):
        self.value = 0
        self.builds = 0


@pytest.fixture
def world(monkeypatch) -> World:
    w = World()

    def fake_status(_runtime):
        w.builds += 1
        return {"value": w.value}

    monkeypatch.setattr(hot_routes, "status_answer", fake_status)
    return w


async def call(app, method: str, path: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def changing_app(world: World, *, started: asyncio.Event | None = None, release: asyncio.Event | None = None,
                 answered: asyncio.Event | None = None, linger: asyncio.Event | None = None):
    """The app behind the hot routes: a request changes the world (after waiting, when told to), answers,
    and may go on working after its answer (as background tasks and dependency clean-ups do)."""

    async def app(scope, receive, send):
        if started is not None:
            started.set()
        if release is not None:
            await release.wait()
        world.value += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        if answered is not None:
            answered.set()
        if linger is not None:
            await linger.wait()

    return app


def status_value(body: bytes) -> int:
    return json.loads(body)["value"]


def test_callers_within_the_window_share_one_build(world):
    routes = HotRoutes(changing_app(world), runtime=None, snapshot_secs=60)

    async def main():
        answers = [await call(routes, "GET", "/api/status") for _ in range(20)]
        assert set(answers) == {(200, b'{"value":0}')}

    asyncio.run(main())
    assert world.builds == 1


def test_a_change_is_visible_to_the_next_status_call(world):
    routes = HotRoutes(changing_app(world), runtime=None, snapshot_secs=60)

    async def main():
        assert status_value((await call(routes, "GET", "/api/status"))[1]) == 0
        for expected in (1, 2, 3):
            assert (await call(routes, "POST", "/api/anything"))[0] == 200
            assert status_value((await call(routes, "GET", "/api/status"))[1]) == expected

    asyncio.run(main())


def test_a_snapshot_built_while_a_change_runs_is_not_served_after_its_answer(world):
    started, release, answered, linger = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    app = changing_app(world, started=started, release=release, answered=answered, linger=linger)
    routes = HotRoutes(app, runtime=None, snapshot_secs=60)

    async def main():
        post = asyncio.create_task(call(routes, "POST", "/api/anything"))
        await started.wait()
        # Another caller reads status while the change is under way: it sees the old state, as it should.
        assert status_value((await call(routes, "GET", "/api/status"))[1]) == 0
        release.set()
        await answered.wait()
        # The changing caller has its answer and reads next, while the request's task still runs: never
        # the snapshot from before its change.
        assert status_value((await call(routes, "GET", "/api/status"))[1]) == 1
        linger.set()
        await post

    asyncio.run(main())


def test_the_snapshot_expires_by_itself(world):
    routes = HotRoutes(changing_app(world), runtime=None, snapshot_secs=0.05)

    async def main():
        assert status_value((await call(routes, "GET", "/api/status"))[1]) == 0
        world.value = 7  # a change inside the node, with no request: seen once the window ends
        await asyncio.sleep(0.06)
        assert status_value((await call(routes, "GET", "/api/status"))[1]) == 7

    asyncio.run(main())
    assert world.builds == 2


def test_head_goes_to_the_app_and_builds_no_snapshot(world):
    routes = HotRoutes(changing_app(world), runtime=None, snapshot_secs=60)

    async def main():
        assert (await call(routes, "HEAD", "/api/status"))[0] == 200  # passed to the app, not answered here

    asyncio.run(main())
    assert world.builds == 0 and world.value == 1


def test_ping_follows_a_reload_and_the_host_name(monkeypatch):
    from types import SimpleNamespace

    class Cfg:
        def __init__(self, name):
            self.node_name = name

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(hot_routes, "time", SimpleNamespace(monotonic=lambda: clock.now))
    runtime = SimpleNamespace(cfg=Cfg("first"), identity=SimpleNamespace(node_id="pb-node"), version="1.2.3")
    routes = HotRoutes(None, runtime=runtime)

    def ping() -> dict:
        status, body = asyncio.run(call(routes, "GET", "/api/ping"))
        assert status == 200
        return json.loads(body)

    assert ping() == {"pong": True, "node_id": "pb-node", "name": "first", "version": "1.2.3"}
    runtime.cfg = Cfg("renamed")  # a reload builds a new configuration: the next ping says so
    assert ping()["name"] == "renamed"
    runtime.cfg.node_name = "new-host-name"  # an unnamed node's host name changed: shown once the snapshot ends
    clock.now += hot_routes.PING_SNAPSHOT_SECS / 2
    assert ping()["name"] == "renamed"
    clock.now += hot_routes.PING_SNAPSHOT_SECS
    assert ping()["name"] == "new-host-name"
