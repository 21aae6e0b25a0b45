"""Keeps one durable CRDT memory store converging with every peer of one mesh.

    sync = MemorySync(store, mesh, namespace="private", interval=30)
    sync.start()            # in the event loop, before or after mesh.start()
    ...
    await sync.stop()

Three RPCs per namespace, so a private and a public document never share a handler or a store:

    memory.<ns>.update   a push: one Yjs update (bytes). Applied if valid, then gossiped on to every other
                         linked peer; an update's id is the SHA-256 of its bytes, and a bounded set of seen
                         ids plus the store's own "already known" answer stop the flood.
    memory.<ns>.sync     the Yjs sync steps: the caller sends its state vector, the answer streams back
                         {"size": n} and then n bytes, in chunks, of everything the caller lacks. It runs
                         on every link-up (both ends pull, so each gets exactly what it lacks), every
                         `interval` seconds with each peer (anti-entropy: heals dropped pushes), and when an
                         update arrives whose dependencies are missing.
    memory.<ns>.hint     "pull from me": sent when a push cannot carry what a peer needs (over the frame
                         limit, a push that timed out, an overflowing queue).

Local writes reach peers through the store's listener, which fires only after the write is on disk. Each
peer has one outbox and one push in flight; updates queued meanwhile are merged into the next push, so a
burst of writes costs few messages. An update that fails to decode or to validate is refused (the store
checks it on a scratch copy first, so the document is untouched), the sender gets a `bad_update` error,
and after `penalty_limit` of them its link is closed and it is banned for `ban_secs`. Log lines say which
peer and how many bytes, never what the update holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pycrdt

from pinkybrain.node.core.memory_doc import MemoryUpdateError
from pinkybrain.node.services.memory_store import MemoryStore, MemoryStoreError
from pinkybrain.node.services.peer_link import (
    MessageTooLarge,
    PeerGone,
    RemoteError,
    RpcContext,
    RpcError,
    RpcTimeout,
)

log = logging.getLogger("pinkybrain.memory")

SEEN_IDS = 65536  # ids of updates already handled (~3 MiB); older ones fall back on apply_remote's check
OUTBOX_MAX_BYTES = 16 * 1024 * 1024  # past this a peer gets a hint to pull instead of a growing queue
MAX_SYNC_BYTES = 256 * 1024 * 1024  # the largest sync answer accepted from a peer
MAX_STATE_VECTOR = 256 * 1024
FRAME_ROOM = 4096  # message header and encryption overhead inside one frame
SYNC_CHUNK = 256 * 1024
GAP_PULL_SPACING = 1.0  # at most one gap-triggered pull per peer per second
RECHECK_SECS = 2.0  # after a sync that left two copies apart, compare again this much later
MAX_ENTRIES = 10_000_000  # the most entry digests accepted from a peer


def update_id(update: bytes) -> bytes:
    return hashlib.sha256(update).digest()


def has_structs(update: bytes) -> bool:
    """Whether a Yjs v1 update carries content (not just a delete set): its first varuint counts clients."""
    return bool(update) and update[0] != 0


class _Outbox:
    """What is waiting to be pushed to one peer, and the task pushing it."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.bytes = 0
        self.hint = False  # tell the peer to pull (what it needs cannot be pushed)
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.closed = False

    def close(self) -> None:
        # A flag as well as cancel(): Python 3.11's wait_for can swallow a cancellation that lands as a
        # request completes, and the task would then wait on its event for ever.
        self.closed = True
        self.clear()
        self.wake.set()
        if self.task is not None:
            self.task.cancel()

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0


_STATE_COUNTERS = ("local_writes", "pushes_sent", "push_bytes_sent", "pushes_failed", "hints_sent",
                   "updates_received", "updates_applied", "duplicates", "gaps", "syncs", "sync_bytes_received",
                   "syncs_failed", "refused", "peers_banned", "equivocations", "diverged_entries")


