"""Block: the K-FAC state of one use — its factors, its capture, its preconditioned gradient.

Capture (docs/design.md §2), with ``N`` the number of samples of the micro-batch (the forward's
batch size) and ``s`` the factor by which the backpropagated loss was multiplied relative to the
micro-batch's mean loss (AMP loss scale, 1/accumulation):

- expand (default): each call adds ``Σ_{n,t} a a^T`` with normaliser ``N·T`` to ``A``, and
  ``Σ_{n,t} g g^T`` with ``g = (N/s)·∂loss/∂s`` to ``G``, whose normaliser grows by ``N`` once per
  forward — so the ``T_c`` calls of a looped layer give exactly the factors of one call on the
  concatenated ``(N, ΣT_c, d)`` input;
- reduce: per-sample sums over all positions of all calls of the forward, then one outer product
  per sample (normaliser ``N``);
- unit-wise (norms): per-sample ``(γ, β)`` gradients summed over all positions of all calls, then
  ``Σ_n u uᵀ`` (normaliser ``N``).

A call's ``A`` contribution is committed together with its ``G`` contribution, when the gradient
of its output arrives: a call whose output never receives a gradient (an output outside the loss,
the forward that non-reentrant activation checkpointing re-runs during backward) contributes
nothing. Over several micro-batches sums and normalisers add (the factors of the concatenated
batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.options import ComputeMethod, KFACApproximation
from lightning_kfac.kfac.uses import KroneckerModel, NormModel, UseModel, UseSpec


@dataclasses.dataclass
class PendingCall:
    """What a call captured in the forward, waiting for its output gradient."""

    forward_id: int
    batch_size: int
    batch_dim: int
    a_statistic: Tensor | None = None
    a_count: float = 0.0
    a_sums: Tensor | None = None
    positions: int = 0
    layer_input: Tensor | None = None
    normalize: Callable[[Tensor], Tensor] | None = None


@dataclasses.dataclass
class _SampleSums:
    """Per-sample sums of the calls of one forward (reduce and unit-wise blocks).

    Each call adds ``(a_sums, positions, g_sums)``; ``g_sums`` holds the call's samples along
    ``sample_axis``. Calls over all ``N`` samples of the forward (weight sharing) are summed per
    sample; calls over fewer samples (disjoint sub-batches, e.g. ghost batch norm or a batch
    processed in chunks) contribute their samples side by side.
    """

    batch_size: int
    calls: list[tuple[Tensor | None, int, Tensor]] = dataclasses.field(default_factory=list)
    open_calls: int = 0


class Block:
    """K-FAC state of one use.

    Args:
        name: Display name (unique, the same on every rank).
        spec: The use.
        model: Its ``UseModel``.
        factor_dtype: Dtype of the factors.
        approximation: Expand or reduce for weight-shared Kronecker uses.
        max_rows: Estimate each capture from at most this many rows (None: exact).
        seed: Seed of the row-sampling generator.
        batch_dim: Dimension of the call's input that indexes samples, when known from the
            model's structure (``batch_first``); otherwise found by size at each call.
    """

    def __init__(
        self,
        name: str,
        spec: UseSpec,
        model: UseModel,
        factor_dtype: torch.dtype,
        *,
        approximation: KFACApproximation = KFACApproximation.EXPAND,
        max_rows: int | None = None,
        seed: int = 0,
        batch_dim: int | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.model = model
        self.factor_dtype = factor_dtype
        self.factors = [
            KroneckerFactor(dim, blocks, factor_dtype, diagonal=diagonal)
            for dim, blocks, diagonal in model.factor_sides
        ]
        self.per_sample = isinstance(model, NormModel) or (
            approximation == KFACApproximation.REDUCE
            and isinstance(model, KroneckerModel)
            and model.supports_reduce()
        )
        self.max_rows = max_rows
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}
        self.batch_dim_hint = batch_dim
        #: Calls whose output gradient has not arrived yet.
        self.open_calls = 0
        self._counted_forwards: set[int] = set()
        self._sample_sums: dict[int, _SampleSums] = {}
        #: Per-use gradients of the passed weight/bias (when its parameters have several uses).
        self.use_gradients: dict[str, Tensor] = {}
        #: ``"weight"``/``"bias"``: parts whose parameter has several overlapping uses, so this
        #: use's gradient is collected through an alias tensor (set by the structure).
        self.alias_parts: set[str] = set()
        #: Faults of the last decomposition (reported by the preconditioner).
        self.faults: list[str] = []
        #: A forward mixed calls over all samples with calls over sub-batches (per-sample sums
        #: then cannot be aligned; samples are taken side by side and the user is told once).
        self.mixed_sample_calls = False

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
    def needs_use_gradients(self) -> bool:
        return bool(self.alias_parts)

    @property
    def unit_wise(self) -> bool:
        return len(self.factors) == 1

    # -- row sampling --------------------------------------------------------------------
    def _sample(self, total: int, device: torch.device) -> tuple[Tensor | None, float]:
        """Row subset for one capture and the factor ``total / kept`` that rescales its sum.

        Rows are drawn uniformly without replacement, so ``(total / R) Σ_sampled r r^T`` is an
        unbiased estimator of ``Σ_all r r^T``.
        """
        if self.max_rows is None or total <= self.max_rows:
            return None, 1.0
        key = str(device)
        generator = self.generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self.generators[key] = generator
        index = torch.randperm(total, generator=generator, device=device)[: self.max_rows]
        return index, total / self.max_rows

    def _batch_dim(self, tensor: Tensor, batch_size: int) -> int:
        # A 2-D tensor is (rows, features): its samples lie along dim 0, possibly flattened with
        # positions (see LinearModel._samples; hint 1: position-major).
        if self.batch_dim_hint is not None and tensor.dim() > self.batch_dim_hint:
            return self.batch_dim_hint
        if tensor.dim() >= 3 and tensor.shape[0] != batch_size and tensor.shape[1] == batch_size:
            return 1
        return 0

    # -- capture -------------------------------------------------------------------------
    def begin_call(
        self, layer_input: Tensor, forward_id: int, batch_size: int, call: Any
    ) -> PendingCall:
        """Forward half of a call: the input side (computed now, committed with the gradient)."""
        x = layer_input.detach()
        pending = PendingCall(forward_id, batch_size, self._batch_dim(x, batch_size))
        model = self.model
        if isinstance(model, NormModel):
            pending.layer_input = x
            pending.normalize = call.normalize
        elif self.per_sample:
            assert isinstance(model, KroneckerModel)
            sums, positions = model.a_sample_sums(
                x.to(self.factor_dtype), pending.batch_dim, batch_size
            )
            pending.a_sums, pending.positions = sums, positions
        else:
            assert isinstance(model, KroneckerModel)
            total = model.row_count(x)
            index, weight = self._sample(total, x.device)
            source = x if x.dtype in (torch.int64, torch.int32) else x.to(self.factor_dtype)
            statistic = model.a_statistic(source, index).to(self.factor_dtype)
            pending.a_statistic = statistic if weight == 1.0 else statistic * weight
            pending.a_count = float(total)
        self.open_calls += 1
        if self.per_sample:
            sums = self._sample_sums.setdefault(forward_id, _SampleSums(batch_size))
            sums.open_calls += 1
        return pending

    def end_call(
        self, pending: PendingCall, output_gradient: Tensor, loss_scale: float | Tensor
    ) -> None:
        """Backward half: the output side, and the commit of both sides."""
        self.open_calls -= 1
        gradient = output_gradient.detach().to(self.factor_dtype)
        scale = pending.batch_size / loss_scale  # g = (N / s) ∂loss/∂s
        model = self.model
        if self.per_sample:
            sums = self._sample_sums[pending.forward_id]
            sums.open_calls -= 1
            if isinstance(model, NormModel):
                assert pending.layer_input is not None and pending.normalize is not None
                with torch.no_grad():
                    x_hat = pending.normalize(pending.layer_input.to(self.factor_dtype))
                sample = model.sample_gradients(x_hat, gradient, pending.batch_dim) * scale
                sums.calls.append((None, 0, sample))
            else:
                assert isinstance(model, KroneckerModel) and pending.a_sums is not None
                sample = (
                    model.g_sample_sums(gradient, pending.batch_dim, pending.batch_size) * scale
                )
                sums.calls.append((pending.a_sums, pending.positions, sample))
            if sums.open_calls == 0:
                self._commit_sample_sums(pending.forward_id)
            return
        assert isinstance(model, KroneckerModel) and pending.a_statistic is not None
        index, weight = self._sample(_rows_of(model, gradient), gradient.device)
        g_statistic = model.g_statistic(gradient, index) * (scale**2 * weight)
        a_factor, g_factor = self.factors
        a_factor.accumulate(pending.a_statistic, pending.a_count)
        first = pending.forward_id not in self._counted_forwards
        self._counted_forwards.add(pending.forward_id)
        g_factor.accumulate(g_statistic, float(pending.batch_size) if first else 0.0)

    def _commit_sample_sums(self, forward_id: int) -> None:
        sums = self._sample_sums.pop(forward_id)
        if not sums.calls:
            return
        unit_wise = isinstance(self.model, NormModel)
        axis = 0 if unit_wise else 1  # u: [N, C, k]; reduce sums: [B, N, d]
        sizes = [g.shape[axis] for _, _, g in sums.calls]
        if all(size == sums.batch_size for size in sizes):  # positions of the same samples
            a_total = None if unit_wise else sum(a for a, _, _ in sums.calls)  # type: ignore[misc]
            positions = sum(p for _, p, _ in sums.calls)
            g_samples = sum(g for _, _, g in sums.calls)
            a_means = None if unit_wise else a_total / max(positions, 1)  # type: ignore[operator]
        else:  # disjoint sub-batches: their samples side by side
            self.mixed_sample_calls |= any(size == sums.batch_size for size in sizes)
            g_samples = torch.cat([g for _, _, g in sums.calls], dim=axis)
            a_means = (
                None if unit_wise else torch.cat([a / max(p, 1) for a, p, _ in sums.calls], dim=1)  # type: ignore[operator]
            )
        assert isinstance(g_samples, Tensor)
        samples = float(g_samples.shape[axis])
        if unit_wise:
            u = g_samples.transpose(0, 1)  # [C, N, k]
            self.factors[0].accumulate(u.mT @ u, samples)
            return
        assert a_means is not None and isinstance(self.model, KroneckerModel)
        a_factor, g_factor = self.factors
        model = self.model
        a_factor.accumulate(
            linalg.factor_sum(a_means, diagonal=model.a_diagonal, append_ones=model.has_bias),
            samples,
        )
        g_factor.accumulate(
            linalg.factor_sum(g_samples, diagonal=model.g_diagonal, append_ones=False), samples
        )

    def finish_capture(self) -> None:
        """Commit per-sample sums whose forward still has calls without a gradient."""
        for forward_id in list(self._sample_sums):
            self._commit_sample_sums(forward_id)
        self.open_calls = 0
        self._counted_forwards.clear()

    @property
    def has_sums(self) -> bool:
        return all(factor.has_sum for factor in self.factors)

    def discard_capture(self) -> None:
        self._sample_sums.clear()
        self._counted_forwards.clear()
        self.open_calls = 0
        for factor in self.factors:
            factor.discard_sum()

    # -- state ---------------------------------------------------------------------------
    @property
    def has_factors(self) -> bool:
        return all(factor.value is not None for factor in self.factors)

    @property
    def has_decomposition(self) -> bool:
        return all(factor.decomposition is not None for factor in self.factors)

    def seen(self) -> Tensor:
        """0-dim bool (device): every factor holds an accepted batch."""
        flags = [factor.seen for factor in self.factors]
        out = flags[0]
        for flag in flags[1:]:
            out = out & flag  # type: ignore[operator]
        assert out is not None
        return out

    def decomposition_shapes(self, method: ComputeMethod) -> list[dict[str, tuple[int, ...]]]:
        """Shapes of each factor's decomposition tensors (to receive them)."""
        shapes = []
        for factor in self.factors:
            if method == ComputeMethod.EIGEN:
                entry = {"eigenvalues": (factor.blocks, factor.dim)}
                if not factor.diagonal:
                    entry["eigenvectors"] = (factor.blocks, factor.dim, factor.dim)
            else:
                entry = {"inverse": factor.shape}
            shapes.append(entry)
        return shapes

    # -- preconditioning ------------------------------------------------------------------
    def precondition(
        self, gradient: Tensor, method: ComputeMethod, damping: float
    ) -> tuple[Tensor, Tensor] | None:
        """``(P, ok)``: the preconditioned matrix and a 0-dim bool (device) saying it may be used
        (factors seen, result finite); None without a decomposition (keep the raw gradient)."""
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
        if self.unit_wise:
            (f,) = parts
            if method == ComputeMethod.EIGEN:
                ones = torch.ones(grad.shape[0], 1, dtype=dtype, device=grad.device)
                result = linalg.precondition_eigen(
                    grad, ones, None, f["eigenvalues"], f.get("eigenvectors"), damping
                )
            else:
                result = f["inverse"] @ grad
        else:
            a, g = parts
            if method == ComputeMethod.EIGEN:
                result = linalg.precondition_eigen(
                    grad, a["eigenvalues"], a.get("eigenvectors"), g["eigenvalues"],
                    g.get("eigenvectors"), damping,
                )  # fmt: skip
            else:
                result = linalg.precondition_inverse(grad, a["inverse"], g["inverse"])
        if result.dtype != gradient.dtype:
            result = result.to(gradient.dtype)
        ok = self.seen() & torch.isfinite(result).all()
        return result, ok


def _rows_of(model: KroneckerModel, gradient: Tensor) -> int:
    """Number of output-gradient rows of a call (``N·T``)."""
    return gradient.numel() // (model.blocks * model.out_features)
