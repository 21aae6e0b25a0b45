"""Split planning (node/split/plan.py), pure: who takes which blocks, and what llama.cpp is told."""

from __future__ import annotations

import pytest

from pinkybrain.node.split.plan import RESERVE_BYTES, Offer, PlanError, plan_split

MiB = 2**20
LOCAL = Offer("here", "a", 4096 * MiB, local=True)


def lender(name: str, free_mib: int, latency: float | None = 1.0) -> Offer:
    return Offer(f"id-{name}", name, free_mib * MiB, latency)


def test_forced_split_gives_every_node_a_share_in_proportion_to_its_memory():
    plan = plan_split(18, 10 * MiB, LOCAL, [lender("b", 4096), lender("c", 2048)], force_all=True)
    counts = {p.name: p.layers for p in plan.parts}
    assert sum(counts.values()) == 18 and counts == {"a": 7, "b": 7, "c": 4}
    firsts = [p.first_layer for p in plan.parts]
    assert firsts == [0, 7, 14] and plan.parts[0].local  # this node first, in llama.cpp's order
    # llama.cpp: -ngl counts the lenders' blocks plus the output slot, which the last lender's share takes.
    assert plan.n_gpu_layers == 12 and plan.tensor_split == [7, 5]
    assert plan.parts[1].bytes == 7 * 10 * MiB


def test_equal_memory_splits_evenly():
    plan = plan_split(18, MiB, LOCAL, [lender("b", 4096), lender("c", 4096)], force_all=True)
    assert [p.layers for p in plan.parts] == [6, 6, 6]


def test_unforced_split_keeps_what_fits_here_and_uses_the_fastest_lender_first():
    small = Offer("here", "a", RESERVE_BYTES + 100 * MiB, local=True)  # room for 10 blocks of 10 MiB
    lenders = [lender("slow", 4096, latency=40.0), lender("fast", 4096, latency=2.0)]
    plan = plan_split(18, 10 * MiB, small, lenders)
    assert [(p.name, p.layers) for p in plan.parts] == [("a", 10), ("fast", 8)]
    assert plan.tensor_split == [9]


def test_no_room_or_no_lender_is_a_clear_error():
    with pytest.raises(PlanError, match="no peer"):
        plan_split(18, MiB, LOCAL, [])
    tiny = Offer("here", "a", RESERVE_BYTES, local=True)
    with pytest.raises(PlanError, match="do not fit"):
        plan_split(18, 100 * MiB, tiny, [lender("b", 300)])
    with pytest.raises(PlanError, match="cannot be split"):
        plan_split(1, MiB, LOCAL, [lender("b", 4096)])
