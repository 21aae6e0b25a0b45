"""Cloud models (OpenAI- and Anthropic-compatible HTTP APIs) for this node's own user.

They are never listed to peers nor callable by them: the mesh only ever sees `shared_models/` GGUF
files. Sharing one needs an explicit force and carries a cost warning (see ModelRegistry). API keys
come from the environment (`api_key_env`), never from the config file.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

PROVIDERS = ("openai", "anthropic")
DEFAULT_BASE = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com/v1"}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
COST_WARNING = (
    "COST WARNING: sharing a cloud model lets every peer of the mesh spend YOUR API key; each of their "
    "queries is billed to your {provider} account."
)


class CloudError(RuntimeError):
    pass


@dataclass(frozen=True)
class CloudModel:
    name: str
    provider: str
    model: str
    base_url: str
    api_key_env: str

    @property
    def key_present(self) -> bool:
        return bool(os.environ.get(self.api_key_env))

    def describe(self) -> dict:
        return {"name": self.name, "kind": "cloud", "provider": self.provider, "model": self.model,
                "base_url": self.base_url, "api_key_env": self.api_key_env, "usable": self.key_present,
                "shared": False, **({} if self.key_present else {"problem": f"{self.api_key_env} is not set"})}


def parse_cloud_models(entries: list[dict]) -> dict[str, CloudModel]:
    out: dict[str, CloudModel] = {}
    for i, entry in enumerate(entries):
        where = f"cloud.models[{i}]"
        unknown = set(entry) - {"name", "provider", "model", "base_url", "api_key_env"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        provider = entry.get("provider")
        if provider not in PROVIDERS:
            raise ValueError(f"{where}.provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,80}", name):
            raise ValueError(f"{where}.name must be 1-80 letters, digits or ._:-, got {name!r}")
        if not isinstance(entry.get("model"), str):
            raise ValueError(f"{where}.model (the provider's model id) is required")
        if name in out:
            raise ValueError(f"{where}: duplicate cloud model name {name!r}")
        out[name] = CloudModel(name=name, provider=provider, model=entry["model"],
                               base_url=str(entry.get("base_url") or DEFAULT_BASE[provider]).rstrip("/"),
                               api_key_env=str(entry.get("api_key_env") or DEFAULT_KEY_ENV[provider]))
    return out


def _split_system(messages: list[dict]) -> tuple[str, list[dict]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return system, [m for m in messages if m["role"] != "system"]


class CloudClient:
    # httpx (with httpcore, and the CLI extras httpx pulls in) costs a node that never calls a cloud model
    # ~17 MiB and a few hundred ms of start-up: the client is made on first use.
    def __init__(self, timeout: float = 120.0):
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _request(self, cm: CloudModel, messages: list[dict], max_tokens: int, temperature: float,
                 top_p: float, stream: bool) -> tuple[str, dict, dict]:
        key = os.environ.get(cm.api_key_env)
        if not key:
            raise CloudError(f"cloud model {cm.name!r}: {cm.api_key_env} is not set")
        if cm.provider == "openai":
            body = {"model": cm.model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": temperature, "top_p": top_p, "stream": stream}
            return f"{cm.base_url}/chat/completions", {"authorization": f"Bearer {key}"}, body
        system, rest = _split_system(messages)
        body = {"model": cm.model, "messages": rest, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "stream": stream}
        if system:
            body["system"] = system
        return f"{cm.base_url}/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"}, body

    async def chat(self, cm: CloudModel, messages: list[dict], *, max_tokens: int, temperature: float = 0.7,
                   top_p: float = 0.95) -> tuple[str, dict, float]:
        url, headers, body = self._request(cm, messages, max_tokens, temperature, top_p, stream=False)
        start = time.perf_counter()
        import httpx

        try:
            resp = await self._http.post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise CloudError(f"cloud model {cm.name!r}: {cm.provider} unreachable: {exc}") from None
        elapsed = (time.perf_counter() - start) * 1000
        if resp.status_code != 200:
            raise CloudError(f"cloud model {cm.name!r}: {cm.provider} answered {resp.status_code}: "
                             f"{_error_text(resp)}")
        data = resp.json()
        try:
            if cm.provider == "openai":
                text = data["choices"][0]["message"]["content"] or ""
                usage = data.get("usage") or {}
                usage = {"prompt_tokens": usage.get("prompt_tokens", 0),
                         "completion_tokens": usage.get("completion_tokens", 0)}
            else:
                text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
                usage = data.get("usage") or {}
                usage = {"prompt_tokens": usage.get("input_tokens", 0),
                         "completion_tokens": usage.get("output_tokens", 0)}
        except (KeyError, IndexError, TypeError):
            raise CloudError(f"cloud model {cm.name!r}: unexpected response shape from {cm.provider}") from None
        return text.strip(), usage, round(elapsed, 1)

    async def stream(self, cm: CloudModel, messages: list[dict], *, max_tokens: int, temperature: float = 0.7,
                     top_p: float = 0.95) -> AsyncIterator[str]:
        import json

        url, headers, body = self._request(cm, messages, max_tokens, temperature, top_p, stream=True)
        async with self._http.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise CloudError(f"cloud model {cm.name!r}: {cm.provider} answered {resp.status_code}: "
                                 f"{_error_text(resp)}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    continue
                if cm.provider == "openai":
                    piece = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
                elif event.get("type") == "content_block_delta":
                    piece = event.get("delta", {}).get("text")
                else:
                    piece = None
                if piece:
                    yield piece


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        return str(err or data)[:300]
    except ValueError:
        return resp.text[:300]
