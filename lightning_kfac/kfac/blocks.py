"""Block: the curvature of one use — its factors, their decompositions, its preconditioned step.

A block is created once the structure is fixed (``structure.Structure``), with its final name,
the routes of its gradient (``alias_parts``) and the ``UseSums`` its calls fill (``capture``).
Per step (``preconditioner``): the distributor takes its sums (``take_sums``) and the factors fold
them in (``KroneckerFactor.update``), decompositions are computed by the ``FactorInverse`` of the
``compute_method`` (``decomposition``), and ``precondition`` maps the use's gradient matrix
``dW`` ``[B, d_g, d_a]`` to ``P``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kfac.kfac.accumulation import UseSums
from lightning_kfac.kfac.compute import FactorInverse
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.kinds import UseModel
from lightning_kfac.kfac.uses import UseSpec


class Block:
    """K-FAC state of one use.

    Args:
        name: Display name (unique, the same on every rank).
        spec: The use.
        model: Its ``UseModel``.
        sums: The ``UseSums`` its calls fill.
        factor_dtype: Dtype of the factors.
        alias_parts: ``"weight"``/``"bias"``: parts whose parameter has several overlapping uses,
            so this use's own gradient is collected separately (``UseSums.use_gradients``).
        factors: The factors to continue from (a block rebuilt when the structure changes);
            default fresh ones.
    """

    def __init__(
        self,
        name: str,
        spec: UseSpec,
        model: UseModel,
        sums: UseSums,
        factor_dtype: torch.dtype,
        *,
        alias_parts: frozenset[str] = frozenset(),
        factors: Sequence[KroneckerFactor] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.model = model
        self.sums = sums
        self.factor_dtype = factor_dtype
        self.alias_parts = alias_parts
        self.factors = (
            list(factors)
            if factors is not None
            else [
                KroneckerFactor(
                    side.dim,
                    side.blocks,
                    factor_dtype,
                    diagonal=side.diagonal,
                    per_block_count=side.per_block_count,
                )
                for side in model.factor_sides
            ]
        )

    @property
    def a(self) -> KroneckerFactor:
        """The input-side factor of a Kronecker block."""
        if self.unit_wise:
            raise AttributeError(
                f"{self.name} is a unit-wise block: it has one factor, not A and G"
            )
        return self.factors[0]

    @property
    def g(self) -> KroneckerFactor:
        """The output-side factor of a Kronecker block (the Fisher block of a unit-wise one)."""
        return self.factors[-1]

    @property
    def unit_wise(self) -> bool:
        return len(self.factors) == 1

    @property
    def needs_use_gradients(self) -> bool:
        return bool(self.alias_parts)

    @property
    def side_names(self) -> tuple[str, ...]:
        return ("F",) if self.unit_wise else ("A", "G")

    # -- the step's sums ---------------------------------------------------------------------
    @property
    def has_sums(self) -> bool:
        return self.sums.has_sums

    def take_sums(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Each factor's ``(Σ, count)`` of this step (zeros and 0 if nothing was captured)."""
        return self.sums.take(device)

    def discard_sums(self) -> None:
        self.sums.discard()

    # -- state -------------------------------------------------------------------------------
    @property
    def has_factors(self) -> bool:
        return all(factor.value is not None for factor in self.factors)

    @property
    def has_decomposition(self) -> bool:
        return all(factor.decomposition is not None for factor in self.factors)

    @property
    def ok_shape(self) -> tuple[int, ...]:
        """Shape of ``seen()`` and of ``precondition``'s ``ok``: ``(blocks, 1, 1)`` when a factor
        counts per block (each block falls back alone), else ``()``."""
        per_block = any(factor.per_block_count for factor in self.factors)
        return (self.factors[0].blocks, 1, 1) if per_block else ()

    def seen(self) -> Tensor:
        """Bool (device, ``ok_shape``): every factor holds an accepted batch."""
        shape = self.ok_shape
        out: Tensor | None = None
        for factor in self.factors:
            assert factor.seen is not None
            flag = factor.seen.reshape(shape) if factor.seen.dim() else factor.seen
            out = flag if out is None else out & flag
        assert out is not None
        return out

    # -- preconditioning ---------------------------------------------------------------------
    def precondition(
        self, gradient: Tensor, inverse: FactorInverse, damping: float
    ) -> tuple[Tensor, Tensor] | None:
        """``(P, ok)``: the preconditioned matrix and a bool (device, ``ok_shape``) saying it may
        be used (factors seen, result finite); None without a decomposition (keep the raw
        gradient)."""
        if not self.has_decomposition:
            return None
        decompositions = [factor.decomposition for factor in self.factors]
        dtype = gradient.dtype
        for decomposition in decompositions:
            assert decomposition is not None
            for tensor in decomposition.values():
                dtype = torch.promote_types(dtype, tensor.dtype)
        grad = gradient if gradient.dtype == dtype else gradient.to(dtype)
        parts = [
            d
            if all(v.dtype == dtype for v in d.values())
            else {k: v.to(dtype) for k, v in d.items()}
            for d in decompositions  # type: ignore[union-attr]
        ]
        result = inverse.precondition(grad, parts, damping)
        if result.dtype != gradient.dtype:
            result = result.to(gradient.dtype)
        ok = self.seen() & torch.isfinite(result).all()
        return result, ok
