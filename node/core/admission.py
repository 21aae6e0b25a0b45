"""Slots for work that strangers can start (inbound handshakes): a total budget, a share per address, and
fairness when the budget is full, so that a flood from one address cannot starve any other.

Pure bookkeeping, no I/O: the caller says how to stop a slot's holder (`on_evict`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Callable


@functools.lru_cache(maxsize=8192)  # counted on every new connection, for every open one
def address_bucket(host: str | None) -> str:
    """What one client counts as: its IPv4 address, or its IPv6 /64 (one machine usually holds a whole
    /64, so counting single IPv6 addresses would give it millions of shares). No address: "unknown"."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Slot:
    __slots__ = ("address", "evicted", "_on_evict")

    def __init__(self, address: str, on_evict: Callable[[], None]):
        self.address, self._on_evict, self.evicted = address, on_evict, False


class PendingSlots:
    """At most `total` slots, at most `per_address` from one address.

    When every slot is taken, a newcomer takes the oldest slot of the address holding the most, if that
    address holds more than the newcomer's would after admission: a flood keeps at most an even share.
    """

    def __init__(self, total: int, per_address: int):
        if total < 1 or per_address < 1:
            raise ValueError("total and per_address must be at least 1")
        self.total, self.per_address = total, per_address
        self._slots: dict[str, list[Slot]] = {}  # address -> its slots, oldest first
        self._count = 0
        self.stats: Counter = Counter()

    def __len__(self) -> int:
        return self._count

    def held_by(self, address: str) -> int:
        return len(self._slots.get(address, ()))

    def would_admit(self, address: str) -> bool:
        held = self.held_by(address)
        if held >= self.per_address:
            return False
        return self._count < self.total or self._heaviest_share() > held + 1

    def admit(self, address: str, on_evict: Callable[[], None]) -> Slot | None:
        """A slot for `address`, or None (its share is used up, or the budget is fairly shared)."""
        if not self.would_admit(address):
            self.stats["refused"] += 1
            return None
        if self._count >= self.total:
            heaviest = max(self._slots, key=lambda a: len(self._slots[a]))
            victim = self._slots[heaviest][0]
            self.release(victim)
            victim.evicted = True
            self.stats["evicted"] += 1
            victim._on_evict()
        slot = Slot(address, on_evict)
        self._slots.setdefault(address, []).append(slot)
        self._count += 1
        return slot

    def release(self, slot: Slot) -> None:
        held = self._slots.get(slot.address)
        if held is None or slot not in held:
            return  # already released (evicted, then finished)
        held.remove(slot)
        self._count -= 1
        if not held:
            del self._slots[slot.address]

    def _heaviest_share(self) -> int:
        return max((len(v) for v in self._slots.values()), default=0)
