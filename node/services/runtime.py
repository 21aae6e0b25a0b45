"""Everything a running node holds: config, identity, guard, stores, discovery; started and stopped once."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING

from pinkybrain import __version__
from pinkybrain.node.core.config import Config
from pinkybrain.node.core.guard import GuardSettings, ResourceGuard
from pinkybrain.node.core.identity import Identity
from pinkybrain.node.services.models import ModelNotFound, ModelPathError, ModelRegistry, resolve_shared

if TYPE_CHECKING:
    from pinkybrain.node.services.discovery import MdnsService

log = logging.getLogger("pinkybrain.node")

# What start_services() imports: in a worker thread before it runs, so the event loop is not blocked.
SERVICE_MODULES = (
    "psutil",
    "pinkybrain.node.services.memory_store",
    "pinkybrain.node.services.conversations",
    "pinkybrain.node.services.ledger_store",
    "pinkybrain.node.services.trust_store",
    "pinkybrain.node.services.brain",
    "pinkybrain.node.split.service",
    "pinkybrain.node.services.mesh",
    "pinkybrain.node.services.memory_sync",
    "pinkybrain.node.services.remote",
    "pinkybrain.node.services.public_mesh",
)


def _import_services() -> None:
    import importlib

    for name in SERVICE_MODULES:
        importlib.import_module(name)


def guard_settings(cfg: Config) -> GuardSettings:
    return GuardSettings(
        cpu_threshold=cfg["resource_guard.cpu_threshold"],
        ram_threshold=cfg["resource_guard.ram_threshold"],
        cooldown_secs=cfg["resource_guard.cooldown_secs"],
        sustain_secs=cfg["resource_guard.sustain_secs"],
    )


def detect_start_mode() -> str:
    mode = os.environ.get("PINKYBRAIN_START_MODE")
    if mode in ("daemon", "foreground", "systemd", "launchd"):
        return mode
    if os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"):
        return "systemd"
    if os.environ.get("XPC_SERVICE_NAME", "0") not in ("0", ""):
        return "launchd"
    return "foreground"


class NodeRuntime:
    def __init__(
        self, cfg: Config, identity: Identity, *, bind_host: str, port: int, extra_peers: tuple[str, ...] = ()
    ):
        self.cfg = cfg
        self.identity = identity
        self.bind_host = bind_host
        self.port = port
        self.version = __version__
        self.started_at = time.time()
        self.start_mode = detect_start_mode()
        self.pid = os.getpid()
        self.home = cfg.home
        self.data_dir = cfg.home
        self.guard = ResourceGuard(guard_settings(cfg))
        self.mesh_public_requested = cfg["mesh.public"]
        self.models = ModelRegistry(
            cfg.path("sharing.shared_models_dir"), self.data_dir / "shares.json", identity
        )
        self.memory = None
        self.memory_sync = None  # keeps self.memory converging with the private mesh's peers
        self.conversations = None
        self.owner_key = None  # services.credentials.OwnerKey: the owner's credential, created at start
        self.api_keys = None  # services.credentials.ApiKeyStore: the /v1 keys the owner issued
        self.brain = None
        self.trust = None
        self.ledger = None
        self.mdns: MdnsService | None = None
        self.mesh = None  # the private mesh (services.mesh.Mesh), created at start
        self.remote = None  # remote inference over the mesh (services.remote), created with it
        self.split = None  # split inference (node/split): lending rpc-server, borrowing over the mesh
        self.public = None  # the public mesh (services.public_mesh.PublicMesh): tracker, WoT, credits
        self.extra_peers = tuple(extra_peers)  # `serve --peer URL`, on top of p2p.peers
        self._tasks: list[asyncio.Task] = []
        self._process = None  # psutil.Process(), once the services start
        self._started: asyncio.Future | None = None  # start_services()' outcome

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, *, discovery: bool = True) -> None:
        """Open the stores and start the services. `discovery=False` leaves the tracker join and mDNS to
        start_discovery(), which the server calls once its API answers: they are not needed to serve the
        first request, and mDNS (zeroconf) costs start-up time and memory."""
        await self.start_front()
        await self.start_services()
        if discovery:
            await self.start_discovery()

    async def start_front(self) -> None:
        """What the API's front (node/api/front.py) needs to authenticate a request and answer a ping: the
        owner key and the /v1 API keys. The server binds its port after this and before start_services(),
        so a ping answers while the stores open; every other request waits for wait_started()."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        from pinkybrain.node.services.credentials import ApiKeyStore, ensure_owner_key

        self.owner_key = await asyncio.to_thread(ensure_owner_key, self.home, self.identity.node_id)
        self.api_keys = await asyncio.to_thread(ApiKeyStore.open, self.home)

    async def start_services(self) -> None:
        """Open the stores, start the mesh and the rest; wait_started() returns (or raises what failed here)
        once this is done."""
        started = self._started_future()
        try:
            await self._start_services()
        except BaseException as exc:
            if not started.done():
                # A cancelled start (the node stopping) is a failure to the requests waiting on it.
                started.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the node is stopping"))
                started.exception()  # retrieved: a failure nobody waited for is not logged as unhandled
            raise
        if not started.done():
            started.set_result(None)

    def _started_future(self) -> asyncio.Future:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
        return self._started

    async def wait_started(self) -> None:
        """Return once start_services() has finished; raise what stopped it if it failed."""
        await asyncio.shield(self._started_future())

    @property
    def services_started(self) -> bool:
        return self._started is not None and self._started.done() and self._started.exception() is None

    async def _start_services(self) -> None:
        # The modules below are most of a node's imports (~1 s on the 2-core development VM): imported in a
        # worker thread, so the event loop keeps answering pings meanwhile.
        await asyncio.to_thread(_import_services)
        import psutil

        self._process = psutil.Process()
        from pinkybrain.node.services.memory_store import MemoryStore

        self.memory = await asyncio.to_thread(
            MemoryStore.open, self.data_dir / "memory", "private",
            self.cfg["memory.max_key_bytes"], self.cfg["memory.max_value_bytes"],
            max_depth=self.cfg["memory.max_depth"],
        )
        from pinkybrain.node.services.conversations import ConversationStore

        self.conversations = await asyncio.to_thread(
            ConversationStore.open,
            self.cfg.path("conversations.storage"),
            self.storage_key(b"conversations"),
            default_privacy=self.cfg["conversations.default_privacy"],
            retention_days=self.cfg["conversations.retention_days"],
        )
        from pinkybrain.node.services.ledger_store import LedgerStore
        from pinkybrain.node.services.trust_store import TrustStore

        self.trust = await asyncio.to_thread(
            TrustStore.open, self.data_dir, self.identity.node_id, max_depth=self.cfg["trust.max_depth"],
            marginals_needed=self.cfg["trust.marginals_needed"])
        self.ledger = await asyncio.to_thread(LedgerStore.open, self.data_dir, self.identity.node_id,
                                              self.cfg["credit.initial_balance"])
        from pinkybrain.node.services.brain import Brain

        self.brain = Brain(self)
        self.models.facts = self.brain.facts
        self.models.cloud_models = self.brain.cloud_models
        self.models.allow_cloud_sharing = self.cfg["sharing.cloud_models"]
        self._tasks.append(asyncio.create_task(self._verify_models(), name="verify-models"))
        psutil.cpu_percent(None)  # prime: the first reading is meaningless
        self._tasks.append(asyncio.create_task(self._sample_loop(), name="resource-guard"))
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        from pinkybrain.node.split.service import SplitService

        self.split = SplitService(self)  # before the mesh: its status says whether this node lends
        await self._start_mesh()
        self.split.attach(self.mesh)  # the private mesh only: the public one never reaches an rpc-server
        from pinkybrain.node.services.remote import RemoteInference

        self.remote = RemoteInference(self)  # needs the brain and the mesh
        from pinkybrain.node.services.public_mesh import PublicMesh

        self.public = PublicMesh(self)


    async def start_discovery(self) -> None:
        """Join the public mesh (in the background) and start mDNS, if configured."""
        if self.cfg["mesh.public"]:
            # In the background: a tracker that is down must not hold up the node's own API.
            self._tasks.append(asyncio.create_task(self.public.join_in_background(), name="public-join"))
        if not self.cfg["p2p.mdns"]:
            return
        from pinkybrain.node.services.discovery import MdnsService

        self.mdns = MdnsService(
            node_id=self.identity.node_id,
            name=self.cfg.node_name,
            version=self.version,
            bind_host=self.bind_host,
            port=self.port,
            advertise=not self.cfg["mesh.stealth"],
        )
        try:
            await self.mdns.start()
        except OSError as exc:  # no multicast route (containers): discovery degrades, the node still serves
            log.warning("mDNS unavailable: %s", exc)
            self.mdns = None

    async def stop(self) -> None:
        if self.public is not None:
            await self.public.leave()  # withdraw the tracker record and say goodbye to public peers first
        if self.memory_sync is not None:
            await self.memory_sync.stop()  # a moment for queued pushes to leave while the links are up
        if self.mesh is not None:
            await self.mesh.stop()  # first: peers get a goodbye while everything else still works
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.mdns is not None:
            await self.mdns.stop()
        if self.split is not None:
            await self.split.close()
        if self.brain is not None:
            await self.brain.close()
        for store in (self.trust, self.ledger):
            if store is not None:
                store.close()
        if self.memory is not None:
            self.memory.close()
        if self.conversations is not None:
            self.conversations.close()

    async def _start_mesh(self) -> None:
        from pinkybrain.node.services.mesh import Mesh, MeshSettings

        self.mesh = Mesh(
            self.identity,
            self.cfg["p2p.secret"],
            name=self.cfg.node_name,
            version=self.version,
            listen_host=self.bind_host,
            listen_port=self.port,
            stealth=self.cfg["mesh.stealth"],
            settings=MeshSettings.from_config(self.cfg),
            static_peers=[*self.cfg["p2p.peers"], *self.extra_peers],
            status_provider=self._mesh_status,
            discovery_provider=self._mdns_found,
            tailscale=self.cfg["p2p.mdns"],
        )
        from pinkybrain.node.services.memory_sync import MemorySync

        # Attached before the mesh starts so the sync steps run on the very first link.
        self.memory_sync = MemorySync(
            self.memory,
            self.mesh,
            namespace="private",
            interval=self.cfg["memory.sync_interval_secs"],
            penalty_limit=self.cfg["memory.penalty_limit"],
            ban_secs=self.cfg["memory.ban_secs"],
        )
        self.memory_sync.start()
        await self.mesh.start()

    def _mesh_status(self) -> dict:
        """What peers see of this node: load, guard, and the signed catalog entries of shared models."""
        guard = self.guard
        return {
            "load": {"cpu_percent": guard.cpu_percent, "ram_percent": guard.ram_percent},
            "guard": {"sharing_paused": guard.paused, "reason": guard.reason or None},
            "sharing": self.sharing_active,
            "models": self.models.shared_entries() if self.sharing_active else [],
            "split": self.split.lend_status() if self.split is not None else {"lend": False},
        }

    def _mdns_found(self) -> list[dict]:
        if self.mdns is None:
            return []
        return [
            {"url": url, "node_id": node.get("node_id"), "source": "mdns"}
            for node in list(self.mdns.found.values())
            for url in node.get("urls", [])[:4]
        ]

    def storage_key(self, purpose: bytes) -> bytes:
        """A per-purpose key for data at rest, derived from the identity so the files are bound to it."""
        return hashlib.blake2b(
            bytes(self.identity.signing_key), key=b"pinkybrain-at-rest", person=purpose[:16], digest_size=32
        ).digest()

    def reload_guard(self, cfg: Config) -> None:
        self.cfg = cfg
        self.guard.settings = guard_settings(cfg)
        log.info(
            "resource guard thresholds reloaded: cpu %.0f%% ram %.0f%% cooldown %.0fs",
            cfg["resource_guard.cpu_threshold"],
            cfg["resource_guard.ram_threshold"],
            cfg["resource_guard.cooldown_secs"],
        )

    async def _sample_loop(self) -> None:
        import psutil

        while True:
            cpu = psutil.cpu_percent(None)
            ram = psutil.virtual_memory().percent
            was = self.guard.paused
            paused = self.guard.observe(cpu, ram, time.monotonic())
            if paused != was:
                log.warning(
                    "sharing %s (%s)",
                    "paused" if paused else "resumed",
                    self.guard.reason or "back under thresholds",
                )
            await asyncio.sleep(self.cfg["resource_guard.sample_secs"])

    async def _verify_models(self) -> None:
        """At start: warm the GGUF facts cache and withdraw shares whose file no longer matches. Every file
        goes through the confinement check first: nothing outside shared_models/, nothing but regular files."""
        for path in self.models.local_files():
            try:
                resolved = await asyncio.to_thread(resolve_shared, self.models.models_dir, path.name)
                await asyncio.to_thread(self.brain.facts.get, resolved)
            except (ModelPathError, ModelNotFound) as exc:
                log.warning("skipping %s: %s", path.name[:120], exc)
            except (OSError, ValueError) as exc:
                log.warning("cannot read GGUF header of %s: %s", path.name[:120], exc)
        await asyncio.to_thread(self.models.verify_shares)  # each withdrawal logs its own line

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(3600)
            removed = await asyncio.to_thread(self.conversations.purge_expired)
            if removed:
                log.info("retention: purged %d conversations", removed)

    # -- views -------------------------------------------------------------------------------------
    @property
    def sharing_active(self) -> bool:
        return self.cfg["sharing.enabled"] and not self.guard.paused

    def uptime(self) -> float:
        return round(time.time() - self.started_at, 3)

    def mesh_state(self) -> dict:
        return {
            "private": self.mesh.state()
            if self.mesh is not None
            else {"peers": 0, "links_up": 0, "links_down": 0, "bytes_in": 0, "bytes_out": 0},
            "public": self.public.state()
            if self.public is not None
            else {"joined": False, "requested": self.mesh_public_requested, "tracker": self.cfg["p2p.tracker"]},
            "stealth": self.cfg["mesh.stealth"],
            "memory": {"private": self.memory_sync.state() if self.memory_sync is not None else None},
            "static_peers": list(self.mesh.static_peers) if self.mesh else list(self.cfg["p2p.peers"]),
        }

    def guard_state(self) -> dict:
        snap = self.guard.snapshot(time.monotonic())
        snap["sharing_enabled"] = self.cfg["sharing.enabled"]
        snap["sharing_active"] = self.sharing_active
        return snap
