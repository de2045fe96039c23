"""Decompositions of many factors at once: same-shaped factors share one batched call.

Eigen method: every dense factor of side ``d`` (in the same dtype and device) is stacked into one
``[Σ blocks, d, d]`` tensor and decomposed by one ``torch.linalg.eigh`` call (one kernel launch and
one convergence check instead of one per factor); a diagonal factor's eigenvalues are its diagonal.
Inverse method: the same grouping for the Cholesky inverses of ``F + shift·I``, with the shifts of
Martens & Grosse 2015 §6.3 (``π√λ`` for ``A``, ``√λ/π`` for ``G``, ``λ`` for a unit-wise block).

When a batched call fails to converge, each factor of the group is retried alone, in the
decomposition dtype and then in float64; a factor that fails even then has no decomposition and
its block keeps the raw gradient (reported by the preconditioner).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.options import ComputeMethod

#: Errors that mean "this decomposition failed", as opposed to a bug.
DECOMPOSITION_ERRORS = (torch.linalg.LinAlgError, FloatingPointError)


def decompose_blocks(
    blocks: Sequence[Block], method: ComputeMethod, damping: float, dtype: torch.dtype
) -> None:
    """Set the decomposition of every factor of ``blocks`` (batched by shape)."""
    for block in blocks:
        block.faults = []
    jobs: list[tuple[Block, KroneckerFactor, Tensor | None]] = []
    for block in blocks:
        shifts = _shifts(block, method, damping)
        for factor, shift in zip(block.factors, shifts, strict=True):
            jobs.append((block, factor, shift))
    dense: dict[
        tuple[int, torch.dtype, torch.device], list[tuple[Block, KroneckerFactor, Tensor | None]]
    ] = {}
    for block, factor, shift in jobs:
        assert factor.value is not None
        if factor.diagonal:
            _decompose_diagonal(factor, shift, method, dtype)
        else:
            key = (factor.dim, factor.value.dtype, factor.value.device)
            dense.setdefault(key, []).append((block, factor, shift))
    for group in dense.values():
        _decompose_group(group, method, dtype)


def _shifts(block: Block, method: ComputeMethod, damping: float) -> list[Tensor | None]:
    """Per-factor shifts ``[blocks]`` of the inverse method (None for the eigen method)."""
    if method == ComputeMethod.EIGEN:
        return [None] * len(block.factors)
    (first, *_) = block.factors
    assert first.value is not None
    root = torch.as_tensor(damping, dtype=torch.float64, device=first.value.device).sqrt()
    if block.unit_wise:
        return [
            torch.full((first.blocks,), damping, dtype=torch.float64, device=first.value.device)
        ]
    a, g = block.factors
    assert a.value is not None and g.value is not None
    pi = linalg.pi_correction(
        linalg.mean_diagonal(a.value, diagonal=a.diagonal).to(torch.float64),
        linalg.mean_diagonal(g.value, diagonal=g.diagonal).to(torch.float64),
    )
    return [pi * root, root / pi]


def _decompose_diagonal(
    factor: KroneckerFactor, shift: Tensor | None, method: ComputeMethod, dtype: torch.dtype
) -> None:
    assert factor.value is not None
    if method == ComputeMethod.EIGEN:
        factor.set_decomposition({"eigenvalues": factor.value.to(dtype).clamp_min(0)})
    else:
        assert shift is not None
        inverse = linalg.shifted_inverse_diagonal(factor.value.clamp_min(0), shift, dtype)
        factor.set_decomposition({"inverse": inverse})


def _compute(
    method: ComputeMethod,
) -> Callable[[Tensor, Tensor | None, torch.dtype], dict[str, Tensor]]:
    if method == ComputeMethod.EIGEN:

        def eigen(value: Tensor, shift: Tensor | None, dtype: torch.dtype) -> dict[str, Tensor]:
            eigenvalues, eigenvectors = linalg.symmetric_eigh(value, dtype)
            return {"eigenvalues": eigenvalues, "eigenvectors": eigenvectors}

        return eigen

    def inverse(value: Tensor, shift: Tensor | None, dtype: torch.dtype) -> dict[str, Tensor]:
        assert shift is not None
        return {"inverse": linalg.shifted_inverse(value, shift, dtype)}

    return inverse


def _decompose_group(
    group: list[tuple[Block, KroneckerFactor, Tensor | None]],
    method: ComputeMethod,
    dtype: torch.dtype,
) -> None:
    compute = _compute(method)
    values = [factor.value for _, factor, _ in group]
    shifts = [shift for _, _, shift in group]
    try:
        stacked = values[0] if len(values) == 1 else torch.cat(values, dim=0)  # type: ignore[arg-type]
        shift = None if shifts[0] is None else torch.cat(shifts)  # type: ignore[arg-type]
        result = compute(stacked, shift, dtype)  # type: ignore[arg-type]
    except DECOMPOSITION_ERRORS:
        for block, factor, one_shift in group:
            _decompose_alone(block, factor, one_shift, compute, dtype)
        return
    offset = 0
    for _, factor, _ in group:
        count = factor.blocks
        factor.set_decomposition(
            {name: tensor[offset : offset + count] for name, tensor in result.items()}
        )
        offset += count


def _decompose_alone(
    block: Block,
    factor: KroneckerFactor,
    shift: Tensor | None,
    compute: Callable[[Tensor, Tensor | None, torch.dtype], dict[str, Tensor]],
    dtype: torch.dtype,
) -> None:
    assert factor.value is not None
    for attempt in (dtype, torch.float64) if dtype != torch.float64 else (dtype,):
        try:
            factor.set_decomposition(compute(factor.value, shift, attempt))
            if attempt != dtype:
                block.faults.append(f"failed in {dtype}; retried in float64")
            return
        except DECOMPOSITION_ERRORS as error:
            last = error
    block.faults.append(f"failed in float64 too ({last})")
    factor.set_decomposition(None)
