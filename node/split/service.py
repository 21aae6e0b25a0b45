"""The node's split service: lends (rpc-server behind `split.rpc` tunnels) and borrows (plans a split
over the private mesh's lenders and runs it), under the resource guard and `sharing.split`.

The private mesh's tunnel (`attach`) serves every member, free: its peers all hold the network secret.
The public mesh's (`attach_public`, split/public.py) serves only peers the Web of Trust finds valid,
only with `sharing.split_public` on, and only once they have paid; it has its own rpc-servers and weight
cache. Borrowing plans over the private mesh's lenders only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import Path

import psutil

from pinkybrain.node.services.mesh import RpcError
from pinkybrain.node.split.borrower import TUNNEL_KIND, SplitError, SplitSession
from pinkybrain.node.split.framing import RpcFraming
from pinkybrain.node.split.lender import RpcServers
from pinkybrain.node.split.plan import RESERVE_BYTES, Offer, PlanError, plan_split
from pinkybrain.node.split.public import PUBLIC_CACHE, PUBLIC_MAX_SERVERS, PublicLending
from pinkybrain.node.split.rpc_cache import tensor_infos
from pinkybrain.node.split.tools import devices, find_tools

log = logging.getLogger("pinkybrain.split")

_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_SPLIT_CTX = 4096


def block_sizes(path: Path) -> tuple[list[int], int]:
    """Bytes of each transformer block (blk.N.*) and of everything else (embeddings, output, norms)."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        infos = tensor_infos(buf)  # not gguf's GGUFReader: it parses the whole vocabulary, tens of seconds
    blocks: dict[int, int] = {}
    other = 0
    for name, _offset, size in infos:
        match = re.match(r"blk\.(\d+)\.", name)
        if match:
            blocks[int(match.group(1))] = blocks.get(int(match.group(1)), 0) + size
        else:
            other += size
    return [blocks[i] for i in sorted(blocks)], other


