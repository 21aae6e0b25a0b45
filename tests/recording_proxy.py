"""A recording HTTP proxy for tests: forwards every request to a real node unchanged (streamed answers
streamed back as they come) and keeps what the client sent, so a test can show exactly what a real client
(OpenClaw) asks of the node. Credentials are not kept."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "accept-encoding"}
SECRET_HEADERS = {"authorization", "x-api-key", "api-key"}


class RecordingProxy:
    def __init__(self, target: str, host: str = "127.0.0.1"):
        self.target = target.rstrip("/")
        self.records: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the answer ends when the connection closes: no chunking to redo

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                record = {"method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}}
                try:
                    record["body"] = json.loads(body) if body else None
                except ValueError:
                    record["body"] = body.decode("utf-8", "replace")
                started = time.monotonic()
                with httpx.Client(timeout=900) as client, client.stream(
                        self.command, proxy.target + self.path, headers=headers, content=body) as r:
                    record["status"] = r.status_code
                    proxy.records.append(record)
                    self.send_response(r.status_code)
                    for k, v in r.headers.items():
                        if k.lower() not in HOP_BY_HOP:
                            self.send_header(k, v)
                    self.end_headers()
                    answer = bytearray()
                    for chunk in r.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        answer += chunk
                # How long the node took and the end of what it answered: a slow test can say where time went.
                record["secs"] = round(time.monotonic() - started, 1)
                record["answer_tail"] = bytes(answer[-600:]).decode("utf-8", "replace")

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