class MemorySync:
    def __init__(
        self,
        store: MemoryStore,
        mesh,
        *,
        namespace: str = "private",
        interval: float = 30.0,
        penalty_limit: int = 3,
        ban_secs: float = 600.0,
        push_timeout: float = 30.0,
        sync_timeout: float = 30.0,
        max_sync_bytes: int = MAX_SYNC_BYTES,
        peer_filter: Callable[[str], bool] | None = None,
    ):
        if store.namespace != namespace:
            # The one guard against a public store answering on private handlers, or the reverse.
            raise ValueError(f"store holds namespace {store.namespace!r}, not {namespace!r}")
        if interval <= 0 or penalty_limit < 1:
            raise ValueError("interval must be positive and penalty_limit at least 1")
        self.store, self.mesh, self.namespace = store, mesh, namespace
        self.interval, self.penalty_limit, self.ban_secs = interval, penalty_limit, ban_secs
        self.push_timeout, self.sync_timeout, self.max_sync_bytes = push_timeout, sync_timeout, max_sync_bytes
        # The public mesh syncs only with peers its Web of Trust finds valid (neither pulls nor pushes).
        self.peer_filter = peer_filter
        self.update_method = f"memory.{namespace}.update"
        self.sync_method = f"memory.{namespace}.sync"
        self.hint_method = f"memory.{namespace}.hint"
        self.digests_method = f"memory.{namespace}.digests"
        frame = getattr(getattr(mesh, "settings", None), "max_frame_bytes", 1024 * 1024)
        self.push_budget = max(1024, frame - FRAME_ROOM)
        self.chunk_bytes = max(1024, min(SYNC_CHUNK, frame // 2))
        # Every counter state() shows starts at 0: a missing Counter key costs a Python call per read.
        self.stats: Counter = Counter(dict.fromkeys(_STATE_COUNTERS, 0))
        self._strikes: Counter = Counter()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._outboxes: dict[str, _Outbox] = {}
        self._pulls: dict[str, asyncio.Task] = {}
        self._pull_again: set[str] = set()
        self._last_gap_pull: dict[str, float] = {}
        self._rechecks: dict[str, asyncio.TimerHandle] = {}
        # One thread for every store call made here: applies run in arrival order and a burst of peer
        # traffic cannot take the default pool's threads from the API.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"memory-sync-{namespace}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._undo: list[Callable[[], Any]] = []
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.mesh.register_handler(self.update_method, self._serve_update)
        self.mesh.register_handler(self.sync_method, self._serve_sync)
        self.mesh.register_handler(self.hint_method, self._serve_hint)
        self.mesh.register_handler(self.digests_method, self._serve_digests)
        self._undo = [
            self.store.add_listener(self._on_local_write),
            self.mesh.on_link_up(self._link_up),
            self.mesh.on_link_down(self._link_down),
        ]
        self._task = asyncio.create_task(self._anti_entropy_loop(), name=f"memory-sync-{self.namespace}")
        for peer in self.mesh.peer_ids():  # links that came up before we were attached
            self.request_sync(peer)

    async def stop(self, flush_secs: float = 1.0) -> None:
        """Give queued pushes a moment to leave (bounded), then stop everything; the store stays open."""
        for undo in self._undo:
            undo()
        self._undo = []
        for method in (self.update_method, self.sync_method, self.hint_method, self.digests_method):
            self.mesh.unregister_handler(method)
        deadline = asyncio.get_running_loop().time() + flush_secs
        while (
            any(box.items for box in self._outboxes.values()) and asyncio.get_running_loop().time() < deadline
        ):
            await asyncio.sleep(0.02)
        self._stopping = True
        for recheck in self._rechecks.values():
            recheck.cancel()
        self._rechecks.clear()
        tasks = [t for t in (self._task, *self._pulls.values()) if t is not None]
        tasks += [box.task for box in self._outboxes.values() if box.task is not None]
        for box in self._outboxes.values():
            box.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)  # bounded: see _Outbox.close
        self._outboxes.clear()
        self._pulls.clear()
        await asyncio.to_thread(self._executor.shutdown, True)  # lets a running store call finish

    # -- views -------------------------------------------------------------------------------------
    def state(self) -> dict:
        s = self.stats
        return {
            "namespace": self.namespace,
            "peers": len(self.mesh.peer_ids()),
            "interval_secs": self.interval,
            "local_writes": s["local_writes"],
            "pushes_sent": s["pushes_sent"],
            "push_bytes_sent": s["push_bytes_sent"],
            "pushes_failed": s["pushes_failed"],
            "hints_sent": s["hints_sent"],
            "queued": sum(len(box.items) for box in self._outboxes.values()),
            "updates_received": s["updates_received"],
            "updates_applied": s["updates_applied"],
            "duplicates": s["duplicates"],
            "gaps": s["gaps"],
            "syncs": s["syncs"],
            "sync_bytes_received": s["sync_bytes_received"],
            "syncs_failed": s["syncs_failed"],
            "refused": s["refused"],
            "peers_banned": s["peers_banned"],
            "equivocations": s["equivocations"],
            "diverged_entries_dropped": s["diverged_entries"],
            "strikes": {peer[:7]: n for peer, n in self._strikes.items()},
        }

    # -- local writes --------------------------------------------------------------------------------
    def _on_local_write(self, update: bytes) -> None:
        # Called on the writing thread, with the store locked, after the write is durable: hand over only.
        loop = self._loop
        if loop is None or self._stopping:
            return
        try:
            loop.call_soon_threadsafe(self._local_update, update)
        except RuntimeError:  # the loop has closed (shutdown): peers catch up at their next sync
            pass

    def _local_update(self, update: bytes) -> None:
        self.stats["local_writes"] += 1
        self._remember(update_id(update))
        self._fan_out(update, exclude=None)

    # -- pushing ------------------------------------------------------------------------------------
    def _fan_out(self, update: bytes, *, exclude: str | None) -> None:
        for peer in self.mesh.peer_ids():
            if peer != exclude:
                self._enqueue(peer, update)

    def _enqueue(self, peer: str, update: bytes) -> None:
        if self._stopping or (self.peer_filter is not None and not self.peer_filter(peer)):
            return
        box = self._outboxes.get(peer)
        if box is None:
            box = self._outboxes[peer] = _Outbox()
        if len(update) > self.push_budget or box.bytes + len(update) > OUTBOX_MAX_BYTES:
            # One pull carries all of it, however large: cheaper than a queue that keeps growing.
            box.clear()
            box.hint = True
        else:
            box.items.append(update)
            box.bytes += len(update)
        if box.task is None or box.task.done():
            box.task = asyncio.create_task(self._push_loop(peer, box), name=f"memory-push-{peer[:7]}")
        box.wake.set()

    async def _push_loop(self, peer: str, box: _Outbox) -> None:
        while not box.closed:
            await box.wake.wait()
            box.wake.clear()
            while not box.closed and (box.hint or box.items):
                if box.hint:
                    box.hint = False
                    if await self._send(peer, self.hint_method, None):
                        self.stats["hints_sent"] += 1
                    continue
                batch = [box.items.popleft()]
                size = len(batch[0])
                # Merging is only worth it when a backlog formed; a lone update keeps its bytes (and its id).
                while box.items and size + len(box.items[0]) <= self.push_budget // 2:
                    size += len(box.items[0])
                    batch.append(box.items.popleft())
                box.bytes -= sum(len(u) for u in batch)
                payload = batch[0] if len(batch) == 1 else pycrdt.merge_updates(*batch)
                if len(payload) > self.push_budget:
                    box.hint = True
                    continue
                if await self._send(peer, self.update_method, payload):
                    self.stats["pushes_sent"] += 1
                    self.stats["push_bytes_sent"] += len(payload)

    async def _send(self, peer: str, method: str, payload: Any) -> bool:
        try:
            await self.mesh.request(peer, method, payload, timeout=self.push_timeout)
            return True
        except PeerGone:
            return False  # its link-down drops this outbox; the sync at the next link-up heals it
        except (RpcTimeout, MessageTooLarge) as exc:
            # It may or may not have arrived: a pull settles it either way.
            self.stats["pushes_failed"] += 1
            log.info("memory %s: push to %s failed (%s); asking it to pull", self.namespace, peer[:7], exc)
            box = self._outboxes.get(peer)
            if box is not None and method != self.hint_method:
                box.hint = True
        except RemoteError as exc:
            self.stats["pushes_failed"] += 1
            # unknown_method: the peer is shutting down (or has no such namespace). Anything else usually
            # means the peers disagree on memory limits, which must match across a network.
            level = logging.DEBUG if exc.code == "unknown_method" else logging.WARNING
            log.log(level, "memory %s: %s refused our update: %s", self.namespace, peer[:7], exc.code)
        return False

    # -- pulling ------------------------------------------------------------------------------------
    def request_sync(self, peer: str) -> None:
        """Pull what we lack from `peer` soon; calls made while one runs collapse into one more run."""
        if self._stopping or (self.peer_filter is not None and not self.peer_filter(peer)):
            return
        task = self._pulls.get(peer)
        if task is not None and not task.done():
            self._pull_again.add(peer)
            return
        self._pulls[peer] = asyncio.create_task(self._pull_loop(peer), name=f"memory-sync-{peer[:7]}")

    async def _pull_loop(self, peer: str) -> None:
        try:
            while True:
                self._pull_again.discard(peer)
                await self._pull(peer)
                if self._stopping or peer not in self._pull_again or not self.mesh.connected(peer):
                    return
        finally:
            if self._pulls.get(peer) is asyncio.current_task():
                del self._pulls[peer]

    async def _pull(self, peer: str) -> None:
        try:
            state_vector = await self._run(self.store.state_vector)
            diff, theirs = await self._fetch_diff(peer, state_vector)
        except PeerGone:
            return
        except RpcTimeout as exc:
            self.stats["syncs_failed"] += 1
            log.info("memory %s: sync with %s timed out: %s", self.namespace, peer[:7], exc)
            return
        except RemoteError as exc:
            self.stats["syncs_failed"] += 1
            # unknown_method: a peer without this namespace (or an older node); nothing to hold against it.
            level = logging.DEBUG if exc.code == "unknown_method" else logging.INFO
            log.log(level, "memory %s: %s refused to sync: %s", self.namespace, peer[:7], exc.code)
            return
        except MemoryStoreError as exc:
            log.error("memory %s: cannot sync: %s", self.namespace, exc)
            return
        except _BadSync as exc:
            self.stats["syncs_failed"] += 1
            self._strike(peer, f"a malformed sync answer ({exc})", 0, "sync")
            return
        self.stats["syncs"] += 1
        self.stats["sync_bytes_received"] += len(diff)
        try:
            changed = await self._receive(peer, diff, "sync")
        except RpcError:
            return  # already counted against the peer by _receive
        if theirs is not None and not await self._check_divergence(peer, theirs) and changed:
            # We were behind and still differ (the peer lacked something too, and is likely pulling it
            # from us right now): compare again once both pulls are done.
            self._recheck_later(peer)

    def _recheck_later(self, peer: str) -> None:
        if peer in self._rechecks or self._stopping:
            return

        def recheck() -> None:
            self._rechecks.pop(peer, None)
            if self.mesh.connected(peer):
                self.request_sync(peer)

        self._rechecks[peer] = asyncio.get_running_loop().call_later(RECHECK_SECS, recheck)

    async def _check_divergence(self, peer: str, theirs: dict) -> bool:
        """After a pull we hold everything the peer held: the same items must show the same values.
        Returns whether the two copies held the same items (and so could be compared)."""
        try:
            mine = await self._run(self.store.fingerprint)
        except MemoryStoreError:
            return True
        if mine["state"] != theirs["state"]:
            return False  # not the same items yet: writes in flight either way
        if mine["view"] == theirs["view"]:
            return True
        try:
            state, digests = await self._fetch_digests(peer)
            dropped = await self._run(self.store.drop_diverged, state, digests)
        except (PeerGone, RpcTimeout, RemoteError, MemoryStoreError) as exc:
            log.info("memory %s: cannot compare entries with %s: %s", self.namespace, peer[:7], exc)
            return True
        except _BadSync as exc:
            self._strike(peer, f"a malformed digest answer ({exc})", 0, "sync")
            return True
        if dropped:
            # A member may delete entries anyway, so acting on its word grants it nothing new.
            self.stats["equivocations"] += 1
            self.stats["diverged_entries"] += len(dropped)
            log.warning(
                "memory %s: %s and this node hold different values under the same Yjs item ids "
                "(a peer equivocated); dropped %d such entries everywhere",
                self.namespace,
                peer[:7],
                len(dropped),
            )
        return True

    async def _fetch_digests(self, peer: str) -> tuple[str, dict[str, str]]:
        state, count, digests = None, None, {}
        async with self.mesh.stream(peer, self.digests_method, None, timeout=self.sync_timeout) as chunks:
            async for chunk in chunks:
                if not isinstance(chunk, dict):
                    raise _BadSync("a digest chunk is not a mapping")
                if state is None:
                    state, count = chunk.get("state"), chunk.get("count")
                    if not isinstance(state, str) or not isinstance(count, int) or not 0 <= count <= MAX_ENTRIES:
                        raise _BadSync("bad digest header")
                    continue
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in chunk.items()):
                    raise _BadSync("digests are text")
                digests.update(chunk)
                if len(digests) > count:
                    raise _BadSync("more digests than announced")
        if state is None or len(digests) != count:
            raise _BadSync(f"{len(digests)} of {count} announced digests")
        return state, digests

    async def _fetch_diff(self, peer: str, state_vector: bytes) -> tuple[bytes, dict | None]:
        size, parts, got, theirs = None, [], 0, None
        async with self.mesh.stream(
            peer, self.sync_method, state_vector, timeout=self.sync_timeout
        ) as chunks:
            async for chunk in chunks:
                if size is None:
                    size = chunk.get("size") if isinstance(chunk, dict) else None
                    if (
                        not isinstance(size, int)
                        or isinstance(size, bool)
                        or not 0 <= size <= self.max_sync_bytes
                    ):
                        raise _BadSync(f"size {size!r} outside 0..{self.max_sync_bytes}")
                    if isinstance(chunk.get("state"), str) and isinstance(chunk.get("view"), str):
                        theirs = {"state": chunk["state"], "view": chunk["view"]}  # older nodes omit it
                    continue
                if not isinstance(chunk, bytes) or got + len(chunk) > size:
                    raise _BadSync("more data than announced")
                parts.append(chunk)
                got += len(chunk)
        if size is None or got != size:
            raise _BadSync(f"{got} of {size} announced bytes")
        return b"".join(parts), theirs

    # -- receiving ----------------------------------------------------------------------------------
    async def _receive(self, peer: str, update: bytes, via: str) -> bool:
        """Apply a peer's update; gossip it on if it was news. Raises RpcError for an invalid one."""
        uid = update_id(update)
        if uid in self._seen:
            self._seen.move_to_end(uid)
            self.stats["duplicates"] += 1
            return False
        if via == "push":
            self.stats["updates_received"] += 1
        try:
            changed, lacking = await self._run(self._apply, update)
        except MemoryUpdateError as exc:
            self._strike(
                peer,
                "an undecodable update" if "cannot be decoded" in str(exc) else "an invalid update",
                len(update),
                via,
            )
            raise RpcError("bad_update", str(exc)[:300]) from None
        except MemoryStoreError as exc:  # our disk, not the peer: it will resend at the next sync
            log.error("memory %s: cannot store an update from %s: %s", self.namespace, peer[:7], exc)
            raise RpcError("unavailable", "memory store unavailable") from None
        except (Exception, RecursionError) as exc:  # noqa: BLE001 - whatever it was, the update was refused
            # Nothing was applied (the store checks on a scratch copy), and an error we did not foresee is
            # still the sender's doing: it counts like any other refusal.
            self._strike(peer, f"an update that failed to apply ({type(exc).__name__})", len(update), via)
            raise RpcError("bad_update", "update refused") from None
        if not lacking:
            self._remember(uid)  # the document only grows: the same bytes can never matter again
        elif via == "push":
            # Part of it builds on content we never got (a lost push, or a local write on the sender that
            # overtook the update it overwrote): the sender has it all. A sync answer that still lacks
            # something is all that peer has, so asking it again would only repeat it.
            self.stats["gaps"] += 1
            self._pull_soon(peer)
        if not changed:
            self.stats["duplicates"] += 0 if lacking else 1
            if via == "push" and not lacking:
                # New bytes, nothing new in them: normal for merged batches, but also what an item id we
                # hold with other content looks like (equivocation). A pull compares fingerprints.
                self._pull_soon(peer)
            return False
        self.stats["updates_applied"] += 1
        self._fan_out(update, exclude=peer)
        return True

    def _apply(self, update: bytes) -> tuple[bool, bool]:
        changed = self.store.apply_remote(update)
        rest = pycrdt.get_update(update, self.store.state_vector())
        return changed, has_structs(rest)

    def _pull_soon(self, peer: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_gap_pull.get(peer, -GAP_PULL_SPACING) >= GAP_PULL_SPACING:
            self._last_gap_pull[peer] = now
            self.request_sync(peer)

    def _strike(self, peer: str, what: str, size: int, via: str) -> None:
        self.stats["refused"] += 1
        self._strikes[peer] += 1
        n = self._strikes[peer]
        log.warning(
            "memory %s: refused %s from %s (%s, %d bytes; strike %d of %d)",
            self.namespace,
            what,
            peer[:7],
            via,
            size,
            n,
            self.penalty_limit,
        )
        if n >= self.penalty_limit:
            del self._strikes[peer]
            self.stats["peers_banned"] += 1
            # A moment later, so the error answering this update still reaches the peer before the link goes.
            reason = f"sent {n} invalid memory updates"
            asyncio.get_running_loop().call_later(
                0.2, lambda: self.mesh.disconnect(peer, reason, ban_secs=self.ban_secs)
            )

    # -- handlers -------------------------------------------------------------------------------------
    async def _serve_update(self, ctx: RpcContext, payload: Any) -> dict:
        if not isinstance(payload, bytes):
            self._strike(ctx.peer_id, "a push that is not bytes", 0, "push")
            raise RpcError("bad_update", "a memory update is raw bytes")
        changed = await self._receive(ctx.peer_id, payload, "push")
        return {"changed": changed}

    async def _serve_sync(self, ctx: RpcContext, payload: Any):
        if not isinstance(payload, bytes) or len(payload) > MAX_STATE_VECTOR:
            self._strike(ctx.peer_id, "a malformed state vector", 0, "sync")
            raise RpcError("bad_state_vector", "a state vector is raw bytes, at most 256 KiB")
        try:
            diff, fingerprint = await self._run(self.store.diff_and_fingerprint, payload)
        except MemoryUpdateError as exc:
            self._strike(ctx.peer_id, "an undecodable state vector", len(payload), "sync")
            raise RpcError("bad_state_vector", str(exc)[:300]) from None
        except MemoryStoreError:
            raise RpcError("unavailable", "memory store unavailable") from None
        yield {"size": len(diff), **fingerprint}
        for start in range(0, len(diff), self.chunk_bytes):
            yield diff[start : start + self.chunk_bytes]

    async def _serve_digests(self, ctx: RpcContext, payload: Any):
        try:
            fingerprint, digests = await self._run(self.store.entry_digests)
        except MemoryStoreError:
            raise RpcError("unavailable", "memory store unavailable") from None
        yield {"state": fingerprint["state"], "count": len(digests)}
        chunk, size = {}, 0
        for key, digest in digests.items():
            chunk[key] = digest
            size += len(key.encode()) * 6 + 48  # JSON-escaped worst case, so a chunk fits one frame
            if size >= self.chunk_bytes // 2:
                yield chunk
                chunk, size = {}, 0
        if chunk:
            yield chunk

    async def _serve_hint(self, ctx: RpcContext, payload: Any) -> bool:
        self.request_sync(ctx.peer_id)
        return True

    # -- links and anti-entropy -----------------------------------------------------------------------
    def _link_up(self, peer: str) -> None:
        self.request_sync(peer)

    def _link_down(self, peer: str) -> None:
        box = self._outboxes.pop(peer, None)
        if box is not None:
            box.close()
        task = self._pulls.pop(peer, None)
        if task is not None:
            task.cancel()
        self._pull_again.discard(peer)
        self._last_gap_pull.pop(peer, None)
        recheck = self._rechecks.pop(peer, None)
        if recheck is not None:
            recheck.cancel()

    async def _anti_entropy_loop(self) -> None:
        rng = random.SystemRandom()
        while True:
            # Jitter: peers that started together do not all sync in the same instant.
            await asyncio.sleep(self.interval * rng.uniform(0.8, 1.2))
            for peer in self.mesh.peer_ids():
                self.request_sync(peer)

    # -- helpers ------------------------------------------------------------------------------------
    def _remember(self, uid: bytes) -> None:
        self._seen[uid] = None
        self._seen.move_to_end(uid)
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class _BadSync(Exception):
    """A peer's sync answer broke the protocol (wrong header, more or fewer bytes than announced)."""
