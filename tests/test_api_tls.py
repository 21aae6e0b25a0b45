"""`api.tls`: the node also serves its API over HTTPS, with a certificate whose key is the node's identity,
so an OpenAI client (which cannot seal) pins it by its file and its traffic is encrypted."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import httpx
import pytest

from nodes import free_port, run_cli
from pinkybrain.node.core.tls_cert import certificate_node_id


def pinned(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def wait_for_https(url: str, **kw) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=5, **kw)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_v1_over_https_with_a_certificate_bound_to_the_node_id(node_factory):
    port = free_port()
    node = node_factory(extra={"api.tls": True, "api.tls_port": port})
    cert = node.home / "tls" / "cert.pem"
    node_id = node.get("/api/ping").json()["node_id"]
    assert certificate_node_id(cert.read_bytes()) == node_id  # its key is the node's identity

    key = json.loads(run_cli("openai-key", "--json", "--url", node.url, env=node.env).stdout)  # as the owner
    bearer = {"authorization": f"Bearer {key['api_key']}"}
    models = wait_for_https(f"https://127.0.0.1:{port}/v1/models", verify=pinned(cert), headers=bearer)
    assert models.status_code == 200 and models.json()["object"] == "list"
    assert wait_for_https(f"https://localhost:{port}/v1/models", verify=pinned(cert), headers=bearer).status_code == 200
    refused = wait_for_https(f"https://127.0.0.1:{port}/v1/models", verify=pinned(cert),
                             headers={"authorization": "Bearer pb-wrong"})
    assert refused.status_code == 401  # the same auth as on the plain port

    with pytest.raises(httpx.ConnectError):  # not trusted without the pinned certificate
        httpx.get(f"https://127.0.0.1:{port}/v1/models", headers=bearer, timeout=5)
    with pytest.raises(httpx.HTTPError):  # no clear text on the HTTPS port
        httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=bearer, timeout=5)

    # A restart serves the same certificate file, so a client's pin stays good.
    before = cert.read_bytes()
    node.stop()
    again = node_factory(home=node.home, port=node.port, secret=node.secret,
                         extra={"api.tls": True, "api.tls_port": port})
    assert wait_for_https(f"https://127.0.0.1:{port}/v1/models", verify=pinned(cert), headers=bearer).status_code == 200
    assert cert.read_bytes() == before
    assert "Traceback" not in again.log()
