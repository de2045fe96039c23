"""Which rank decomposes which layer: greedy cost balancing (longest processing time first).

The cost of a block is the flop count of its factors' symmetric eigendecompositions,
``Σ_factors B · d³`` (``eigh`` is cubic; a diagonal factor costs nothing). Blocks are taken from
the most to the least expensive and each goes to the currently least-loaded rank (Graham's LPT
rule, at most 4/3 of the optimal makespan). Ties break by block order, so every rank computes the
same assignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_kfac.kfac.blocks import Block


def decomposition_cost(block: Block) -> float:
    """Relative cost of decomposing a block's factors (``eigh`` is cubic; diagonal ones free)."""
    return float(sum(f.blocks * f.dim**3 for f in block.factors if not f.diagonal))


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item, balancing the summed cost per rank (deterministic)."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners
