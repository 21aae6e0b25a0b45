"""Who may do what on the public mesh: the Mesh's gate (mesh.PeerGate) for /p2p/public.

A peer this node's Web of Trust does not find valid may complete the handshake and exchange trust
statements (`trust.exchange`, so that a vouch for it can reach us), within a byte and a request budget;
nothing else. It is not served (no query, no public memory read or write, no mesh.info), not passed on
in peer exchange, and what it says in peer exchange is ignored. Refusals are operational events: logged
with the method and the peer's short id, never with what the request held.

Validity is looked up per frame, so it comes from a cache that follows the trust store's revision and is
recomputed at least every `max_age` seconds (vouches expire with time, not only with changes).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pinkybrain.node.core.channel import TokenBucket

log = logging.getLogger("pinkybrain.public")

TRUST_EXCHANGE = "trust.exchange"


@dataclass(frozen=True)
class UntrustedBudget:
    """What a peer that is not valid may send: enough for a handshake, heartbeats and an occasional full
    trust exchange (at most ~1 MiB), far too little to be useful for anything else."""

    bytes_per_sec: float = 16 * 1024
    bytes_burst: float = 2 * 1024 * 1024
    requests_per_sec: float = 0.2
    requests_burst: float = 3.0


class ValidityCache:
    """The set of keys the trust store finds valid, recomputed when the store changes or ages out."""

    def __init__(self, trust, *, max_age: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.trust, self.max_age, self.clock = trust, max_age, clock
        self._valid: frozenset[str] = frozenset()
        self._revision: int | None = None
        self._at = float("-inf")

    def valid(self) -> frozenset[str]:
        now = self.clock()
        revision = getattr(self.trust, "revision", None)
        if revision != self._revision or now - self._at >= self.max_age:
            self._valid = frozenset(self.trust.valid_keys())
            self._revision, self._at = revision, now
        return self._valid

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.valid()


class _PeerBudget:
    def __init__(self, budget: UntrustedBudget):
        self.bytes = TokenBucket(budget.bytes_per_sec, budget.bytes_burst)
        self.requests = TokenBucket(budget.requests_per_sec, budget.requests_burst)
        self.refusals = 0


class PublicGate:
    """mesh.PeerGate for the public mesh. `forget(peer)` when its link goes, so state stays bounded."""

    OPEN_METHODS = frozenset({TRUST_EXCHANGE})

    def __init__(self, validity: ValidityCache, *, budget: UntrustedBudget | None = None):
        self.validity = validity
        self.budget = budget or UntrustedBudget()
        self.stats: Counter = Counter()
        self._peers: dict[str, _PeerBudget] = {}

    def trusted(self, peer_id: str) -> bool:
        return peer_id in self.validity

    def refuse_request(self, peer_id: str, method: str) -> str | None:
        if self.trusted(peer_id):
            return None
        state = self._state(peer_id)
        if method not in self.OPEN_METHODS:
            self._refused(state, peer_id, method, "not valid in this node's Web of Trust")
            return ("refused: not trusted (this node's Web of Trust does not find you valid; only trust "
                    "exchange is open to you: ask someone it trusts to vouch for you)")
        if not state.requests.take():
            self._refused(state, peer_id, method, "over the request budget of a peer that is not valid")
            return "refused: too many requests from a peer this node does not trust; slow down"
        return None

    def admit_bytes(self, peer_id: str, size: int) -> bool:
        if self.trusted(peer_id):
            return True
        if self._state(peer_id).bytes.take(size):
            return True
        self.stats["closed_over_budget"] += 1
        log.info("public mesh: closing the link to %s: over the byte budget of a peer that is not valid",
                 peer_id[:7])
        return False

    def forget(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    def _state(self, peer_id: str) -> _PeerBudget:
        state = self._peers.get(peer_id)
        if state is None:
            state = self._peers[peer_id] = _PeerBudget(self.budget)
        return state

    def _refused(self, state: _PeerBudget, peer_id: str, method: str, why: str) -> None:
        self.stats["refused"] += 1
        self.stats[f"refused {method[:40]}"] += 1
        state.refusals += 1
        if state.refusals <= 5 or state.refusals % 100 == 0:  # a flood does not become a flood of lines
            log.info("public mesh: refused %s from %s: %s (%d refused from it)", method[:40], peer_id[:7], why,
                     state.refusals)
