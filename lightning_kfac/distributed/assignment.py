"""Which rank decomposes which layer: greedy cost balancing (longest processing time first).

The cost of a layer is the flop count of its two symmetric eigendecompositions,
``blocks · (d_A³ + d_G³)`` (``eigh`` is cubic). Layers are taken from the most to the least
expensive and each goes to the currently least-loaded rank (Graham's LPT rule, at most 4/3 of the
optimal makespan). Ties break by layer order, so every rank computes the same assignment.
"""

from __future__ import annotations

from collections.abc import Sequence


def decomposition_cost(blocks: int, a_dim: int, g_dim: int) -> float:
    """Relative cost of eigendecomposing one layer's ``A`` and ``G``."""
    return float(blocks) * (a_dim**3 + g_dim**3)


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
