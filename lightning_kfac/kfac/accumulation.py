"""Stage 1 of K-FAC's factors: the calls of a step become sums of outer products and counts.

``UseSums`` holds, for one use, the step's sum and normaliser of each factor side, filled by the
use's calls through one of two capture rules (docs/design.md §2-3), with ``N`` the number of
samples of the micro-batch (the forward's batch size) and ``s`` the factor by which the
backpropagated loss was multiplied relative to the micro-batch's mean loss (AMP loss scale,
1/accumulation):

- **expand** (Kronecker kinds, the default): each call adds ``Σ_{n,t} a aᵀ`` with normaliser
  ``N·T`` to ``A``, and ``Σ_{n,t} g gᵀ`` with ``g = (N/s)·∂loss/∂s`` to ``G``, whose normaliser
  grows by ``N`` once per forward — so the ``T_c`` calls of a looped layer give exactly the
  factors of one call on the concatenated ``(N, ΣT_c, d)`` input;
- **per sample** (unit-wise kinds, and Kronecker kinds under ``approximation="reduce"``): each
  call gives per-sample sums over its positions (``UseModel.begin_samples/end_samples``); the
  calls of one forward are summed per sample, then each factor adds one outer product per sample
  (normaliser ``N``).

A call's input is kept (a detached reference to what autograd saves for the weight's gradient
anyway) and committed together with its output gradient: a call whose output never receives a
gradient (an output outside the loss, the forward that non-reentrant activation checkpointing
re-runs during backward) contributes nothing. Under the expand rule the answered calls of a use
are committed together once none is waiting: one call as it is, several (a recurrent layer's
time steps, a looped layer) as one covariance over all their rows — the same sums, one large
GEMM instead of many small ones (a 2-layer LSTM over 64 steps: 2 calls instead of 256). Over
several micro-batches sums and normalisers add (the factors of the concatenated batch). The kinds
only convert their calls into rows; the sums are formed here and in ``linalg``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.kfac.calls import RecognizedCall
from lightning_kfac.kfac.kinds import KroneckerModel, UseModel
from lightning_kfac.kfac.options import KFACApproximation


class SideSum:
    """The step's ``Σ r rᵀ`` (or its diagonal) of one factor side and its normaliser (one per
    block when ``count_shape`` is ``(blocks,)``)."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, count_shape: tuple[int, ...] = ()
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        self.count_shape = count_shape
        self._sum: Tensor | None = None
        self._count: float | Tensor = 0.0

    def add(self, total: Tensor, count: float | Tensor) -> None:
        """Add ``Σ r rᵀ`` (or its diagonal) over ``count`` normalising units."""
        total = total.to(self.dtype)
        if self._sum is None:
            self._sum = total.clone()
        else:
            self._sum.add_(total)
        self._count = self._count + count

    @property
    def has_sum(self) -> bool:
        """Whether anything was added since the last ``take``."""
        return self._sum is not None

    def discard(self) -> None:
        self._sum = None
        self._count = 0.0

    def take(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(Σ, count)`` of this step (zeros and count 0 when nothing was captured here); resets.

        ``count`` is a 0-dim tensor in ``dtype`` so that it can travel in a collective.
        """
        total = (
            self._sum
            if self._sum is not None
            else torch.zeros(self.shape, dtype=self.dtype, device=device)
        )
        count = torch.as_tensor(self._count, dtype=self.dtype, device=total.device)
        if count.shape != self.count_shape:
            count = count.expand(self.count_shape).clone()
        self.discard()
        return total, count


class RowSampler:
    """Uniform row subsets without replacement for ``factor_max_rows``: ``(total / R) Σ_sampled
    r rᵀ`` is an unbiased estimator of ``Σ_all r rᵀ``. One generator per device, seeded once."""

    def __init__(self, max_rows: int | None, seed: int) -> None:
        self.max_rows = max_rows
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}

    def draw(self, total: int, device: torch.device) -> tuple[Tensor | None, float]:
        """Row subset for one capture and the factor ``total / kept`` that rescales its sum."""
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

    def state(self) -> dict[str, Tensor]:
        return {key: generator.get_state() for key, generator in self.generators.items()}

    def load(self, states: dict[str, Tensor]) -> None:
        for key, generator_state in states.items():
            generator = torch.Generator(device=key)
            generator.set_state(generator_state)
            self.generators[key] = generator


@dataclasses.dataclass
class PendingCall:
    """What a call captured in the forward, waiting for its output gradient."""

    forward_id: int
    batch_size: int
    batch_dim: int
    #: Expand rule: the call's input, its rows ``N·T`` and their routes to the factors' blocks
    #: (``RecognizedCall.routing``: which expert each row went to).
    layer_input: Tensor | None = None
    rows: int = 0
    routing: Any = None
    #: Expand rule: which rows are real positions (padding mask), or None (all rows).
    row_mask: Tensor | None = None
    #: Per-sample rule: zeroes the output gradient at padding positions, or None.
    gradient_mask: Tensor | None = None
    #: Withdrawn (``UseSums.cancel``): its gradient is ignored.
    cancelled: bool = False
    #: Per-sample rule: what ``UseModel.begin_samples`` returned.
    begun: Any = None


@dataclasses.dataclass
class _Answered:
    """An expand-rule call whose output gradient arrived: ``g = scale · gradient``."""

    pending: PendingCall
    gradient: Tensor
    scale: float | Tensor


@dataclasses.dataclass
class _ForwardSamples:
    """Per-sample contributions of the calls of one forward (per-sample rule).

    Calls over all ``N`` samples of the forward (weight sharing) are summed per sample; calls over
    fewer samples (disjoint sub-batches, e.g. ghost batch norm or a batch processed in chunks)
    contribute their samples side by side.
    """

    batch_size: int
    calls: list[tuple[Tensor | None, int, Tensor]] = dataclasses.field(default_factory=list)
    open_calls: int = 0


class UseSums:
    """The step's factor sums of one use, and the per-use gradients its parameters need.

    Args:
        model: The use's ``UseModel`` (its rows and capture rule).
        dtype: Dtype of the sums (``factor_dtype``).
        approximation: Expand or reduce for weight-shared Kronecker uses.
        sampler: Row sampling of the expand rule.
        batch_dim: Dimension of the call's input that indexes samples, when known from the
            model's structure (``batch_first``); otherwise found by size at each call.
        layout_dim: The batch's samples' dimension (``KFACOptions.batch_dim``), for indices.
    """

    def __init__(
        self,
        model: UseModel,
        dtype: torch.dtype,
        *,
        approximation: KFACApproximation,
        sampler: RowSampler,
        batch_dim: int | None = None,
        layout_dim: int = 0,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.sides = [
            SideSum(
                (side.blocks, side.dim) if side.diagonal else (side.blocks, side.dim, side.dim),
                dtype,
                (side.blocks,) if side.per_block_count else (),
            )
            for side in model.factor_sides
        ]
        self.per_sample = model.per_sample(approximation)
        self.sampler = sampler
        self.batch_dim_hint = batch_dim
        #: The batch's samples' dimension (``KFACOptions.batch_dim``): that of 2-D indices.
        self.batch_dim = layout_dim
        #: Calls whose output gradient has not arrived yet.
        self.open_calls = 0
        self._counted_forwards: set[int] = set()
        self._forward_samples: dict[int, _ForwardSamples] = {}
        self._answered: list[_Answered] = []
        #: Per-use gradients of the passed weight/bias, collected through alias tensors when the
        #: parameter has several overlapping uses (``"weight"``/``"bias"`` -> gradient).
        self.use_gradients: dict[str, Tensor] = {}
        #: A forward mixed calls over all samples with calls over sub-batches (per-sample sums
        #: then cannot be aligned; samples are taken side by side and the user is told once).
        self.mixed_sample_calls = False
        #: K-FAC-reduce saw a padded batch: its per-sample sums include the padding positions
        #: (the user is told once).
        self.unmasked_reduce = False

    def batch_dim_of(self, tensor: Tensor, batch_size: int) -> int:
        """The dimension of a call's input that indexes the samples."""
        # A 2-D float tensor is (rows, features): its samples lie along dim 0, possibly flattened
        # with positions (see LinearModel._samples; hint 1: position-major). 2-D indices are laid
        # out as the batch is (``batch_dim``): their sizes cannot tell ([1, T] position ids with
        # T == N look like (T, N) ones).
        if self.batch_dim_hint is not None and tensor.dim() > self.batch_dim_hint:
            return self.batch_dim_hint
        if tensor.dim() == 2 and not tensor.is_floating_point():
            return self.batch_dim
        if tensor.dim() >= 3 and tensor.shape[0] != batch_size and tensor.shape[1] == batch_size:
            return 1
        return 0

    # -- capture ---------------------------------------------------------------------------
    def begin_call(
        self,
        layer_input: Tensor,
        forward_id: int,
        batch_size: int,
        call: RecognizedCall,
        positions: Tensor | None = None,
    ) -> PendingCall:
        """Forward half of a call: keep its input side until its output gradient arrives
        (``positions``: the forward's ``[N, T]`` mask of real positions, or None)."""
        x = layer_input.detach()
        pending = PendingCall(forward_id, batch_size, self.batch_dim_of(x, batch_size))
        model = self.model
        if self.per_sample:
            if positions is not None:
                pending.gradient_mask = model.gradient_mask(x, pending.batch_dim, positions)
                if (
                    pending.gradient_mask is None
                    and model.row_mask(x, pending.batch_dim, positions) is not None
                ):
                    self.unmasked_reduce = True  # reduce sums every position; said once
            pending.begun = model.begin_samples(x, call, pending.batch_dim, batch_size, self.dtype)
            samples = self._forward_samples.setdefault(forward_id, _ForwardSamples(batch_size))
            samples.open_calls += 1
        else:
            assert isinstance(model, KroneckerModel)
            pending.layer_input = x
            pending.rows = model.row_count(x)
            pending.routing = call.routing
            if positions is not None:
                pending.row_mask = model.row_mask(x, pending.batch_dim, positions)
        self.open_calls += 1
        return pending

    def cancel(self, pending: PendingCall) -> None:
        """Withdraw a call begun in the forward (its gradient, when it comes, is ignored)."""
        if pending.cancelled:
            return
        pending.cancelled = True
        self.open_calls -= 1
        samples = self._forward_samples.get(pending.forward_id)
        if samples is not None:
            samples.open_calls -= 1

    def end_call(
        self, pending: PendingCall, output_gradient: Tensor, loss_scale: float | Tensor
    ) -> None:
        """Backward half: the output side, and the commit of both sides."""
        if pending.cancelled:
            return
        self.open_calls -= 1
        gradient = output_gradient.detach().to(self.dtype)
        scale = pending.batch_size / loss_scale  # g = (N / s) ∂loss/∂s
        if self.per_sample:
            if pending.gradient_mask is not None:
                gradient = gradient * pending.gradient_mask.to(gradient.dtype)
            samples = self._forward_samples[pending.forward_id]
            samples.open_calls -= 1
            a_sums, positions, g_samples = self.model.end_samples(
                pending.begun, gradient, pending.batch_dim, pending.batch_size
            )
            samples.calls.append((a_sums, positions, g_samples * scale))
            if samples.open_calls == 0:
                self._commit_samples(pending.forward_id)
            return
        self._answered.append(_Answered(pending, gradient, scale))
        if self.open_calls == 0:
            self._commit_answered()

    def _commit_answered(self) -> None:
        """Expand rule: ``Σ a aᵀ`` and ``Σ g gᵀ`` over the rows of every answered call (each
        sampled over all their rows together, rescaled), ``A``'s normaliser their rows, ``G``'s
        ``N`` once per forward."""
        answered, self._answered = self._answered, []
        if not answered:
            return
        model = self.model
        assert isinstance(model, KroneckerModel)
        inputs = []
        for call in answered:
            x = call.pending.layer_input
            assert x is not None
            inputs.append(x if x.dtype in (torch.int64, torch.int32) else x.to(self.dtype))
        device = inputs[0].device
        routes = [call.pending.routing for call in answered]
        masks = [call.pending.row_mask for call in answered]
        index, weight = self.sampler.draw(sum(call.pending.rows for call in answered), device)
        a_statistic = model.a_statistic_of_calls(inputs, index, routes, masks).to(self.dtype)
        a_statistic = a_statistic if weight == 1.0 else a_statistic * weight
        a_count = sum(
            model.a_count(call.pending.rows, call.pending.routing, device)
            if call.pending.row_mask is None
            else call.pending.row_mask.to(self.dtype).sum()
            for call in answered
        )
        gradients = [call.gradient for call in answered]
        total = sum(model.g_row_count(g) for g in gradients)
        index, weight = self.sampler.draw(total, device)
        scales = [call.scale for call in answered]
        g_statistic = model.g_statistic_of_calls(gradients, scales, index, routes, masks)
        g_statistic = g_statistic if weight == 1.0 else g_statistic * weight
        counts = 0.0
        for call in answered:
            if call.pending.forward_id not in self._counted_forwards:
                self._counted_forwards.add(call.pending.forward_id)
                counts += float(call.pending.batch_size)
        a_side, g_side = self.sides
        a_side.add(a_statistic, a_count)
        g_side.add(g_statistic, counts)

    def _commit_samples(self, forward_id: int) -> None:
        forward = self._forward_samples.pop(forward_id)
        if not forward.calls:
            return
        axis = self.model.sample_axis
        sizes = [g.shape[axis] for _, _, g in forward.calls]
        a_parts = [a for a, _, _ in forward.calls]
        has_inputs = all(a is not None for a in a_parts)
        if all(size == forward.batch_size for size in sizes):  # positions of the same samples
            g_samples = sum(g for _, _, g in forward.calls)
            positions = sum(p for _, p, _ in forward.calls)
            a_means = sum(a_parts) / max(positions, 1) if has_inputs else None  # type: ignore[arg-type]
        else:  # disjoint sub-batches: their samples side by side
            self.mixed_sample_calls |= any(size == forward.batch_size for size in sizes)
            g_samples = torch.cat([g for _, _, g in forward.calls], dim=axis)
            a_means = (
                torch.cat([a / max(p, 1) for a, p, _ in forward.calls], dim=1)  # type: ignore[operator]
                if has_inputs
                else None
            )
        assert isinstance(g_samples, Tensor)
        samples = float(g_samples.shape[axis])
        for side, total in zip(
            self.sides, self.model.sample_factor_sums(a_means, g_samples), strict=True
        ):
            side.add(total, samples)

    def finish(self) -> None:
        """Commit what was answered while other calls still had no gradient (their outputs were
        not part of the loss), and the per-sample sums of such forwards."""
        self._commit_answered()
        for forward_id in list(self._forward_samples):
            self._commit_samples(forward_id)
        self.open_calls = 0
        self._counted_forwards.clear()

    @property
    def has_sums(self) -> bool:
        return all(side.has_sum for side in self.sides)

    def discard(self) -> None:
        """Forget this step's sums and per-use gradients (a step that is not taken)."""
        self._forward_samples.clear()
        self._answered.clear()
        self._counted_forwards.clear()
        self.open_calls = 0
        for side in self.sides:
            side.discard()
        self.use_gradients.clear()

    def take(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Each side's ``(Σ, count)`` of this step; resets the sums."""
        return [side.take(device) for side in self.sides]

    def keep_use_gradient(self, part: str, gradient: Tensor) -> None:
        """Add a gradient of the passed ``part`` (``"weight"``/``"bias"``) to this use's own."""
        held = self.use_gradients.get(part)
        if held is None:
            self.use_gradients[part] = gradient.detach().clone()
        else:
            held.add_(gradient.detach())

    def take_use_gradients(self) -> dict[str, Tensor]:
        gradients, self.use_gradients = self.use_gradients, {}
        return gradients
