"""How damped factors are inverted: one class per ``ComputeMethod``.

Both work on the factors of one block — ``[A, G]`` of a Kronecker block, or the one Fisher factor
``F`` of a unit-wise block (treated as ``F ⊗ 1``: a trivial input side) — and on the gradient
matrix ``dW`` ``[B, d_g, d_a]``:

- ``EigenInverse`` (``"eigen"``, default): ``A = Q_A diag(e_A) Q_Aᵀ``, ``G = Q_G diag(e_G) Q_Gᵀ``,
  ``P = Q_G [(Q_Gᵀ dW Q_A) / (e_G e_Aᵀ + λ)] Q_Aᵀ`` — the exact inverse of ``A ⊗ G + λ I``
  (George et al. 2018; Osawa et al. 2019). The decomposition does not depend on ``λ``: the damping
  of the current step is used when preconditioning.
- ``TikhonovInverse`` (``"inverse"``): factored Tikhonov damping with the π correction of Martens &
  Grosse 2015, §6.3: ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` (``(F + λ I)⁻¹`` for a unit-wise block).
  ``λ`` is baked into the inverses when they are computed, so the damping a step uses is the one
  of its decompositions (``damping_in_use``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.options import ComputeMethod

#: The decomposition tensors of one factor, by name.
Decomposition = dict[str, Tensor]


class FactorInverse(abc.ABC):
    """Decomposes factors and preconditions gradients with them."""

    method: ClassVar[ComputeMethod]
    #: Whether ``λ`` is part of the decompositions (then a step preconditions with the damping of
    #: its decompositions, not the current one).
    damping_in_decomposition: ClassVar[bool]

    def shifts(self, factors: Sequence[KroneckerFactor], damping: float) -> list[Tensor | None]:
        """Per-factor diagonal shifts ``[blocks]`` added before decomposing (None: none)."""
        return [None] * len(factors)

    @abc.abstractmethod
    def decompose(self, value: Tensor, shift: Tensor | None, dtype: torch.dtype) -> Decomposition:
        """Decomposition of a stack of dense factors ``[B, d, d]`` in ``dtype``. Raises
        ``torch.linalg.LinAlgError`` when it fails."""

    @abc.abstractmethod
    def decompose_diagonal(
        self, value: Tensor, shift: Tensor | None, dtype: torch.dtype
    ) -> Decomposition:
        """Decomposition of a diagonal factor ``[B, d]``."""

    @abc.abstractmethod
    def decomposition_shapes(self, factor: KroneckerFactor) -> dict[str, tuple[int, ...]]:
        """Shapes of ``factor``'s decomposition tensors (to receive them from another rank)."""

    @abc.abstractmethod
    def precondition(
        self, gradient: Tensor, decompositions: Sequence[Decomposition], damping: float
    ) -> Tensor:
        """``P`` for the block's gradient matrix (decompositions in the gradient's dtype)."""


class EigenInverse(FactorInverse):
    method = ComputeMethod.EIGEN
    damping_in_decomposition = False

    def decompose(self, value: Tensor, shift: Tensor | None, dtype: torch.dtype) -> Decomposition:
        eigenvalues, eigenvectors = linalg.symmetric_eigh(value, dtype)
        return {"eigenvalues": eigenvalues, "eigenvectors": eigenvectors}

    def decompose_diagonal(
        self, value: Tensor, shift: Tensor | None, dtype: torch.dtype
    ) -> Decomposition:
        return {"eigenvalues": value.to(dtype).clamp_min(0)}

    def decomposition_shapes(self, factor: KroneckerFactor) -> dict[str, tuple[int, ...]]:
        shapes = {"eigenvalues": (factor.blocks, factor.dim)}
        if not factor.diagonal:
            shapes["eigenvectors"] = (factor.blocks, factor.dim, factor.dim)
        return shapes

    def precondition(
        self, gradient: Tensor, decompositions: Sequence[Decomposition], damping: float
    ) -> Tensor:
        if len(decompositions) == 1:  # unit-wise: F ⊗ 1
            (f,) = decompositions
            ones = torch.ones(gradient.shape[0], 1, dtype=gradient.dtype, device=gradient.device)
            return linalg.precondition_eigen(
                gradient, ones, None, f["eigenvalues"], f.get("eigenvectors"), damping
            )
        a, g = decompositions
        return linalg.precondition_eigen(
            gradient, a["eigenvalues"], a.get("eigenvectors"), g["eigenvalues"],
            g.get("eigenvectors"), damping,
        )  # fmt: skip


class TikhonovInverse(FactorInverse):
    method = ComputeMethod.INVERSE
    damping_in_decomposition = True

    def shifts(self, factors: Sequence[KroneckerFactor], damping: float) -> list[Tensor | None]:
        first = factors[0]
        assert first.value is not None
        device = first.value.device
        if len(factors) == 1:
            return [torch.full((first.blocks,), damping, dtype=torch.float64, device=device)]
        a, g = factors
        assert a.value is not None and g.value is not None
        root = torch.as_tensor(damping, dtype=torch.float64, device=device).sqrt()
        pi = linalg.pi_correction(
            linalg.mean_diagonal(a.value, diagonal=a.diagonal).to(torch.float64),
            linalg.mean_diagonal(g.value, diagonal=g.diagonal).to(torch.float64),
        )
        return [pi * root, root / pi]

    def decompose(self, value: Tensor, shift: Tensor | None, dtype: torch.dtype) -> Decomposition:
        assert shift is not None
        return {"inverse": linalg.shifted_inverse(value, shift, dtype)}

    def decompose_diagonal(
        self, value: Tensor, shift: Tensor | None, dtype: torch.dtype
    ) -> Decomposition:
        assert shift is not None
        return {"inverse": linalg.shifted_inverse_diagonal(value.clamp_min(0), shift, dtype)}

    def decomposition_shapes(self, factor: KroneckerFactor) -> dict[str, tuple[int, ...]]:
        return {"inverse": factor.shape}

    def precondition(
        self, gradient: Tensor, decompositions: Sequence[Decomposition], damping: float
    ) -> Tensor:
        if len(decompositions) == 1:
            return decompositions[0]["inverse"] @ gradient
        a, g = decompositions
        return linalg.precondition_inverse(gradient, a["inverse"], g["inverse"])


_INVERSES: dict[ComputeMethod, type[FactorInverse]] = {
    ComputeMethod.EIGEN: EigenInverse,
    ComputeMethod.INVERSE: TikhonovInverse,
}


def factor_inverse(method: ComputeMethod | str) -> FactorInverse:
    """The ``FactorInverse`` of a ``compute_method``."""
    return _INVERSES[ComputeMethod(method)]()
