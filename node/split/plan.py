"""Which node holds which layers of a split model. Pure: numbers in, a plan out.

llama.cpp places layers in order: the first ones on this node's CPU, the rest over the RPC devices in
the order given, in proportion to `--tensor-split`. Its output layer counts as one more slot at the end
(n_layer + 1 slots); we pin the output tensors (and the token embeddings) to this node's CPU with
`--override-tensor`, so the logits never cross a link, and give that slot to the last lender, where it
holds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

# Memory kept free on every node beyond its share (the OS, the node itself, buffers).
RESERVE_BYTES = 256 * 1024 * 1024


class PlanError(ValueError):
    """No split fits: says what is missing."""


@dataclass(frozen=True)
class Offer:
    """A node that could hold layers: this node (`local`) or a lending peer."""

    node_id: str
    name: str | None
    free_bytes: int
    latency_ms: float | None = None
    local: bool = False


@dataclass(frozen=True)
class Part:
    node_id: str
    name: str | None
    first_layer: int
    layers: int
    bytes: int
    local: bool

    def to_dict(self) -> dict:
        return {"node": self.node_id, "name": self.name, "local": self.local,
                "layers": [self.first_layer, self.first_layer + self.layers - 1] if self.layers else [],
                "layer_count": self.layers, "bytes": self.bytes}


@dataclass(frozen=True)
class SplitPlan:
    n_layers: int
    parts: tuple[Part, ...]  # this node first, then the lenders in llama.cpp's device order

    @property
    def lenders(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if not p.local)

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's -ngl: the lenders' layers plus the output slot (pinned back to the CPU)."""
        return sum(p.layers for p in self.lenders) + 1

    @property
    def tensor_split(self) -> list[int]:
        shares = [p.layers for p in self.lenders]
        shares[-1] += 1  # the output slot
        return shares

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "parts": [p.to_dict() for p in self.parts]}


def layer_bytes(file_bytes: int, n_layers: int, embedding_bytes: int = 0) -> int:
    """Bytes one block takes: the file less what stays on this node (the embeddings), spread evenly."""
    return max(1, (file_bytes - embedding_bytes) // max(1, n_layers))


def plan_split(
    n_layers: int,
    per_layer: int,
    local: Offer,
    lenders: list[Offer],
    *,
    local_fixed_bytes: int = 0,
    force_all: bool = False,
) -> SplitPlan:
    """Spread `n_layers` blocks of `per_layer` bytes over `local` and `lenders`.

    force_all: every offer takes a share in proportion to its free memory (at least one block each).
    Otherwise this node takes what fits, then the fastest lenders (lowest latency, then most memory)
    until every block has a place: the fewest links on the token's path.
    `local_fixed_bytes` is what stays here whatever the split (embeddings, output, KV cache).
    """
    if n_layers < 2:
        raise PlanError(f"a model with {n_layers} block(s) cannot be split")
    if not lenders:
        raise PlanError("no peer of the private mesh lends memory for a split now (sharing.split on a peer, "
                        "its guard not paused, its rpc-server built)")
    ranked = sorted(lenders, key=lambda o: (o.latency_ms if o.latency_ms is not None else 1e9, -o.free_bytes))
    local_room = max(0, local.free_bytes - RESERVE_BYTES - local_fixed_bytes) // per_layer

    def capacity(offer: Offer) -> int:
        return max(0, offer.free_bytes - RESERVE_BYTES) // per_layer

    if force_all:
        chosen = ranked[: n_layers - 1]  # every node must get a block
        offers = [local, *chosen]
        rooms = [local_room, *(capacity(o) for o in chosen)]
        if sum(rooms) < n_layers or min(rooms) < 1:
            raise PlanError(_short(n_layers, per_layer, offers, rooms))
        counts = _proportional(n_layers, [max(1, r) for r in rooms], rooms)
    else:
        counts, offers, left = [], [], n_layers
        take = min(local_room, n_layers - 1)  # a split keeps at least one block away
        offers.append(local)
        counts.append(take)
        left -= take
        for offer in ranked:
            if left == 0:
                break
            got = min(capacity(offer), left)
            if got > 0:
                offers.append(offer)
                counts.append(got)
                left -= got
        if left:
            rooms = [local_room, *(capacity(o) for o in ranked)]
            raise PlanError(_short(n_layers, per_layer, [local, *ranked], rooms))
    parts, first = [], 0
    for offer, count in zip(offers, counts, strict=True):
        if count == 0 and not offer.local:
            continue
        parts.append(Part(offer.node_id, offer.name, first, count,
                          count * per_layer + (local_fixed_bytes if offer.local else 0), offer.local))
        first += count
    return SplitPlan(n_layers, tuple(parts))


def _proportional(total: int, weights: list[int], caps: list[int]) -> list[int]:
    """`total` as integers in proportion to `weights`, each at least 1 and at most its cap."""
    counts = [1] * len(weights)
    left = total - len(weights)
    while left > 0:
        # the offer furthest below its fair share that still has room
        best, gap = None, None
        for i, w in enumerate(weights):
            if counts[i] >= caps[i]:
                continue
            g = w / sum(weights) * total - counts[i]
            if gap is None or g > gap:
                best, gap = i, g
        if best is None:
            break
        counts[best] += 1
        left -= 1
    return counts


def _short(n_layers: int, per_layer: int, offers: list[Offer], rooms: list[int]) -> str:
    held = ", ".join(f"{o.name or o.node_id[:7]}: {r} block(s)" for o, r in zip(offers, rooms, strict=False))
    return (f"the model's {n_layers} blocks (~{per_layer / 2**20:.0f} MiB each) do not fit: room for {held} "
            f"(each node keeps {RESERVE_BYTES // 2**20} MiB free)")
