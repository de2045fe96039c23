"""Decompositions of many factors at once: same-shaped factors share one batched call.

Eigen method: every dense factor of side ``d`` (in the same dtype and device) is stacked into one
``[Σ blocks, d, d]`` tensor and decomposed by one ``torch.linalg.eigh`` call (one kernel launch and
one convergence check instead of one per factor); a diagonal factor's eigenvalues are its diagonal.
Inverse method: the same grouping for the Cholesky inverses of ``F + shift·I``, with the shifts of
Martens & Grosse 2015 §6.3 (``π√λ`` for ``A``, ``√λ/π`` for ``G``, ``λ`` for a unit-wise block).

When a batched call fails to converge, each factor of the group is retried alone, in the
decomposition dtype and then in float64; a factor that fails even then has no decomposition and
its block keeps the raw gradient. What went wrong is returned per block, for the preconditioner
to report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.compute import FactorInverse
from lightning_kfac.kfac.factors import KroneckerFactor

#: Errors that mean "this decomposition failed", as opposed to a bug.
DECOMPOSITION_ERRORS = (torch.linalg.LinAlgError, FloatingPointError)

#: One factor to decompose: its block's name (for fault notes), the factor, its shift.
Job = tuple[str, KroneckerFactor, Tensor | None]

#: Block name -> what went wrong decomposing its factors.
Faults = dict[str, list[str]]


def decompose_blocks(
    blocks: Sequence[Block], inverse: FactorInverse, damping: float, dtype: torch.dtype
) -> Faults:
    """Set the decomposition of every factor of ``blocks`` (batched by shape); the faults."""
    dense: dict[tuple[int, torch.dtype, torch.device], list[Job]] = {}
    faults: Faults = {}
    for block in blocks:
        for factor, shift in zip(
            block.factors, inverse.shifts(block.factors, damping), strict=True
        ):
            assert factor.value is not None
            if factor.diagonal:
                factor.set_decomposition(inverse.decompose_diagonal(factor.value, shift, dtype))
            else:
                key = (factor.dim, factor.value.dtype, factor.value.device)
                dense.setdefault(key, []).append((block.name, factor, shift))
    for group in dense.values():
        _decompose_group(group, inverse, dtype, faults)
    return faults


def _decompose_group(
    group: list[Job], inverse: FactorInverse, dtype: torch.dtype, faults: Faults
) -> None:
    values = [factor.value for _, factor, _ in group]
    shifts = [shift for _, _, shift in group]
    try:
        stacked = values[0] if len(values) == 1 else torch.cat(values, dim=0)  # type: ignore[arg-type]
        shift = None if shifts[0] is None else torch.cat(shifts)  # type: ignore[arg-type]
        result = inverse.decompose(stacked, shift, dtype)  # type: ignore[arg-type]
    except DECOMPOSITION_ERRORS:
        for job in group:
            _decompose_alone(job, inverse, dtype, faults)
        return
    offset = 0
    for _, factor, _ in group:
        count = factor.blocks
        factor.set_decomposition(
            {name: tensor[offset : offset + count] for name, tensor in result.items()}
        )
        offset += count


def _decompose_alone(job: Job, inverse: FactorInverse, dtype: torch.dtype, faults: Faults) -> None:
    name, factor, shift = job
    assert factor.value is not None
    for attempt in (dtype, torch.float64) if dtype != torch.float64 else (dtype,):
        try:
            factor.set_decomposition(inverse.decompose(factor.value, shift, attempt))
            if attempt != dtype:
                faults.setdefault(name, []).append(f"failed in {dtype}; retried in float64")
            return
        except DECOMPOSITION_ERRORS as error:
            last = error
    faults.setdefault(name, []).append(f"failed in float64 too ({last})")
    factor.set_decomposition(None)
