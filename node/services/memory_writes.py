"""Group commit for memory writes from the API: concurrent writes share one transaction and one fsync.

Writes that arrive while a commit is in flight wait for the next one, which takes all of them (up to
MAX_BATCH); each caller is answered only after the fsync that made its own write durable. With one
writer at a time nothing changes; with many, the disk's fsync rate stops being the write rate.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pinkybrain.node.services.memory_store import MemoryStore

MAX_BATCH = 256


class GroupCommitter:
    def __init__(self, store: MemoryStore):
        self.store = store
        self._waiting: list[tuple[tuple[str, str, Any], asyncio.Future]] = []
        self._running = False

    async def set(self, key: str, value: Any) -> bytes:
        return await self._submit(("set", key, value))

    async def delete(self, key: str) -> bytes:
        return await self._submit(("delete", key, None))

    async def _submit(self, op: tuple[str, str, Any]) -> bytes:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((op, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                try:
                    results = await asyncio.to_thread(self.store.write_batch, [op for op, _ in batch])
                except Exception as exc:  # noqa: BLE001 - the commit failed: every write in it failed
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller went away (request cancelled); its write still stands
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._running = False


def committer_for(store: MemoryStore) -> GroupCommitter:
    """The store's one committer (created on first use), so all API writes to it are grouped together.
    Any store with write_batch will do: the public memory's signing wrapper signs each entry in it."""
    committer = getattr(store, "_group_committer", None)
    if committer is None:
        committer = store._group_committer = GroupCommitter(store)
    return committer
