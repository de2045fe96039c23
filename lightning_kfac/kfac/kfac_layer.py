"""KFACLayer: the K-FAC state of one module — adapter, factors ``A`` and ``G``, decompositions.

Capture (DESIGN §2), with ``N`` the batch size and ``s`` the factor by which the backpropagated
loss was multiplied relative to the micro-batch's mean loss (AMP loss scale, 1/accumulation):

- ``A += Σ_{n,t} a_{n,t} a_{n,t}^T`` with normaliser ``N·T``;
- ``g_{n,t} = (N / s) · ∂loss/∂s_{n,t}`` (the per-sample output gradient),
  ``G += Σ_{n,t} g_{n,t} g_{n,t}^T`` with normaliser ``N``.

Over several micro-batches the sums and normalisers add, which equals the factors of the
concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.layers import LayerAdapter
from lightning_kfac.kfac.options import ComputeMethod

T = TypeVar("T")

#: Errors that mean "this decomposition failed", as opposed to a bug.
DECOMPOSITION_ERRORS = (torch.linalg.LinAlgError, FloatingPointError)


class KFACLayer:
    """K-FAC state of one registered module."""

    def __init__(
        self,
        name: str,
        adapter: LayerAdapter,
        factor_dtype: torch.dtype,
        *,
        max_rows: int | None = None,
        seed: int = 0,
    ) -> None:
        self.name = name
        #: Estimate each capture from at most this many rows (None: all rows, exact).
        self.max_rows = max_rows
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.adapter = adapter
        self.a = KroneckerFactor(adapter.a_dim, adapter.blocks, factor_dtype)
        self.g = KroneckerFactor(adapter.out_features, adapter.blocks, factor_dtype)
        self.factor_dtype = factor_dtype
        #: Faults met by the last ``compute_decompositions`` (reported by the preconditioner).
        self.faults: list[str] = []
        #: Output-gradient hooks registered by forward passes that have not fired yet.
        self.pending_gradients = 0

    @property
    def factors(self) -> tuple[KroneckerFactor, KroneckerFactor]:
        return self.a, self.g

    # -- capture (called from module hooks) ------------------------------------------------
    def _sample(self, total: int, device: torch.device) -> tuple[Tensor | None, float]:
        """Row subset for one capture and the factor ``total / kept`` that rescales its sum.

        Rows are drawn uniformly without replacement, so ``(total / R) Σ_sampled r r^T`` is an
        unbiased estimator of ``Σ_all r r^T`` (each row is kept with probability ``R / total``).
        """
        if self.max_rows is None or total <= self.max_rows:
            return None, 1.0
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        index = torch.randperm(total, generator=generator, device=device)[: self.max_rows]
        return index, total / self.max_rows

    def capture(self, layer_input: Tensor, output: Tensor) -> None:
        """``A += Σ a a^T`` over the input's rows (normaliser ``N·T``), from the forward hook."""
        total = self.adapter.row_count(output)
        index, weight = self._sample(total, output.device)
        rows = self.adapter.activation_rows(layer_input.detach().to(self.factor_dtype), index)
        covariance = linalg.covariance_sum(rows, append_ones=self.adapter.has_bias)
        self.a.accumulate(covariance if weight == 1.0 else covariance * weight, float(total))

    def capture_output_gradient(self, output_gradient: Tensor, loss_scale: float | Tensor) -> None:
        """``G += Σ g g^T`` with ``g = (N / s) ∂loss/∂output`` (normaliser ``N``), from backward."""
        batch = self.adapter.batch_size(output_gradient)
        index, weight = self._sample(
            self.adapter.row_count(output_gradient), output_gradient.device
        )
        gradient = output_gradient.detach().to(self.factor_dtype)
        rows = self.adapter.output_gradient_rows(gradient, index)
        scale = (batch / loss_scale) ** 2 * weight
        self.g.accumulate(linalg.covariance_sum(rows, append_ones=False) * scale, float(batch))

    @property
    def has_batch(self) -> bool:
        """Both factors captured something for the coming step."""
        return self.a.has_batch and self.g.has_batch

    def discard_batches(self) -> None:
        for factor in self.factors:
            factor.discard_batch()

    def finalize_batches(self) -> list[Tensor]:
        """Finalise and return the batch estimates ``[A_batch, G_batch]``."""
        return [factor.finalize_batch() for factor in self.factors]

    # -- decompositions --------------------------------------------------------------------
    @property
    def has_factors(self) -> bool:
        return self.a.value is not None and self.g.value is not None

    @property
    def has_decomposition(self) -> bool:
        return self.a.decomposition is not None and self.g.decomposition is not None

    def _with_float64_retry(
        self, compute: Callable[[torch.dtype], T], dtype: torch.dtype
    ) -> T | None:
        """Run ``compute(dtype)``; on failure retry in float64; None if that fails too."""
        try:
            return compute(dtype)
        except DECOMPOSITION_ERRORS as error:
            if dtype == torch.float64:
                self.faults.append(f"failed in float64 ({error})")
                return None
            self.faults.append(f"failed in {dtype} ({error}); retried in float64")
        try:
            return compute(torch.float64)
        except DECOMPOSITION_ERRORS as error:
            self.faults.append(f"failed in float64 too ({error})")
            return None

    def decomposition_shapes(self, method: ComputeMethod) -> list[dict[str, tuple[int, ...]]]:
        """Shapes of the decomposition tensors of ``A`` and ``G`` (to receive them)."""
        shapes = []
        for factor in self.factors:
            square = (factor.blocks, factor.dim, factor.dim)
            if method == ComputeMethod.EIGEN:
                shapes.append({"eigenvalues": square[:2], "eigenvectors": square})
            else:
                shapes.append({"inverse": square})
        return shapes

    def compute_decompositions(
        self, method: ComputeMethod, damping: float, inverse_dtype: torch.dtype
    ) -> None:
        """Decompose both factors; a factor whose decomposition fails gets ``None``.

        Eigen method: ``{"eigenvalues", "eigenvectors"}`` per factor (damping is applied when
        preconditioning). Inverse method: ``{"inverse"}`` with ``(A + π√λ I)^-1`` and
        ``(G + √λ/π I)^-1`` (Martens & Grosse 2015, §6.3).
        """
        self.faults = []
        if not self.has_factors:
            return
        value_a, value_g = self.a.value, self.g.value
        assert value_a is not None and value_g is not None
        if method == ComputeMethod.EIGEN:
            for factor in self.factors:
                value = factor.value
                assert value is not None
                result = self._with_float64_retry(
                    lambda dtype, value=value: linalg.symmetric_eigh(value, dtype), inverse_dtype
                )
                factor.set_decomposition(
                    None
                    if result is None
                    else {"eigenvalues": result[0], "eigenvectors": result[1]}
                )
            return
        pi = linalg.pi_correction(value_a, value_g)
        root = torch.as_tensor(damping, dtype=pi.dtype, device=pi.device).sqrt()
        for factor, shift in ((self.a, pi * root), (self.g, root / pi)):
            value = factor.value
            assert value is not None
            inverse = self._with_float64_retry(
                lambda dtype, value=value, shift=shift: linalg.shifted_inverse(value, shift, dtype),
                inverse_dtype,
            )
            factor.set_decomposition(None if inverse is None else {"inverse": inverse})

    # -- preconditioning -------------------------------------------------------------------
    def precondition(
        self, gradient: Tensor, method: ComputeMethod, damping: float
    ) -> Tensor | None:
        """The preconditioned matrix for ``gradient`` (``[B, d_out, d_a]``), None without a
        decomposition (the caller then keeps the raw gradient)."""
        da, dg = self.a.decomposition, self.g.decomposition
        if da is None or dg is None:
            return None
        # One factor may have been decomposed in float64 after a retry: compute in the wider type.
        dtype = torch.promote_types(next(iter(da.values())).dtype, next(iter(dg.values())).dtype)
        a = {key: value.to(dtype) for key, value in da.items()}
        g = {key: value.to(dtype) for key, value in dg.items()}
        if method == ComputeMethod.EIGEN:
            result = linalg.precondition_eigen(
                gradient.to(dtype),
                a["eigenvalues"],
                a["eigenvectors"],
                g["eigenvalues"],
                g["eigenvectors"],
                damping,
            )
        else:
            result = linalg.precondition_inverse(gradient.to(dtype), a["inverse"], g["inverse"])
        return result.to(gradient.dtype)