def _layers(value) -> range | None:
    """The blocks a borrower says this lender holds, [first, count]; None (all) when it does not say."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                          and 0 <= v < 100_000 for v in value):
        return range(value[0], value[0] + value[1])
    return None


class SplitService:
    def __init__(self, runtime):
        self.runtime = runtime
        cfg = runtime.cfg
        self.tools = find_tools()
        self.lending = RpcServers(self.tools, runtime.data_dir / "rpc-cache", idle_secs=cfg["sharing.split_idle_secs"],
                                  threads=cfg["inference.n_threads"])
        # Public borrowers never share a process, a slot or a weight cache with private ones (split/public.py).
        self.public_lending = RpcServers(
            self.tools, runtime.data_dir / PUBLIC_CACHE, idle_secs=cfg["sharing.split_idle_secs"],
            threads=cfg["inference.n_threads"], max_servers=PUBLIC_MAX_SERVERS,
            log_level=logging.INFO if cfg["logging.public_mesh"] else logging.DEBUG)
        self.public: PublicLending | None = None
        self.sessions: dict[str, SplitSession] = {}
        self.keep_alive_secs = cfg["inference.keep_alive_secs"]
        self._lock = asyncio.Lock()
        self._sha: dict[tuple, str] = {}
        self._reaper: asyncio.Task | None = None

    def attach(self, mesh) -> None:
        """The private mesh: every member may borrow, free."""
        mesh.register_tunnel(TUNNEL_KIND, self._open_rpc, framing=lambda: RpcFraming(commands=False))

    def attach_public(self, mesh, valid) -> None:
        """The public mesh: `valid(node_id)` is its Web of Trust check; lends are paid (split/public.py)."""
        self.public = PublicLending(self, valid)
        mesh.register_tunnel(TUNNEL_KIND, self.public.open, framing=lambda: RpcFraming(commands=False))

    def public_lend_status(self) -> dict:
        """What public peers see in our link status: lending only when sharing.split_public allows it."""
        return self.public.status() if self.public is not None else {"lend": False, "free_bytes": None}

    # -- lending -----------------------------------------------------------------------------------
    def lend_refusal(self) -> str | None:
        cfg, guard = self.runtime.cfg, self.runtime.guard
        if not cfg["sharing.split"]:
            return "this node does not lend for splits (sharing.split is false)"
        if not cfg["sharing.enabled"]:
            return "this node does not share (sharing.enabled is false)"
        if guard.paused:
            return f"sharing is paused by this node's resource guard ({guard.reason or 'busy'})"
        if not self.tools.usable:
            return self.tools.problem
        return None

    def free_bytes(self) -> int:
        """Free memory for a share (lent or held here): the free RAM, within inference.memory_limit_mb."""
        free = psutil.virtual_memory().available
        limit = self.runtime.cfg["inference.memory_limit_mb"] * 2**20
        # A plan keeps RESERVE_BYTES free beyond each node's share; the limit is the share itself.
        return min(free, limit + RESERVE_BYTES) if limit else free

    def lend_status(self) -> dict:
        """What peers see in our link status: whether we lend now, and how much memory is free."""
        return {"lend": self.lend_refusal() is None, "free_bytes": self.free_bytes()}

    def check_request(self, payload) -> str:
        """The model's sha256 from a split.rpc open, once the share it asks for fits; RpcError if not."""
        if not isinstance(payload, dict) or not isinstance(payload.get("sha256"), str) \
                or not _SHA256.fullmatch(payload["sha256"]):
            raise RpcError("invalid_request", "a split.rpc tunnel names the model's sha256 (64 hex digits)")
        want = payload.get("bytes")
        if isinstance(want, int) and not isinstance(want, bool) and want > 0:
            free = self.free_bytes()
            if want + RESERVE_BYTES > free:
                raise RpcError("busy", f"this node has {free / 2**20:.0f} MiB free, the share needs "
                                       f"{want / 2**20:.0f} MiB")
        return payload["sha256"]

    async def _open_rpc(self, ctx, payload):
        refusal = self.lend_refusal()
        if refusal is not None:
            raise RpcError("busy", refusal)
        sha256 = self.check_request(payload)
        own = self._own_copy(sha256)
        if own is not None:
            await self.lending.prefill(ctx.peer_id, sha256, own, _layers(payload.get("layers")))
        try:
            return await self.lending.connect(ctx.peer_id, sha256)
        except OSError as exc:
            raise RpcError("busy", f"rpc-server unavailable: {exc}") from None

    def _own_copy(self, sha256: str) -> Path | None:
        """This node's file of the model with that SHA-256: a shared one (its hash checked), in shared_models/."""
        from pinkybrain.node.services.models import ModelNotFound

        for entry in self.runtime.models.shared_entries():
            if entry.get("sha256") == sha256 and entry.get("kind") != "cloud":
                try:
                    return self.runtime.models.served_path(entry["name"])
                except (ModelNotFound, KeyError):
                    continue
        return None

    # -- borrowing ---------------------------------------------------------------------------------
    def offers(self) -> list[Offer]:
        mesh = self.runtime.mesh
        if mesh is None:
            return []
        out = []
        for peer in mesh.peers():
            split = peer.get("split") or {}
            if peer.get("state") == "connected" and split.get("lend") and isinstance(split.get("free_bytes"), int):
                out.append(Offer(peer["node_id"], peer.get("name"), split["free_bytes"], peer.get("latency_ms")))
        return out

    def can_borrow(self) -> str | None:
        """Why this node cannot run a split now (None: it can)."""
        if not self.tools.usable:
            return self.tools.problem
        if not self.offers():
            return "no peer of the private mesh lends for splits now"
        return None

    async def _sha256(self, path: Path) -> str:
        """The model's SHA-256: its signed share entry's when shared, else hashed once per file stamp."""
        for entry in self.runtime.models.shared_entries():
            if entry.get("file") == path.name or f"{entry.get('name')}.gguf" == path.name:
                if isinstance(entry.get("sha256"), str):
                    return entry["sha256"]
        from pinkybrain.node.services.models import file_stamp, sha256_file

        key = (str(path), *file_stamp(path.stat()))
        if key not in self._sha:
            self._sha[key] = await asyncio.to_thread(sha256_file, path)
        return self._sha[key]

    async def plan(self, path: Path, *, force_all: bool):
        sizes, other = await asyncio.to_thread(block_sizes, path)
        per_layer = max(sizes) if sizes else 1
        local = Offer(self.runtime.identity.node_id, self.runtime.cfg.node_name, self.free_bytes(), local=True)
        plan = plan_split(len(sizes), per_layer, local, self.offers(), local_fixed_bytes=other,
                          force_all=force_all)
        # Exact bytes per part, from the blocks each holds.
        from dataclasses import replace

        parts = tuple(replace(p, bytes=sum(sizes[p.first_layer:p.first_layer + p.layers])
                              + (other if p.local else 0)) for p in plan.parts)
        return replace(plan, parts=parts)

    async def session(self, name: str, path: Path, facts: dict, *, force_all: bool) -> SplitSession:
        async with self._lock:
            current = self.sessions.get(name)
            if current is not None and current.alive:
                return current
            if current is not None:
                await current.close()
                self.sessions.pop(name, None)
            if not self.tools.usable:
                raise SplitError(self.tools.problem)
            try:
                plan = await self.plan(path, force_all=force_all)
            except PlanError as exc:
                raise SplitError(str(exc)) from None
            n_ctx = self.runtime.cfg["inference.n_ctx"] or min(facts.get("context_length") or DEFAULT_SPLIT_CTX,
                                                                  DEFAULT_SPLIT_CTX)
            session = SplitSession(name, path, await self._sha256(path), plan, tools=self.tools,
                                   mesh=self.runtime.mesh, n_ctx=n_ctx, threads=self.runtime.cfg["inference.n_threads"],
                                   log_path=self.runtime.data_dir / "llama-server.log")
            log.info("loading %s split over %d node(s): %s", name, len(plan.parts),
                     ", ".join(f"{p.name or p.node_id[:7]} {p.layers} blocks" for p in plan.parts))
            await session.start()
            self.sessions[name] = session
            if self._reaper is None or self._reaper.done():
                self._reaper = asyncio.create_task(self._reap_forever(), name="split-reaper")
            return session

    async def stream(self, name: str, path: Path, facts: dict, messages: list[dict], *, force_all: bool,
                     max_tokens: int, temperature: float, top_p: float, seed: int | None = None,
                     meta: dict | None = None):
        meta = {} if meta is None else meta
        session = await self.session(name, path, facts, force_all=force_all)
        meta["split"] = [p.to_dict() for p in session.plan.parts]
        try:
            async for piece in session.stream(messages, max_tokens=max_tokens, temperature=temperature,
                                              top_p=top_p, chat=bool(facts.get("has_chat_template")), seed=seed,
                                              meta=meta):
                yield piece
        finally:
            if not session.alive:  # a lender went away: the next query plans afresh
                async with self._lock:
                    if self.sessions.get(name) is session:
                        self.sessions.pop(name)
                await session.close()

    def loaded(self) -> list[dict]:
        out = []
        for session in self.sessions.values():
            item = session.describe()
            if self.keep_alive_secs:
                item["unloads_in_secs"] = max(0.0, round(self.keep_alive_secs - item["idle_secs"], 1))
            out.append(item)
        return out

    async def _reap_forever(self) -> None:
        while self.sessions:
            await asyncio.sleep(5)
            now = time.monotonic()
            async with self._lock:
                for name, session in list(self.sessions.items()):
                    idle = now - session.last_used
                    if not session.alive or (self.keep_alive_secs and idle > self.keep_alive_secs
                                             and not session.lock.locked()):
                        self.sessions.pop(name)
                        await session.close()

    # -- report ------------------------------------------------------------------------------------
    def capabilities(self) -> dict:
        """For /api/capabilities: whether this node can lend and borrow, with what."""
        refusal = self.lend_refusal()
        return {
            "rpc_server": str(self.tools.rpc_server) if self.tools.rpc_server else None,
            "llama_server": str(self.tools.llama_server) if self.tools.llama_server else None,
            "tools_version": self.tools.version,
            "backends": devices(self.tools) if self.tools.usable else [],
            "free_bytes": self.free_bytes(),
            "lend_enabled": bool(self.runtime.cfg["sharing.split"]),
            "can_lend": refusal is None,
            "lend_refusal": refusal,
            "can_borrow": self.tools.usable,
            "lenders_now": len(self.offers()),
            "lending": self.lending.state(),
            "cache_prefilled_bytes": self.lending.prefilled_bytes,
            "lend_public_enabled": bool(self.runtime.cfg["sharing.split_public"]),
            "can_lend_public": self.public is not None and self.public.refusal() is None,
            "public_price": float(self.runtime.cfg["credit.earn_per_split"]),
            "public_lending": self.public_lending.state(),
        }

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await session.close()
        self.sessions.clear()
        await self.lending.close()
        await self.public_lending.close()
