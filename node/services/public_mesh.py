"""The public mesh: strangers' nodes meet through a tracker and link with the private mesh's transport.

    public = PublicMesh(runtime)
    await public.join()          # connect to p2p.tracker, announce, listen on /p2p/public, dial peers
    await public.leave()         # withdraw the record, close every public link

Links. A second `Mesh` with its own route (`/p2p/public`) and a fixed, publicly known handshake PSK
(PUBLIC_MESH_SECRET): the Noise handshake still binds each end to its Ed25519 identity and signs it, so
public peers are authenticated by node id alone. The PSK only keeps the two networks apart: a node with
the private secret fails a public handshake at message 1, and a public dialler fails on /p2p. The public
Mesh registers only public handlers: `mesh.echo`, `mesh.info` (load, guard, signed entries of shared
models), `infer.chat` / `infer.stream`, `trust.exchange`, the `split.rpc` tunnel only when the owner set
`sharing.split` and `sharing.split_public` (node/split/public.py: valid peers only, paid in credits, own
rpc-servers), and the public memory namespace (its own
store file, memory-public.sqlite3; services/public_memory.py signs what this node writes there and
shows only what valid writers signed). The private memory, conversations and private mesh are never
attached to it.

Gating (services/public_gate.py). A peer this node's Web of Trust does not find valid gets the handshake
and `trust.exchange`, within a byte and request budget, and nothing else: every other RPC (queries, public
memory sync and pushes, mesh.info) is refused `not_trusted`, memory sync neither pulls from nor pushes to
it, peer exchange never names it and ignores what it names. Refusals are logged as operational events.

Finding peers. Every `mesh.public_peer_refresh_secs` the tracker's list (signed records, checked here) is
read and listed peers are dialled: by their announced address, or through a tracker relay circuit when
they announce none or a direct dial fails. A non-stealth node links to every listed peer, valid for its
Web of Trust or not: attestations only travel over links, so a link is how a stranger's validity can
become known, and nothing private rides on one. A stealth node links only to peers its trust store finds
valid, only through relay circuits (a direct dial would show its address), and drops any link from a
peer it does not find valid.

Stealth. The record carries no address and the tracker never lists it; the public Mesh's hello omits
host and port, and peer exchange never passes a stealth peer on (nor does a stealth node do peer
exchange). Queries reach a stealth node over the relay circuits it opened or accepted.

Web of Trust. On every link-up, and every `mesh.trust_refresh_secs`, this node pulls the peer's
`trust.exchange` (its TrustStore.export_for_peer()) and merges it with only_from_valid=True; forged
statements fail their signature check, expired and revoked ones are stored but count for nothing.
What this node exports leaves out statements naming its private-mesh peers. Attestations name node ids
(never addresses), so a vouched-for stealth node's id can travel in them: that is how others come to
trust it.

Queries and credits (PublicInference, the private RemoteInference bound to this mesh): nothing is routed
to a peer this node's trust store does not find valid, and a request from an asker it does not find
valid is refused `not_trusted` before anything else. The asker commits to pay `credit.earn_per_query`
(LedgerStore.commit_payment; InsufficientCredit, with its hint, stops the query) and the signed
commitment travels inside the sealed request; the server accepts it (signature, addressed to it, not
replayed, at least its own price), runs the query, signs delivery with the SHA-256 of the answer and
sends the receipt back sealed with it; the asker checks the receipt against its commitment and the
answer it got, and records it. Both ledgers are durable. A commitment whose query failed stays reserved
until it expires (`p2p.remote_timeout_secs` + 60 s).

Zero logging. Log lines here and in remote.py name peers, models, sizes and outcomes, never prompt or
answer text; the brain does not record an exchange in the conversation store when any of its answers
came over the public mesh, on either side. With `logging.public_mesh: false` (the default) this
module's operational lines are at debug level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from urllib.parse import urlsplit

import psutil

from pinkybrain.node.core.credits import CreditError, PaymentCommitment, Receipt, response_digest
from pinkybrain.node.core.handshake import HandshakeError
from pinkybrain.node.core.sealed import SealError
from pinkybrain.node.services.mesh import (
    WILDCARD_HOSTS,
    LinkRefused,
    Mesh,
    MeshError,
    MeshSettings,
    RpcError,
    normalize_peer_url,
)
from pinkybrain.node.services.peer_link import CLOSE_TRY_LATER
from pinkybrain.node.services.public_gate import TRUST_EXCHANGE, PublicGate, ValidityCache
from pinkybrain.node.services.public_memory import SignedPublicMemory
from pinkybrain.node.services.remote import RemoteInference
from pinkybrain.node.services.tracker_client import TrackerClient, TrackerError

log = logging.getLogger("pinkybrain.public")

# Known to everyone on purpose: it only keeps public links apart from private ones; identities authenticate.
PUBLIC_MESH_SECRET = "pinkybrain-public-mesh-v1"  # noqa: S105
PUBLIC_PATH = "/p2p/public"
MAX_TRUST_ITEMS = 2000  # statements per exchange: about 1 MiB, a frame's worth
TRUST_TIMEOUT = 15.0
DIAL_BACKOFF_MAX = 300.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


def advertised_url(cfg, bind_host: str, port: int) -> str | None:
    """Where public peers reach this node: p2p.public_url, else the bind address unless it is a wildcard
    (then no address: peers come through the tracker's relay). None for a stealth node."""
    if cfg["mesh.stealth"]:
        return None
    url = cfg["p2p.public_url"]
    if url:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.port is None and "://" in url:  # a URL with a scheme means its default port, not ours
            default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(parts.scheme.lower())
            if default and parts.hostname:
                host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
                url = f"{parts.scheme}://{host}:{default}"
        return normalize_peer_url(url, PUBLIC_PATH)
    if bind_host in WILDCARD_HOSTS:
        return None
    return normalize_peer_url(f"{bind_host}:{port}", PUBLIC_PATH)


class PublicInference(RemoteInference):
    """Remote inference on the public mesh: Web of Trust gates, credits pay (see the module docstring)."""

    def __init__(self, runtime, mesh, validity: ValidityCache | None = None):
        super().__init__(runtime, mesh)
        self.validity = validity if validity is not None else ValidityCache(runtime.trust)
        # The commitment must outlive the longest query, failovers included, or its receipt would be late.
        self.commitment_ttl = int(self.timeout) + 60
        self.log_serving = bool(runtime.cfg["logging.public_mesh"])

    def _valid(self, node_id: str) -> bool:
        return node_id in self.validity

    def _price(self) -> float:
        return float(self.runtime.cfg["credit.earn_per_query"])

    # -- asking ------------------------------------------------------------------------------------
    def _may_ask(self, peer_id: str) -> bool:
        return self._valid(peer_id)

    def _prepare_request(self, peer_id: str, body: dict) -> PaymentCommitment:
        # InsufficientCredit (with the hint) propagates: no other peer would make this node richer.
        commitment = self.runtime.ledger.commit_payment(self.runtime.identity, peer_id, self._price(),
                                                        ttl=self.commitment_ttl)
        body["commitment"] = commitment.to_dict()
        return commitment

    def _settle(self, peer_id: str, token: object, final: dict, text: str) -> None:
        try:
            receipt = Receipt.from_dict(final.get("receipt"))
            if not isinstance(token, PaymentCommitment) or receipt.query_id != token.query_id:
                raise CreditError("the receipt is for another payment")
            self.runtime.ledger.record_receipt(receipt, expected_digest=response_digest(text))
        except CreditError as exc:
            raise SealError("bad_receipt", f"the answer came without a valid receipt: {exc}") from None

    # -- serving -----------------------------------------------------------------------------------
    def _check_asker(self, sender: str) -> None:
        if not self._valid(sender):
            raise RpcError("not_trusted", "refused: not trusted (this node's Web of Trust does not find the "
                                          "asker valid; ask someone it trusts to vouch for you)")

    def _accept_payment(self, sender: str, body: dict) -> PaymentCommitment:
        try:
            commitment = PaymentCommitment.from_dict(body.get("commitment"))
            if commitment.asker != sender:
                raise CreditError("the commitment is not the asker's")
            self.runtime.ledger.accept_commitment(commitment, min_amount=self._price())
        except CreditError as exc:
            raise RpcError("payment_refused", str(exc)) from None
        return commitment

    def _delivered(self, job, text: str, elapsed_ms: float) -> dict:
        receipt = self.runtime.ledger.deliver(self.runtime.identity, job.payment, success=True,
                                              latency_ms=max(0, int(elapsed_ms)),
                                              response_sha256=response_digest(text))
        return {"receipt": receipt.to_dict()}


class PublicMesh:
    def __init__(self, runtime):
        self.runtime = runtime
        cfg = runtime.cfg
        self.stealth = bool(cfg["mesh.stealth"])
        self.tracker_url = cfg["p2p.tracker"]
        self.address = advertised_url(cfg, runtime.bind_host, runtime.port)
        self.refresh_secs = float(cfg["mesh.public_peer_refresh_secs"])
        self.trust_secs = float(cfg["mesh.trust_refresh_secs"])
        self.ttl = int(cfg["mesh.announce_ttl_secs"])
        self.level = logging.INFO if cfg["logging.public_mesh"] else logging.DEBUG
        self.validity = ValidityCache(runtime.trust)
        self.gate: PublicGate | None = None
        self.mesh: Mesh | None = None
        self.client: TrackerClient | None = None
        self.inference: PublicInference | None = None
        self.memory = None
        self.memory_sync = None
        self.joined = False
        self.last_error: str | None = None
        self.listed = 0  # peers in the tracker's last list
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._spawned: set[asyncio.Task] = set()
        self._dialing: set[str] = set()
        self._backoff: dict[str, tuple[int, float]] = {}  # node id -> (failures, monotonic time of next try)
        self._unhook: list = []

    # -- joining and leaving -----------------------------------------------------------------------
    async def join(self, *, wait: bool = True) -> dict:
        """Start the public mesh and join the tracker. With `wait`, the tracker must answer now (raises
        TrackerError); without, the client keeps trying in the background (for `mesh.public: true`)."""
        async with self._lock:
            if self.joined:
                return self.state()
            await self._open_mesh()
            try:
                client = TrackerClient(self.tracker_url, self.runtime.identity, on_circuit=self._on_circuit,
                                       backoff_base=min(1.0, self.refresh_secs), backoff_max=60.0)
                self.client = client
                if wait:
                    await client.connect()
                else:
                    client.start()
                try:
                    await client.announce(self._record, ttl=self.ttl)
                except TrackerError:
                    if wait:
                        raise
                    # Not connected yet: the client announces the record as soon as it is.
            except BaseException as exc:
                self.last_error = str(exc)
                await self._close()
                raise
            self.joined, self.last_error = True, None
            self._tasks = [asyncio.create_task(self._peer_loop(), name="public-peers"),
                           asyncio.create_task(self._trust_loop(), name="public-trust")]
            log.log(self.level, "joined the public mesh via %s%s", self.tracker_url,
                    " (stealth)" if self.stealth else f" as {self.address or 'relay only'}")
            return self.state()

    async def join_in_background(self) -> None:
        try:
            await self.join(wait=False)
        except Exception as exc:  # noqa: BLE001 - a node that cannot join still serves its own user
            log.warning("cannot join the public mesh: %s", exc)

    async def leave(self) -> bool:
        """Withdraw the tracker record and close every public link; False if not joined."""
        async with self._lock:
            if not self.joined:
                return False
            self.joined = False
            await self._close()
            log.log(self.level, "left the public mesh")
            return True

    async def _open_mesh(self) -> None:
        runtime, cfg = self.runtime, self.runtime.cfg
        settings = MeshSettings.from_config(cfg)
        # A stealth node dials nobody it is told about: a direct dial would show where it is.
        settings.peer_exchange = settings.peer_exchange and not self.stealth
        host, port = runtime.bind_host, runtime.port
        if self.address:
            parts = urlsplit(self.address)
            host, port = parts.hostname or host, parts.port or port
        self.gate = gate = PublicGate(self.validity)
        mesh = Mesh(runtime.identity, PUBLIC_MESH_SECRET, name=cfg.node_name, version=runtime.version,
                    listen_host=host, listen_port=port, stealth=self.stealth, settings=settings,
                    status_provider=self._status, url_path=PUBLIC_PATH, gate=gate)
        mesh.register_handler(TRUST_EXCHANGE, self._serve_trust)
        self.inference = PublicInference(runtime, mesh, self.validity)
        split = getattr(runtime, "split", None)
        if split is not None and cfg["sharing.split"] and cfg["sharing.split_public"]:
            # The owner lends to valid public peers, paid in credits (node/split/public.py).
            split.attach_public(mesh, self._valid)
        self._unhook = [mesh.on_link_up(self._link_up), mesh.on_link_down(gate.forget)]
        from pinkybrain.node.services.memory_store import MemoryStore
        from pinkybrain.node.services.memory_sync import MemorySync

        # Its own store file: the private memory is never attached to this mesh.
        store = await asyncio.to_thread(MemoryStore.open, runtime.data_dir / "memory", "public",
                                        cfg["memory.max_key_bytes"], cfg["memory.max_value_bytes"],
                                        max_depth=cfg["memory.max_depth"])
        # What this node's user reads and writes: signed entries, shown only from valid writers.
        self.memory = SignedPublicMemory(store, runtime.identity, self._valid)
        self.memory_sync = MemorySync(store, mesh, namespace="public",
                                      interval=cfg["memory.sync_interval_secs"],
                                      penalty_limit=cfg["memory.penalty_limit"], ban_secs=cfg["memory.ban_secs"],
                                      peer_filter=gate.trusted)
        self.memory_sync.start()
        self.mesh = mesh
        await mesh.start()

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.client is not None:
            await self.client.close(leave=True)  # the record goes first: nobody is sent here meanwhile
            self.client = None
        if self.memory_sync is not None:
            await self.memory_sync.stop()
            self.memory_sync = None
        if self.mesh is not None:
            for unhook in self._unhook:
                unhook()
            await self.mesh.stop()
        for task in list(self._spawned):
            task.cancel()
        await asyncio.gather(*self._spawned, return_exceptions=True)
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.mesh = self.inference = None
        self._dialing.clear()
        self._backoff.clear()

    # -- what the tracker and public peers see -------------------------------------------------------
    def _record(self) -> dict:
        runtime, guard = self.runtime, self.runtime.guard
        models = []
        if runtime.sharing_active:  # shared entries only: never an unshared file, a cloud model only if forced
            for entry in runtime.models.shared_entries()[:128]:
                sha = entry.get("sha256")
                models.append({"name": str(entry.get("name"))[:128],
                               "sha256": sha if isinstance(sha, str) and _HEX64.fullmatch(sha) else None})
        return {
            "addresses": [] if self.stealth or not self.address else [self.address],
            "models": models,
            "capacity": {"cpu_cores": os.cpu_count() or 0, "ram_mb": psutil.virtual_memory().total // 2**20,
                         "cpu_percent": _percent(guard.cpu_percent), "ram_percent": _percent(guard.ram_percent),
                         "paused": not runtime.sharing_active},
            "stealth": self.stealth,
            "name": runtime.cfg.node_name[:64],
        }

    def _status(self) -> dict:
        """What linked public peers see (mesh.info and status messages): no more than the tracker does."""
        runtime, guard = self.runtime, self.runtime.guard
        return {
            "load": {"cpu_percent": guard.cpu_percent, "ram_percent": guard.ram_percent},
            "guard": {"sharing_paused": guard.paused, "reason": guard.reason or None},
            "sharing": runtime.sharing_active,
            "models": runtime.models.shared_entries() if runtime.sharing_active else [],
            "split": split.public_lend_status() if (split := getattr(runtime, "split", None)) is not None
            else {"lend": False, "free_bytes": None},
        }

    # -- inbound relay circuits ----------------------------------------------------------------------
    def _on_circuit(self, transport):
        mesh = self.mesh
        if mesh is None or not mesh.accepting():
            return transport.close(CLOSE_TRY_LATER, "not on the public mesh")
        return mesh.accept(transport)

    # -- finding and dialling peers --------------------------------------------------------------------
    async def _peer_loop(self) -> None:
        while True:
            client, mesh = self.client, self.mesh
            if client is not None and mesh is not None and client.connected:
                try:
                    records = await client.list_peers()
                except TrackerError as exc:
                    log.log(self.level, "cannot list public peers: %s", exc.message)
                    records = []
                else:
                    self.listed = len(records)
                now = time.monotonic()
                live = len(mesh.peer_ids())
                for record in records:
                    peer = record.node_id
                    if (peer in self._dialing or mesh.connected(peer) or mesh.banned(peer)
                            or now < self._backoff.get(peer, (0, 0.0))[1] or live >= mesh.settings.max_peers):
                        continue
                    if self.stealth and not self._valid(peer):
                        continue
                    self._dialing.add(peer)
                    live += 1
                    self._spawn(self._dial(peer, list(record.addresses)))
            await asyncio.sleep(self.refresh_secs)

    async def _dial(self, peer: str, addresses: list[str]) -> None:
        mesh, client = self.mesh, self.client
        try:
            if not self.stealth:
                for address in addresses[:2]:
                    if await self._attempt(peer, lambda a=address: mesh.connect(a), address):
                        return
            if client is not None and client.connected:
                try:
                    transport = client.open_relay(peer)
                except (TrackerError, ValueError) as exc:
                    self._failed(peer, f"relay: {exc}")
                    return
                await self._attempt(peer, lambda: mesh.connect_transport(transport), "relay")
        finally:
            self._dialing.discard(peer)

    async def _attempt(self, peer: str, dial, how: str) -> bool:
        try:
            link = await dial()
        except LinkRefused as exc:
            if exc.duplicate:  # linked already the other way
                self._backoff.pop(peer, None)
                return True
            self._failed(peer, f"{how}: {exc}")
        except (MeshError, HandshakeError, ValueError, OSError) as exc:
            self._failed(peer, f"{how}: {exc}")
        else:
            self._backoff.pop(peer, None)
            if link.peer_id != peer:  # whoever answers at an address proves its own id; ours is the record's
                log.log(self.level, "public address %s led to node %s, not %s", how, link.short, peer[:7])
            return True
        return False

    def _failed(self, peer: str, reason: str) -> None:
        failures = self._backoff.get(peer, (0, 0.0))[0] + 1
        delay = min(DIAL_BACKOFF_MAX, self.refresh_secs * 2 ** min(failures - 1, 10))
        self._backoff[peer] = (failures, time.monotonic() + delay)
        log.log(self.level, "cannot link to public peer %s (attempt %d, next in %.0fs): %s", peer[:7], failures,
                delay, reason)

    # -- Web of Trust exchange ---------------------------------------------------------------------------
    def _valid(self, node_id: str) -> bool:
        return node_id in self.validity

    def _link_up(self, peer: str) -> None:
        if self.stealth and not self._valid(peer):
            # A stealth node keeps company only with peers it trusts.
            self.mesh.disconnect(peer, "this stealth node links only to peers it trusts")
            return
        self._spawn(self._pull_trust(peer))

    async def _trust_loop(self) -> None:
        while True:
            await asyncio.sleep(self.trust_secs)
            mesh = self.mesh
            for peer in mesh.peer_ids() if mesh is not None else []:
                await self._pull_trust(peer)

    async def _pull_trust(self, peer: str) -> None:
        mesh = self.mesh
        if mesh is None:
            return
        try:
            export = await mesh.request(peer, TRUST_EXCHANGE, None, timeout=TRUST_TIMEOUT)
        except MeshError as exc:
            log.log(self.level, "trust exchange with %s failed: %s", peer[:7], exc)
            return
        if not isinstance(export, dict):
            return
        items = []
        for key in ("attestations", "revocations"):
            got = export.get(key)
            if isinstance(got, list):
                items += got[:MAX_TRUST_ITEMS]
        items = items[:MAX_TRUST_ITEMS]
        result = await asyncio.to_thread(self.runtime.trust.merge, items, only_from_valid=True)
        if result.accepted or result.rejected:
            log.log(self.level, "trust exchange with %s: %d new, %d duplicate, %d refused", peer[:7],
                    result.accepted, result.duplicates, len(result.rejected))

    async def _serve_trust(self, ctx, payload) -> dict:
        export = await asyncio.to_thread(self.runtime.trust.export_for_peer)
        private = self._private_peer_ids()

        def public(items: list[dict]) -> list[dict]:
            return [s for s in items if s.get("issuer") not in private and s.get("subject") not in private]

        attestations = public(export.get("attestations", []))[:MAX_TRUST_ITEMS]
        revocations = public(export.get("revocations", []))[: MAX_TRUST_ITEMS - len(attestations)]
        return {"attestations": attestations, "revocations": revocations}

    def _private_peer_ids(self) -> set[str]:
        """Private-mesh peers (linked or being dialled) that are not also public peers: never named here."""
        private = getattr(self.runtime, "mesh", None)
        if private is None:
            return set()
        ids = set(private.peer_ids())
        ids |= {t["node_id"] for t in private.state().get("dialling", []) if t.get("node_id")}
        return ids - set(self.mesh.peer_ids() if self.mesh is not None else ())

    # -- views -------------------------------------------------------------------------------------------
    def peers(self) -> dict:
        """For this node's own user: public peers with whether the Web of Trust finds them valid. Stealth
        peers are only counted, never listed (no id, no address), whoever asks."""
        if self.mesh is None:
            return {"peers": [], "stealth_peers": 0}
        shown, hidden = [], 0
        for peer in self.mesh.peers():
            if peer.get("stealth"):
                hidden += 1
                continue
            shown.append({**peer, "trusted": self._valid(peer["node_id"])})
        return {"peers": shown, "stealth_peers": hidden}

    def state(self) -> dict:
        client, mesh = self.client, self.mesh
        links = mesh.peers() if mesh is not None else []
        return {
            "joined": self.joined,
            "requested": bool(self.runtime.cfg["mesh.public"]),
            "tracker": self.tracker_url,
            "tracker_connected": bool(client is not None and client.connected),
            "stealth": self.stealth,
            "addresses": "(stealth)" if self.stealth else ([self.address] if self.address else []),
            "peers": len(links),
            "stealth_peers": len([p for p in links if p.get("stealth")]),
            "relay_circuits": len(client.circuits()) if client is not None else 0,
            "listed_by_tracker": self.listed,
            "memory": self.memory_sync.state() if self.memory_sync is not None else None,
            "refused_untrusted": dict(self.gate.stats) if self.gate is not None else {},
            "last_error": self.last_error,
        }

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)


def _percent(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(min(max(value, 0), 100))
